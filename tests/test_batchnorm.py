"""BatchNorm pieces: the module bookkeeping mirrors nn.BatchNorm2d.forward, and the
finalize step (reference and Triton kernel) matches F.batch_norm's statistics and buffers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convmixer_kernels import backends
from convmixer_kernels.ops import batchnorm as bnops
from harness import DEVICE



def _finalizer(finalize):
    """A backend's finalize followed by the one running-buffer update: (mean, rstd, scale, shift)."""
    def run(partials, call):
        fin = finalize(partials, call.weight, call.bias, call.eps)
        bnops.update_running_stats(call, fin)
        return fin[bnops.MEAN], fin[bnops.RSTD], fin[bnops.SCALE], fin[bnops.SHIFT]
    return run


FINALIZERS = {"reference": _finalizer(bnops.finalize_reference)}
if backends.environment_reason("triton", DEVICE) is None:
    from convmixer_kernels.ops.triton.batchnorm import finalize as finalize_triton
    FINALIZERS["triton"] = _finalizer(finalize_triton)


BN_VARIANTS = {
    "default": dict(),
    "momentum_none": dict(momentum=None),
    "affine_false": dict(affine=False),
    "no_tracking": dict(track_running_stats=False),
}


@pytest.mark.parametrize("variant", list(BN_VARIANTS))
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_call_mirrors_module_forward(variant, training, monkeypatch):
    """Capture what nn.BatchNorm2d passes to F.batch_norm; batchnorm_call must produce the same, step by step."""
    seen = []
    real = F.batch_norm

    def spy(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        seen.append((running_mean, running_var, weight, bias, training, momentum, eps))
        return real(input, running_mean, running_var, weight, bias, training, momentum, eps)

    ref = nn.BatchNorm2d(4, **BN_VARIANTS[variant]).train(training)
    ours = nn.BatchNorm2d(4, **BN_VARIANTS[variant]).train(training)
    monkeypatch.setattr(F, "batch_norm", spy)
    for step in range(3):
        ref(torch.randn(2, 4, 3, 3))
        call = bnops.batchnorm_call(ours)
        rm, rv, w, b, tr, mom, eps = seen[-1]
        assert (call.running_mean is None) == (rm is None) and (call.running_var is None) == (rv is None)
        assert (call.weight is None) == (w is None) and (call.bias is None) == (b is None)
        assert call.use_batch_stats == tr and call.momentum == pytest.approx(mom) and call.eps == eps
    if ours.num_batches_tracked is not None:
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("finalizer", list(FINALIZERS))
@pytest.mark.parametrize("tiles", [1, 3, 7])
@pytest.mark.parametrize("variant", ["default", "momentum_none", "affine_false"])
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float16], ids=str)
def test_finalize_matches_batch_norm(finalizer, tiles, variant, buffer_dtype):
    """Parameters float32, running buffers in ``buffer_dtype`` (as under autocast or .half())."""
    torch.manual_seed(0)
    C = 5
    g = (torch.randn(3, C, 4, 5) * 3 + 2).to(DEVICE)
    ours = nn.BatchNorm2d(C, **BN_VARIANTS[variant]).to(DEVICE)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.normal_()
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 1.5)
    ours.num_batches_tracked.fill_(4)
    ours.running_mean.data = ours.running_mean.to(buffer_dtype)
    ours.running_var.data = ours.running_var.to(buffer_dtype)
    rm64, rv64 = ours.running_mean.double(), ours.running_var.double()
    w64 = None if ours.weight is None else ours.weight.double()
    b64 = None if ours.bias is None else ours.bias.double()
    momentum = 1.0 / 5 if ours.momentum is None else ours.momentum
    expected = F.batch_norm(g.double(), rm64, rv64, w64, b64, True, momentum, ours.eps)

    call = bnops.batchnorm_call(ours)  # increments num_batches_tracked to 5
    assert call.momentum == pytest.approx(momentum)
    mean, rstd, scale, shift = FINALIZERS[finalizer](bnops.tile_partials_reference(g, tiles), call)
    out = g.double() * scale.double()[None, :, None, None] + shift.double()[None, :, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    var, m = torch.var_mean(g.double().transpose(0, 1).reshape(C, -1), dim=1, correction=0)
    torch.testing.assert_close(mean.double(), m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (var + ours.eps).rsqrt(), rtol=1e-5, atol=1e-6)
    # running buffers: what F.batch_norm wrote in float64, rounded to the buffer dtype
    tol = 1e-6 if buffer_dtype == torch.float32 else 2e-3
    assert ours.running_mean.dtype == buffer_dtype
    torch.testing.assert_close(ours.running_mean.double(), rm64, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.running_var.double(), rv64, rtol=tol, atol=tol)


@pytest.mark.parametrize("finalizer", list(FINALIZERS))
def test_finalize_skips_empty_tiles_and_is_deterministic(finalizer):
    torch.manual_seed(1)
    g = torch.randn(2, 3, 5, 5).to(DEVICE)
    p = bnops.tile_partials_reference(g, 4)
    with_empty = torch.cat([p[:, :2], torch.zeros(3, 2, 3, device=DEVICE), p[:, 2:]], dim=1)
    call = bnops.BatchNormCall(None, None, None, None, True, 0.1, 1e-5)
    a = FINALIZERS[finalizer](p, call)
    b = FINALIZERS[finalizer](with_empty, call)
    c = FINALIZERS[finalizer](with_empty, call)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        assert torch.equal(y, z)


def test_finalize_reference_and_triton_agree():
    if "triton" not in FINALIZERS:
        pytest.skip("triton cannot run here")
    torch.manual_seed(2)
    p = bnops.tile_partials_reference(torch.randn(2, 7, 6, 6).to(DEVICE) * 4, 5)
    call = bnops.BatchNormCall(None, None, None, None, True, 0.1, 1e-5)
    for x, y in zip(FINALIZERS["reference"](p, call), FINALIZERS["triton"](p, call)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
