"""The pointwise block z = BN(act(conv1x1(r) + b)) in training mode, forward and forward+backward."""
from bench_harness.workloads import paper_workloads


def workloads(batch, configs):
    return paper_workloads("pw_block", ("fwd", "fwd+bwd"), batch=batch, configs=configs)


def test_pointwise_block(case, bench_case):
    bench_case(case)
