"""The depthwise conv alone (conv + bias, padding "same"), forward and forward+backward, at the layer
shapes of the paper's configurations: where cuDNN and PyTorch's native kernel are slow (design.md §2).

No backend has a conv-only kernel. The fused providers time the closest one: the fused depthwise
block in eval mode without grad, ONE kernel doing conv + activation + BatchNorm affine + residual
(``bench_harness.workloads.EvalBlockAsConv``), i.e. strictly more work than the conv, at the same
bytes. It is checked against the unfused composition of what it computes, its records carry
``computes: "fused eval block: conv + affine + residual, one kernel"``, and it is forward only
(fwd+bwd fused is skipped as not applicable: the conv's backward is timed in test_depthwise_block).
"""
from bench_harness.workloads import paper_workloads


def workloads(batch, configs):
    return paper_workloads("dwconv", ("fwd", "fwd+bwd"), batch=batch, configs=configs)


def test_depthwise_conv(case, bench_case):
    bench_case(case)
