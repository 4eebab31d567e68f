"""The whole ConvMixer: a training step (forward, cross-entropy, backward, AdamW step) and inference,
at the paper's configurations. Checked at a smaller batch (--bench-check-batch) against float64."""
from bench_harness.workloads import paper_workloads


def workloads(batch, configs):
    return paper_workloads("model", ("train", "infer"), batch=batch, configs=configs)


def test_model(case, bench_case):
    bench_case(case)
