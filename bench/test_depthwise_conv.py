"""The depthwise conv alone (conv + bias, padding "same"), forward and forward+backward, at the layer
shapes of the paper's configurations: where cuDNN and PyTorch's native kernel are slow (design.md §2)."""
from convmixer_kernels.workloads import paper_workloads


def workloads(batch, configs):
    return paper_workloads("dwconv", ("fwd", "fwd+bwd"), batch=batch, configs=configs)


def test_depthwise_conv(case, bench_case):
    bench_case(case)
