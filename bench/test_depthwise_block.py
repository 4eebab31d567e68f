"""The depthwise block y = x + BN(act(dwconv(x) + b)) in training mode, forward and forward+backward."""
from bench_harness.workloads import paper_workloads


def workloads(batch, configs):
    return paper_workloads("dw_block", ("fwd", "fwd+bwd"), batch=batch, configs=configs)


def test_depthwise_block(case, bench_case):
    bench_case(case)
