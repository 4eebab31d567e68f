"""The CUDA depthwise kernels' input-side prologue (ops/prologue.py, design.md 3.3).

``conv_stats(..., prologue=Affine)`` and ``input_grad(..., prologue=Affine)`` of
convmixer_kernels/ops/cuda/depthwise.py read z = act(x) * finalized[SCALE] + finalized[SHIFT]
wherever they read x; they must equal the same launchers run on a materialized z. Checked in the
CPU emulator of the kernels (csrc/emulate/, see tests/test_cuda_ext.py), or on a GPU:

* the z the kernels stage, read back through a 1x1 identity conv, against ``affine_reference``
  (bitwise for relu, within one rounding of the storage dtype for the GELUs: the kernels' erf and
  tanh are not torch's);
* every output against the launchers on that z (bitwise) and on ``affine_reference``'s z
  (bitwise for relu; for the GELUs the rows that do not read x are bitwise, the rest close);
* the zero padding pads z, not x: closed forms that act(0) * s + t padding would miss;
* the binding's errors for the prologue's tensors.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convmixer_kernels.ops.activation import ACT_CODE
from convmixer_kernels.ops.batchnorm import SCALE, SHIFT
from convmixer_kernels.ops.cuda import depthwise as cuda_dw
from convmixer_kernels.ops.prologue import Affine, affine_reference
from test_cuda_ext import _randn, emulated_module, kernels  # noqa: F401 (fixtures)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _affine(C, act, device, seed):
    """A prologue with scales around 1 and shifts clearly away from zero (|t| >= 0.5, both signs)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.zeros(6, C, dtype=torch.float64)
    f[SCALE] = 1.0 + 0.4 * torch.randn(C, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(C, generator=g) < 0.3, -1.0, 1.0).double()
    f[SHIFT] = sign * (0.5 + torch.rand(C, generator=g, dtype=torch.float64))
    return Affine(f.float().to(device), ACT_CODE[act])


def _input(shape, dtype, device, layout, seed):
    x = (_randn(shape, seed) * 1.5).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _pads(KH, KW):
    return (KH - 1) // 2, (KW - 1) // 2


def _kernel_z(x, prologue):
    """The z the kernels stage, read back through a 1x1 identity conv (a = z exactly)."""
    C = x.shape[1]
    eye = torch.ones(C, 1, 1, 1, device=x.device, dtype=x.dtype)
    z, _ = cuda_dw.conv_stats(x, eye, None, ACT_CODE["gelu"], (0, 0), prologue=prologue)
    return z


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _coef(C, device, seed):
    """input_grad's [4, C] (k1, k2, mean_dy, mean), batch-statistics form."""
    g = torch.Generator().manual_seed(seed)
    k1 = 1.0 + 0.3 * torch.randn(C, generator=g)
    k2 = 0.5 * torch.randn(C, generator=g)
    return torch.stack([k1, k2, 0.1 * torch.randn(C, generator=g), 0.2 * torch.randn(C, generator=g)]).to(device)


# (N, C, H, W, KH, KW, layout, dtype, prologue act, block act): both layouts, odd and even k on the
# compile-time (3, 5, 7) and general (1, 4, 6, 2x5, 13, 31) paths, channel counts on and off the
# 16-byte vector, the k = 1 NCHW staging by warp rows, and at k = 31 (channels_last) the forward's
# kernel-row chunks and the 8-channel backward tile.
CASES = [
    (2, 8, 7, 9, 3, 3, "nchw", F32, "gelu", "gelu"),
    (1, 16, 6, 5, 4, 4, "channels_last", BF16, "relu", "gelu"),
    (1, 12, 5, 6, 5, 5, "channels_last", F32, "gelu_tanh", "relu"),
    (2, 3, 9, 8, 6, 6, "nchw", BF16, "gelu", "gelu_tanh"),
    (1, 10, 6, 7, 7, 7, "channels_last", BF16, "relu", "relu"),
    (1, 16, 5, 6, 3, 3, "channels_last", BF16, "gelu_tanh", "gelu"),
    (1, 4, 5, 6, 1, 1, "nchw", F32, "relu", "gelu"),
    (1, 8, 6, 6, 13, 13, "channels_last", F32, "gelu", "gelu"),
    (1, 6, 5, 7, 2, 5, "nchw", F16, "gelu_tanh", "gelu"),
    (1, 8, 6, 6, 31, 31, "channels_last", F32, "relu", "gelu"),
]


@pytest.mark.parametrize("N, C, H, W, KH, KW, layout, dtype, pro_act, act", CASES)
def test_prologue_equals_the_launchers_on_materialized_z(kernels, N, C, H, W, KH, KW, layout, dtype, pro_act, act):
    device, _ = kernels
    x = _input((N, C, H, W), dtype, device, layout, seed=KH * 10 + C)
    prologue = _affine(C, pro_act, device, seed=C + KW)
    w = (_randn((C, 1, KH, KW), 3, 0.3)).to(device, dtype)
    b = _randn(C, 4, 0.5).to(device, dtype)
    pads, code = _pads(KH, KW), ACT_CODE[act]
    exact = pro_act == "relu"  # torch's relu and the kernels' are the same function; the GELUs' erf/tanh are not

    # the staged values: affine_reference's z up to the activation's own rounding
    z_ref = affine_reference(x, prologue)
    z_kernel = _kernel_z(x, prologue)
    assert z_kernel.stride() == x.stride()
    if exact:
        assert torch.equal(z_kernel, z_ref)
    else:  # one rounding of the storage dtype, plus float32 noise of act(x) * s
        eps = torch.finfo(dtype).eps
        assert ((z_kernel.double() - z_ref.double()).abs() <= eps * z_ref.double().abs() + 1e-5).all()
        if dtype != F32:
            assert (z_kernel != z_ref).float().mean().item() < 0.05

    # forward: bitwise the launcher on the kernels' z; close to (relu: bitwise) the launcher on affine_reference's z
    a, partials = cuda_dw.conv_stats(x, w, b, code, pads, prologue=prologue)
    a_k, partials_k = cuda_dw.conv_stats(z_kernel, w, b, code, pads)
    assert torch.equal(a, a_k) and torch.equal(partials, partials_k)
    a_r, partials_r = cuda_dw.conv_stats(z_ref, w, b, code, pads)
    if exact:
        assert torch.equal(a, a_r) and torch.equal(partials, partials_r)
    else:
        assert _rel(a, a_r) < (2.0 ** -8 if dtype != F32 else 1e-6)

    # backward: dw reads z; dx and db do not read x at all
    dy = _randn(x.shape, 9).to(device, dtype)
    coef = _coef(C, device, seed=5)
    args = (coef, code, pads, True, True, True, True)
    dx, dw, db = cuda_dw.input_grad(dy, a, x, w, *args, prologue=prologue)
    dx_k, dw_k, db_k = cuda_dw.input_grad(dy, a, z_kernel, w, *args)
    assert torch.equal(dx, dx_k) and torch.equal(dw, dw_k) and torch.equal(db, db_k)
    dx_r, dw_r, db_r = cuda_dw.input_grad(dy, a, z_ref, w, *args)
    assert torch.equal(dx, dx_r) and torch.equal(db, db_r)
    if exact:
        assert torch.equal(dw, dw_r)
    else:
        assert _rel(dw, dw_r) < (2.0 ** -7 if dtype != F32 else 1e-5)
    assert dw.shape == w.shape and dw.dtype == w.dtype and db.shape == (C,)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("k", [3, 4, 9])
def test_zero_padding_pads_z_not_x(kernels, layout, k):
    """x = 0, so z = t inside the map; a ones kernel then counts the in-map taps times t. Padding with
    act(0) * s + t = t would give t * k^2 everywhere; the weight gradient likewise (float64 reference
    on the zero-padded z)."""
    device, _ = kernels
    N, C, H, W = 1, 8, 5, 7
    x = torch.zeros(N, C, H, W, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    f = torch.zeros(6, C, device=device)
    f[SCALE] = 2.0
    f[SHIFT] = torch.tensor([0.75, -1.5, 0.5, 1.0, -0.25, 2.0, -1.0, 0.125], device=device)
    prologue = Affine(f, ACT_CODE["gelu"])
    w = torch.ones(C, 1, k, k, device=device)
    pt = pl = (k - 1) // 2
    a, _ = cuda_dw.conv_stats(x, w, None, ACT_CODE["relu"], (pt, pl), prologue=prologue)
    rows = torch.tensor([sum(0 <= h + i - pt < H for i in range(k)) for h in range(H)], dtype=torch.float64)
    cols = torch.tensor([sum(0 <= v + j - pl < W for j in range(k)) for v in range(W)], dtype=torch.float64)
    want = f[SHIFT].double().cpu().view(1, C, 1, 1) * (rows.view(H, 1) * cols.view(1, W))
    assert torch.equal(a.double().cpu(), want)
    assert (a[:, :, 0, 0] != a[:, :, H // 2, W // 2]).all()  # corners see fewer taps

    dy = _randn(x.shape, 2).float().to(device)
    coef = _coef(C, device, seed=1)
    _, dw, _ = cuda_dw.input_grad(dy, a, x, w, coef, ACT_CODE["relu"], (pt, pl), True, True, True, True,
                                  prologue=prologue)
    # float64: da as the kernels form it, conv of the zero-padded z = t
    k1, k2, mean_dy, mean = (c.double().cpu().view(1, C, 1, 1) for c in coef)
    ad = a.double().cpu()
    da = (k1 * (dy.double().cpu() - mean_dy) + k2 * (F.relu(ad) - mean)) * (ad > 0).double()
    z = f[SHIFT].double().cpu().view(1, C, 1, 1).expand(N, C, H, W).contiguous()
    wd = w.double().cpu().requires_grad_(True)
    out = F.conv2d(F.pad(z, (pl, k - 1 - pl, pt, k - 1 - pt)), wd, groups=C)
    (dw_ref,) = torch.autograd.grad(out, wd, da)
    assert _rel(dw.cpu(), dw_ref) < 1e-6


def test_without_weight_gradient_the_prologue_is_not_needed(kernels):
    """need_dw=False: dx and db never read x, so they are those of the launcher without a prologue."""
    device, _ = kernels
    C = 8
    x = _input((1, C, 6, 5), F32, device, "channels_last", seed=3)
    prologue = _affine(C, "gelu", device, seed=4)
    w = _randn((C, 1, 3, 3), 5, 0.3).float().to(device)
    a, _ = cuda_dw.conv_stats(x, w, None, 0, (1, 1), prologue=prologue)
    dy = _randn(x.shape, 6).float().to(device)
    coef = _coef(C, device, seed=7)
    dx, dw, db = cuda_dw.input_grad(dy, a, x, w, coef, 0, (1, 1), True, True, False, True, prologue=prologue)
    dx0, _, db0 = cuda_dw.input_grad(dy, a, x, w, coef, 0, (1, 1), True, True, True, True)
    assert torch.equal(dx, dx0) and torch.equal(db, db0) and dw.numel() == 0


def test_binding_checks_the_prologue_tensors(kernels):
    device, ext = kernels
    C = 4
    x = torch.randn(1, C, 5, 5, device=device)
    w = torch.randn(C, 1, 3, 3, device=device)
    s, t = torch.ones(C, device=device), torch.zeros(C, device=device)
    fwd = lambda **kw: ext.forward(x, w, None, None, None, 0, 1, 1, True, **kw)  # noqa: E731
    a, _ = fwd()
    bwd = lambda **kw: ext.backward(x, a, x, w, t, s, t, t, 0, 1, 1, True, **kw)  # noqa: E731
    for call in (fwd, bwd):
        with pytest.raises(RuntimeError, match="the prologue needs both its scale and its shift, got only the scale"):
            call(pro_scale=s)
        with pytest.raises(RuntimeError, match="got only the shift"):
            call(pro_shift=t)
        with pytest.raises(RuntimeError, match=r"the prologue scale must have shape \[4\], got \[5\]"):
            call(pro_scale=torch.ones(C + 1, device=device), pro_shift=t)
        with pytest.raises(RuntimeError, match="the prologue shift must be Float, got BFloat16"):
            call(pro_scale=s, pro_shift=t.bfloat16())
        with pytest.raises(RuntimeError, match="the prologue scale must be contiguous"):
            call(pro_scale=torch.ones(2 * C, device=device)[::2], pro_shift=t)
        with pytest.raises(RuntimeError, match="unknown prologue activation code 3"):
            call(pro_scale=s, pro_shift=t, pro_act=3)
    wrong = torch.device("meta") if device.type == "cpu" else torch.device("cpu")
    with pytest.raises(RuntimeError, match=rf"the prologue shift is on {wrong.type}.* but the input is on {device.type}"):
        fwd(pro_scale=s, pro_shift=torch.zeros(C, device=wrong))
    with pytest.raises(RuntimeError, match="the eval forward takes no prologue"):
        ext.forward(x, w, None, s, t, 0, 1, 1, False, pro_scale=s, pro_shift=t)
    with pytest.raises(ValueError, match=r"finalized must be \[6, C\] float32, got shape \(4,\)"):
        cuda_dw.conv_stats(x, w, None, 0, (1, 1), prologue=Affine(s, 0))
