"""Drop-in fidelity of the fused modules (issue 13): nothing silently wrong, no state the reference
would not have. Every case runs on every backend the harness offers for the block."""
import copy
import logging

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from convmixer_kernels import FusedDepthwiseBlock, FusedPointwiseBlock
from harness import DEVICE, backends_under_test, randomize_

BLOCKS = [("depthwise_block", b) for b in backends_under_test("depthwise_block")] + \
         [("pointwise_block", b) for b in backends_under_test("pointwise_block")]


def _pair(op, backend, dim=4):
    fused = (FusedDepthwiseBlock(dim, 3, backend=backend) if op == "depthwise_block"
             else FusedPointwiseBlock(dim, backend=backend))
    randomize_(fused).to(DEVICE)
    return fused, fused.to_reference()


def _bn(module):
    return module.fn[2] if isinstance(module, FusedDepthwiseBlock) else module[2]


@pytest.mark.parametrize("op, backend", BLOCKS)
@pytest.mark.parametrize("bad", ["channels", "int", "empty_map"])
def test_bad_input_raises_like_the_reference_and_changes_no_state(op, backend, bad):
    fused, ref = _pair(op, backend)
    x = {"channels": torch.randn(2, 1, 6, 6), "int": torch.ones(2, 4, 6, 6, dtype=torch.int64),
         "empty_map": torch.randn(2, 4, 0, 6)}[bad].to(DEVICE)
    with pytest.raises(Exception) as ref_error:
        copy.deepcopy(ref)(x)
    before = copy.deepcopy(fused.state_dict())
    with pytest.raises(type(ref_error.value)):
        fused(x)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k  # num_batches_tracked and running stats untouched


@pytest.mark.parametrize("op, backend", BLOCKS)
def test_refused_call_in_strict_mode_counts_no_batch(op, backend, monkeypatch):
    """float64 on a fused-only path: strict mode refuses it before any state changes."""
    if backend == "torch":
        pytest.skip("the torch backend takes float64")
    monkeypatch.setenv("CONVMIXER_KERNELS_STRICT", "1")
    fused, _ = _pair(op, backend)
    fused.double()
    with pytest.raises(RuntimeError, match="float64"):
        fused(torch.randn(2, 4, 5, 5, dtype=torch.float64, device=DEVICE))
    assert int(_bn(fused).num_batches_tracked) == 0


@pytest.mark.parametrize("op, backend", BLOCKS)
def test_forward_hooks_on_children_run_and_results_match(op, backend, caplog):
    fused, ref = _pair(op, backend)
    seen = []
    conv = fused.fn[0] if op == "depthwise_block" else fused[0]
    conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        y = fused(x)
    assert seen == [x.shape] and fused.last_backend == "torch" and "hooks" in caplog.text
    torch.testing.assert_close(y, ref(x))  # training: batch statistics, so the second run gives the same y


@pytest.mark.parametrize("op, backend", BLOCKS)
def test_pruned_conv_trains_for_two_steps(op, backend):
    """torch.nn.utils.prune re-derives the weight in a pre-hook: the fused module honours it."""
    fused, _ = _pair(op, backend)
    conv = fused.fn[0] if op == "depthwise_block" else fused[0]
    torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.3)
    for _ in range(2):
        x = torch.randn(2, 4, 5, 5, device=DEVICE)
        fused(x).square().sum().backward()
    assert conv.weight_orig.grad is not None


@pytest.mark.parametrize("op, backend", BLOCKS)
def test_activation_checkpointing_counts_like_the_reference(op, backend):
    """checkpoint(use_reentrant=False) runs the forward twice: running statistics and
    num_batches_tracked change exactly as the reference's do."""
    from torch.utils.checkpoint import checkpoint

    fused, _ = _pair(op, backend)
    ref = copy.deepcopy(fused.to_reference())
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    for m in (fused, ref):
        checkpoint(m, x, use_reentrant=False).square().sum().backward()
    for (k, a), b in zip(fused.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("op, backend", [c for c in BLOCKS if c[1] != "torch"])
def test_double_backward_names_the_backend_and_the_fix(op, backend):
    fused, _ = _pair(op, backend)
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match=f"double backward.*'{backend}'.*backend='torch'"):
        torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("op, backend", BLOCKS)
def test_transposed_input_gives_the_reference_memory_format(op, backend):
    fused, ref = _pair(op, backend)
    x = torch.randn(2, 4, 6, 5, device=DEVICE).transpose(2, 3)
    assert fused(x).is_contiguous() == ref(x).is_contiguous() == True  # noqa: E712


def test_from_module_refuses_a_layer_scale_residual():
    from convmixer_kernels import FusedConvMixerLayer
    from harness import depthwise_reference

    class LayerScale(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn
            self.gamma = nn.Parameter(torch.full((1,), 0.5))

        def forward(self, x):
            return x + self.gamma * self.fn(x)

    block = LayerScale(depthwise_reference(4, 3).fn)
    with pytest.raises(ValueError, match="gamma"):
        FusedDepthwiseBlock.from_module(block)
    layer = nn.Sequential(block, nn.Conv2d(4, 4, 1), nn.GELU(), nn.BatchNorm2d(4))
    fused = FusedConvMixerLayer.from_module(layer)
    assert fused[0] is block and "0.gamma" in fused.state_dict()


def test_cuda_device_on_a_cpu_build_has_no_fused_backend():
    from convmixer_kernels import explain_backends

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    reasons = explain_backends(torch.device("cuda"))
    assert reasons["torch"] is None and "is_available() is False" in reasons["triton"]
