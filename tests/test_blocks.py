"""Both fused blocks against the reference, on every backend under test (harness.py).

Outputs, input gradients, every parameter gradient and the BatchNorm buffers,
over training steps and then eval, under the precision rule of design.md section 6.
"""
import copy
import logging

import pytest
import torch
from torch import nn

from convmixer_kernels import FusedDepthwiseBlock, FusedPointwiseBlock
from harness import ACTIVATIONS, DEVICE, DTYPES, LAYOUTS, backends_under_test, check_block, fuser, make_block

KINDS = ["depthwise", "pointwise"]
OP = {"depthwise": "depthwise_block", "pointwise": "pointwise_block"}


def kind_backend_params():
    return [pytest.param(kind, b, id=f"{kind}-{b}") for kind in KINDS for b in backends_under_test(OP[kind])]


kind_backend = pytest.mark.parametrize("kind,backend", kind_backend_params())
depthwise_backend = pytest.mark.parametrize("backend", backends_under_test("depthwise_block"))


# ---------------------------------------------------------------- the grids

@depthwise_backend
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 9, 13])  # even k pads more at bottom/right; 13 > H, W
def test_depthwise_kernel_sizes(backend, k, layout):
    check_block("depthwise", backend, k=k, layout=layout, shape=(2, 6, 7, 9))


@kind_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dtypes_and_activations(kind, backend, dtype, activation):
    check_block(kind, backend, dtype=dtype, activation=activation, layout="channels_last")


@kind_backend
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 6, 1, 5), (2, 6, 11, 3), (1, 6, 12, 12)], ids=str)
def test_odd_shapes(kind, backend, layout, shape):
    check_block(kind, backend, layout=layout, shape=shape, k=3)


@kind_backend
@pytest.mark.parametrize("layout", LAYOUTS)
def test_autocast(kind, backend, layout):
    """A float32 block under bf16 autocast, fed bf16 as the layer before it would (design.md 5.13)."""
    check_block(kind, backend, autocast=torch.bfloat16, layout=layout, dim=8, shape=(2, 8, 6, 6))


@kind_backend
def test_autocast_with_float32_input(kind, backend, caplog):
    """Under autocast a float32 input is fine for the pointwise block (its conv casts it); the depthwise
    block's residual needs the input's own precision, so a fused backend falls back, and says why."""
    expect = "torch" if kind == "depthwise" else backend
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        check_block(kind, backend, autocast=torch.bfloat16, autocast_input=torch.float32, dim=8,
                    shape=(2, 8, 6, 6), expect_backend=expect)
    if backend != "torch" and kind == "depthwise":
        assert "residual" in caplog.text


# ---------------------------------------------------------------- BatchNorm configurations (design.md 5.1-5.7)

BN_CASES = {
    "momentum_none": dict(bn_kwargs=dict(momentum=None)),
    "momentum_0.3": dict(bn_kwargs=dict(momentum=0.3)),
    "eps_1e-3": dict(bn_kwargs=dict(eps=1e-3)),
    "affine_false": dict(bn_kwargs=dict(affine=False)),
    "no_running_stats": dict(bn_kwargs=dict(track_running_stats=False)),
    # buffers exist but tracking is switched off at forward time: train uses batch stats and
    # leaves buffers alone; eval still normalizes with the buffers
    "tracking_flipped_off": dict(prepare=lambda m: setattr(_bn(m), "track_running_stats", False)),
    # buffers deleted: eval falls back to batch statistics
    "buffers_removed": dict(prepare=lambda m: _drop_buffers(_bn(m))),
}


def _bn(m):
    return [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)][0]


def _drop_buffers(bn):
    bn.running_mean = None
    bn.running_var = None
    bn.num_batches_tracked = None


@kind_backend
@pytest.mark.parametrize("case", list(BN_CASES))
def test_batchnorm_configurations(kind, backend, case):
    check_block(kind, backend, steps=3, layout="channels_last", **BN_CASES[case])


# ---------------------------------------------------------------- edge cases

@kind_backend
def test_empty_batch(kind, backend, caplog):
    """N = 0 works forward and backward; weight gradients are zero; running stats untouched (5.3, 5.8)."""
    ref = make_block(kind, 6)
    fused = fuser(kind, backend)(make_block(kind, 6)).to(DEVICE)
    ref.to(DEVICE)
    x = torch.randn(0, 6, 5, 5, device=DEVICE, requires_grad=True)
    with caplog.at_level(logging.DEBUG, logger="convmixer_kernels"):
        y = fused(x)
    y_ref = ref(x)
    assert y.shape == y_ref.shape == (0, 6, 5, 5)
    y.sum().backward()
    bn = _bn(fused)
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, _bn(ref).running_mean)
    assert torch.equal(bn.running_var, _bn(ref).running_var)
    for name, p in fused.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    assert x.grad.shape == x.shape


@kind_backend
def test_single_value_per_channel_raises(kind, backend):
    fused = fuser(kind, backend)(make_block(kind, 6)).to(DEVICE)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fused(torch.randn(1, 6, 1, 1, device=DEVICE))
    assert int(_bn(fused).num_batches_tracked) == 1  # the reference counts it before raising too
    fused.eval()
    assert fused(torch.randn(1, 6, 1, 1, device=DEVICE)).shape == (1, 6, 1, 1)


@kind_backend
def test_non_positive_eps_raises_in_training(kind, backend):
    fused = fuser(kind, backend)(make_block(kind, 6, eps=0.0)).to(DEVICE)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        fused(torch.randn(2, 6, 4, 4, device=DEVICE))


@kind_backend
@pytest.mark.parametrize("shape", [(6, 5, 5), (1, 2, 6, 5, 5), (6,)], ids=str)
def test_non_4d_input_raises_like_reference(kind, backend, shape):
    ref = make_block(kind, 6).to(DEVICE)
    fused = fuser(kind, backend)(make_block(kind, 6)).to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    with pytest.raises(Exception) as ref_err:
        ref(x)
    with pytest.raises(type(ref_err.value)) as err:
        fused(x)
    assert str(err.value) == str(ref_err.value)


@kind_backend
def test_wrong_channel_count_raises_like_reference(kind, backend):
    ref = make_block(kind, 6).to(DEVICE)
    fused = fuser(kind, backend)(make_block(kind, 6)).to(DEVICE)
    x = torch.randn(2, 5, 4, 4, device=DEVICE)
    with pytest.raises(RuntimeError) as ref_err:
        ref(x)
    with pytest.raises(RuntimeError) as err:
        fused(x)
    assert type(err.value) is type(ref_err.value)


@kind_backend
def test_nan_and_inf_propagate(kind, backend):
    """A NaN or Inf in the input reaches the output where the reference puts it; nothing is clamped (5.14).

    Fused backends are compared with the float64 reference: PyTorch's own vectorized CPU float32
    GELU turns +inf into NaN, which float64 (and CUDA) do not. The torch backend is that float32
    PyTorch, so it is compared with the float32 reference.
    """
    block = make_block(kind, 6)
    ref = (block.double() if backend != "torch" else block).to(DEVICE).eval()
    fused = fuser(kind, backend)(make_block(kind, 6)).to(DEVICE).eval()
    x = torch.randn(2, 6, 6, 6, device=DEVICE)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    x[1, 3, 4, 4] = float("-inf")
    y, y_ref = fused(x), ref(x.to(next(ref.parameters()).dtype))
    assert (~torch.isfinite(y_ref)).sum() > 1  # the non-finite values did reach the output
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))


@kind_backend
def test_non_contiguous_input(kind, backend):
    """A strided view cut from a larger tensor gives the same result as its contiguous copy."""
    fused = fuser(kind, backend)(make_block(kind, 6)).to(DEVICE).eval()
    big = torch.randn(3, 12, 9, 16, device=DEVICE)
    x = big[::2, ::2, :, 1::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), fused(x.contiguous()), rtol=1e-6, atol=1e-6)


@kind_backend
def test_double_precision_runs(kind, backend):
    """float64 is supported by the reference; a fused backend without float64 falls back (logged)."""
    check_block(kind, backend, dtype=torch.float64, expect_backend=None if backend == "torch" else "torch")


# ---------------------------------------------------------------- module contract

@pytest.mark.parametrize("kind", KINDS)
def test_from_module_shares_parameters_and_keys(kind):
    ref = make_block(kind, 6)
    fused = fuser(kind, "auto")(ref)
    assert list(fused.state_dict()) == list(ref.state_dict())
    for (n1, p1), (n2, p2) in zip(fused.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and p1 is p2
    for (n1, b1), (n2, b2) in zip(fused.named_buffers(), ref.named_buffers()):
        assert n1 == n2 and b1 is b2


@pytest.mark.parametrize("kind", KINDS)
def test_constructor_matches_reference_layout(kind):
    torch.manual_seed(0)
    fused = FusedDepthwiseBlock(6, 7) if kind == "depthwise" else FusedPointwiseBlock(6)
    torch.manual_seed(0)
    ref = make_block(kind, 6, k=7)
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == \
        [(k, v.shape) for k, v in ref.state_dict().items()]
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(FusedDepthwiseBlock.from_module(ref)(x) if kind == "depthwise" else
                               FusedPointwiseBlock.from_module(ref)(x), fused(x))


def test_from_module_rejects_unfusable():
    dilated = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding="same", dilation=2), nn.GELU(), nn.BatchNorm2d(4))
    from convmixer_kernels import Residual
    with pytest.raises(ValueError, match="dilation"):
        FusedDepthwiseBlock.from_module(Residual(dilated))
    with pytest.raises(ValueError, match="activation"):
        FusedPointwiseBlock.from_module(nn.Sequential(nn.Conv2d(4, 4, 1), nn.SiLU(), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="backend"):
        FusedPointwiseBlock(4, backend="tensorrt")


def test_structure_changed_after_fusing_runs_reference(caplog):
    fused = FusedDepthwiseBlock.from_module(make_block("depthwise", 4, k=3))
    fused.fn[0].padding_mode = "reflect"  # no longer what the kernels compute
    expected = copy.deepcopy(fused.fn)
    x = torch.randn(2, 4, 5, 5)
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        y = fused(x)
    assert "no longer fits" in caplog.text and fused.last_backend == "torch"
    torch.testing.assert_close(y, expected(x) + x)
