"""The tensor-core depthwise conv (ops/triton/depthwise_tc.py, issue 11): forward with BatchNorm partials,
eval forward, dx = dy + conv^T(da), dw/db, and the whole block with these kernels in place of the
CUDA-core ones, against float64 references under verify.py's precision rule.

Without a GPU these run in the Triton interpreter (tests/conftest.py) on tiny shapes, where the
kernel's bf16/fp16 dot operands are upcast to fp32 (exact products, fp32 sums) and its outputs
rounded to nearest as a GPU rounds them. Outputs are poisoned with NaN before every launch
(CONVMIXER_KERNELS_POISON=1, conftest.py): an element left unwritten fails the finiteness checks.
"""
import logging

import pytest
import torch
import torch.nn.functional as F

from convmixer_kernels import backends
from convmixer_kernels.ops import alloc
from convmixer_kernels.ops import depthwise_block as D
from convmixer_kernels.ops.activation import ACT_CODE, activation_reference
from convmixer_kernels.ops.batchnorm import MEAN, RSTD
from convmixer_kernels.ops.prologue import Affine
from convmixer_kernels.ops.triton import depthwise as TD
from convmixer_kernels.ops.triton import depthwise_tc as TC
from convmixer_kernels.verify import compare, format_rows
from harness import DEVICE, backends_under_test, check_block

pytestmark = pytest.mark.skipif("triton" not in backends_under_test(D.OP),
                                reason="Triton cannot run here (no CUDA and no TRITON_INTERPRET)")

# (shape, k): odd and even k, partial row blocks and W-tiles, k = 13 larger than a 6x6 map, and a shape whose
# tiles are all full (the kernels' EVEN specialization: no channel/row/column masks, at the interpreter's
# 2 channels x 16 rows x 16 columns; the weight gradient's 16-row steps inside one image)
CASES = [((2, 3, 9, 11), 7), ((2, 3, 9, 11), 8), ((1, 3, 7, 18), 9), ((1, 2, 6, 6), 13), ((2, 3, 5, 7), 3),
         ((2, 3, 5, 7), 4), ((2, 4, 16, 16), 9)]
IDS = ["k7", "k8", "k9-two-w-tiles", "k13-over-6x6", "k3", "k4", "k9-even-tiles"]
LAYOUTS = ["nchw", "channels_last"]


def _t(shape, seed, dtype, layout, scale=1.0):
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _pads(k):
    return D.same_padding("same", (k, k))


def _conv(x, w, b, pads):
    """F.conv2d with (top, left) pads and the rest at the bottom / right (padding="same" for even k too)."""
    kh, kw = w.shape[-2:]
    xp = F.pad(x, (pads[1], kw - 1 - pads[1], pads[0], kh - 1 - pads[0]))
    return F.conv2d(xp, w, b, groups=x.shape[1])


def _check(rows):
    assert all(r.ok for r in rows), format_rows(rows, only_failures=True)


def _finite(*ts):
    for t in ts:
        assert torch.isfinite(t).all(), "an output element was left unwritten (poisoned NaN survived)"


def test_outputs_are_poisoned_here():
    assert alloc.poisoning(), "conftest.py sets CONVMIXER_KERNELS_POISON=1: outputs start as NaN"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,k", CASES, ids=IDS)
def test_conv_stats(shape, k, layout):
    """a = conv(x) + b against float64 F.conv2d; the partials, finalized, against torch's batch statistics
    of act(a) (of the stored a, and of the float64 a)."""
    dtype = torch.bfloat16
    C = shape[1]
    x = _t(shape, 1, dtype, layout)
    w = _t((C, 1, k, k), 2, dtype, "nchw", 0.3)
    b = _t((C,), 3, dtype, "nchw", 0.2)
    pads = _pads(k)
    a, part = TC.conv_stats(x, w, b, ACT_CODE["gelu"], pads)
    _finite(a, part)
    assert a.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    ref64 = _conv(x.double(), w.double(), b.double(), pads)
    ref_d = _conv(x, w, b, pads)
    rows = [compare("a", a, ref_d, ref64, dtype)]
    fin = TC.finalize(part, None, None, 1e-5)
    g = activation_reference(a.double(), "gelu")
    g64 = activation_reference(ref64, "gelu")
    mean, var = g.mean((0, 2, 3)), g.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(fin[MEAN].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fin[RSTD].double(), 1 / torch.sqrt(var + 1e-5), rtol=1e-5, atol=1e-6)
    g_d = activation_reference(ref_d.float(), "gelu")
    rows.append(compare("mean", fin[MEAN], g_d.mean((0, 2, 3)), g64.mean((0, 2, 3)), dtype))
    rows.append(compare("var", 1 / fin[RSTD].double() ** 2 - 1e-5, g_d.var((0, 2, 3), unbiased=False),
                        g64.var((0, 2, 3), unbiased=False), dtype))
    _check(rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,k", CASES[1:3] + CASES[3:], ids=IDS[1:])
def test_input_and_weight_grads(shape, k, layout, dtype):
    """dx = dy + conv^T(da) (the forward kernel, flipped, transposed padding) and dw, db, against autograd
    of the float64 reference conv (and of the same-dtype one for the bound)."""
    if dtype == torch.float16 and shape != CASES[1][0]:
        pytest.skip("fp16: one case (the kernels are dtype-generic)")
    C = shape[1]
    x = _t(shape, 4, dtype, layout)
    w = _t((C, 1, k, k), 5, dtype, "nchw", 0.3)
    da = _t(shape, 6, dtype, layout)
    dy = _t(shape, 7, dtype, layout)
    pads = _pads(k)
    dx = TC.conv_transpose_add(da, dy, w, pads)
    dwk, dbk = TC.weight_grad(da, x, k, k, pads)
    dw = dwk.t().reshape(w.shape)
    _finite(dx, dwk, dbk)
    assert dx.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    grads = {}
    for name, dt in (("64", torch.float64), ("d", dtype)):
        xr = x.detach().to(dt).requires_grad_(True)
        wr = w.detach().to(dt).requires_grad_(True)
        br = torch.zeros(C, dtype=dt, device=DEVICE, requires_grad=True)
        gx, gw, gb = torch.autograd.grad(_conv(xr, wr, br, pads), (xr, wr, br), da.to(dt))
        grads[name] = (dy.to(dt) + gx, gw, gb)
    rows = [compare(n, got, r_d, r64, dtype) for n, got, r_d, r64 in
            zip(("dx", "dw", "db"), (dx, dw, dbk), grads["d"], grads["64"])]
    _check(rows)
    # input_grad's da and db come from the da kernel (eval, relu, k1 = 1: da = relu'(a) * dy, exact)
    coef = torch.zeros(4, C, device=DEVICE)
    coef[0] = 1.0
    da2, db2 = TC.pre_activation_grad(dy, x, coef, ACT_CODE["relu"], False)
    da_ref = torch.where(x.double() > 0, dy.double(), 0.0)
    assert torch.equal(da2.double(), da_ref)
    torch.testing.assert_close(db2.double(), da_ref.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_even_case_takes_the_unmasked_specialization():
    """CASES' last shape exercises the EVEN kernels (conv and weight gradient) at this device's tile configs; the
    others the masked ones."""
    shape, k = CASES[-1]
    x = torch.empty(shape, device=DEVICE)
    conv, wg = TC.conv_config(x, k), TC.wgrad_config(x, k)
    N, C, H, W = shape
    per = -(-(N * H) // wg.bm) * wg.bm  # at most the rows; any split is a multiple of BR
    assert TC.conv_even(shape, conv) and TC.wgrad_even(shape, wg, wg.bm) and TC.wgrad_even(shape, wg, per)
    assert not any(TC.conv_even(s, conv) for s, _ in CASES[:-1])


def test_weight_grad_is_deterministic():
    shape, k = (2, 3, 9, 11), 8
    x = _t(shape, 1, torch.bfloat16, "channels_last")
    da = _t(shape, 2, torch.bfloat16, "channels_last")
    one = TC.weight_grad(da, x, k, k, _pads(k))
    two = TC.weight_grad(da, x, k, k, _pads(k))
    assert all(torch.equal(p, q) for p, q in zip(one, two))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_conv_apply(layout):
    """y = act(conv(x) + b) * scale + shift + x in one kernel, a stored on request."""
    shape, k, dtype = (2, 3, 9, 11), 9, torch.bfloat16
    C = shape[1]
    x = _t(shape, 1, dtype, layout)
    w = _t((C, 1, k, k), 2, dtype, "nchw", 0.3)
    b = _t((C,), 3, dtype, "nchw", 0.2)
    fin = torch.zeros(6, C)
    fin[4] = torch.rand(C, generator=torch.Generator().manual_seed(4)) + 0.5
    fin[5] = torch.randn(C, generator=torch.Generator().manual_seed(5)) * 0.2
    fin = fin.to(DEVICE)
    y, a = TC.conv_apply(x, w, b, fin, ACT_CODE["gelu"], _pads(k), True)
    _finite(y, a)

    def ref(dt):
        a_ = _conv(x.to(dt), w.to(dt), b.to(dt), _pads(k))
        return activation_reference(a_, "gelu") * fin[4].to(dt)[:, None, None] + fin[5].to(dt)[:, None, None] + x.to(dt)

    _check([compare("y", y, ref(dtype), ref(torch.float64), dtype)])
    y2, a2 = TC.conv_apply(x, w, b, fin, ACT_CODE["gelu"], _pads(k), False)
    assert torch.equal(y, y2) and a2.numel() == 0


@pytest.mark.parametrize("layout,k", [("channels_last", 8), ("nchw", 9)])
def test_block_with_tc_kernels(monkeypatch, layout, k):
    """The whole depthwise block (train steps, then eval) with this module as the Triton kernels: conv_stats,
    finalize, apply, grad_sums, input_grad (da materialized, dx and dw on tensor cores), conv_apply."""
    entry = backends._REGISTRY[D.OP]
    monkeypatch.setitem(entry.loaded, "triton", TC)
    check_block("depthwise", "triton", dim=3, shape=(2, 3, 7, 9), k=k, dtype=torch.bfloat16, layout=layout,
                steps=1, eval_steps=1)


def test_unsupported_and_choice():
    x = torch.empty(2, 4, 8, 8, dtype=torch.bfloat16)
    w9 = torch.empty(4, 1, 9, 9, dtype=torch.bfloat16)
    assert TC.tc_unsupported(x, w9) is None and TC.choose_path(x, w9) == "tc"
    assert "dtype" in TC.tc_unsupported(x.float(), w9.float())
    assert TC.choose_path(x.float(), w9.float()) == "cuda_core"
    w1 = torch.empty(4, 1, 1, 1, dtype=torch.bfloat16)
    assert "kernel" in TC.tc_unsupported(x, w1) and TC.choose_path(x, w1) == "cuda_core"
    assert TC.tc_unsupported(x.half(), w9.half()) is None


# ---------------------------------------------------------------- the path choice (depthwise._path), wired in


@pytest.fixture
def path_env(monkeypatch):
    """A fresh log-once set and no CONVMIXER_KERNELS_DW_PATH; returns a setter for it."""
    monkeypatch.setattr(TD, "_logged_paths", set())
    monkeypatch.delenv(TD.ENV_PATH, raising=False)
    return lambda value: monkeypatch.setenv(TD.ENV_PATH, value)


@pytest.fixture
def tc_calls(monkeypatch):
    """Counts of the tensor-core launchers the Triton backend delegates to (they still run)."""
    calls = {"conv_stats": 0, "conv_apply": 0, "input_grad": 0}
    for name in calls:
        def spy(*args, _name=name, _fn=getattr(TC, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(TC, name, spy)
    return calls


def _pro(C):
    fin = torch.zeros(6, C, device=DEVICE)
    fin[4], fin[5] = 1.5, -0.25
    return Affine(fin, ACT_CODE["relu"])


def _path_records(caplog):
    return [r.getMessage() for r in caplog.records if "path for input" in r.getMessage()]


def test_auto_path_choice_is_logged_once(path_env, caplog):
    """auto: tensor cores for bf16/fp16 with k >= 2; CUDA cores for fp32, k = 1, or a prologue, each with
    its reason, logged at INFO once per (shape, dtype, layout, k, prologue, request)."""
    x = torch.empty(2, 4, 8, 8, dtype=torch.bfloat16)
    w9 = torch.empty(4, 1, 9, 9, dtype=torch.bfloat16)
    w1 = torch.empty(4, 1, 1, 1, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="convmixer_kernels"):
        assert TD._path(x, w9) == "tensor_cores"
        assert TD._path(x.half(), w9.half()) == "tensor_cores"
        assert TD._path(x, torch.empty(4, 1, 7, 7, dtype=torch.bfloat16)) == "tensor_cores"
        assert TD._path(x.float(), w9.float()) == "cuda_cores"
        assert TD._path(x, w1) == "cuda_cores"
        assert TD._path(x, w9, _pro(4)) == "cuda_cores"
        logged = _path_records(caplog)
        assert len(logged) == 6 and all(r.levelno == logging.INFO for r in caplog.records
                                        if "path for input" in r.getMessage())
        assert "tensor_cores path" in logged[0] and "choose_path" in logged[0] and "(9, 9)" in logged[0]
        assert "cuda_cores path" in logged[3] and "dtype torch.float32" in logged[3]
        assert "cuda_cores path" in logged[4] and "kernel 1x1" in logged[4]
        assert "cuda_cores path" in logged[5] and "prologue" in logged[5]
        assert TD._path(x, w9) == "tensor_cores" and TD._path(x, w9, _pro(4)) == "cuda_cores"
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert TD._path(x_cl, w9) == "tensor_cores"
        logged = _path_records(caplog)
    assert len(logged) == 7 and "channels_last" in logged[6], "once per key; the layout is part of it"


def test_env_forces_each_path(path_env, caplog):
    x = torch.empty(2, 4, 8, 8, dtype=torch.bfloat16)
    w9 = torch.empty(4, 1, 9, 9, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="convmixer_kernels"):
        path_env("cuda_cores")
        assert TD._path(x, w9) == "cuda_cores"
        assert TD._path(x.float(), w9.float()) == "cuda_cores"
        path_env("tensor_cores")
        assert TD._path(x, w9) == "tensor_cores"
        path_env("auto")
        assert TD._path(x, w9) == "tensor_cores"
        path_env("")
        assert TD._path(x, w9) == "tensor_cores"
    logged = _path_records(caplog)
    assert any("forced by CONVMIXER_KERNELS_DW_PATH=cuda_cores" in m for m in logged)
    assert any("forced by CONVMIXER_KERNELS_DW_PATH=tensor_cores" in m for m in logged)
    path_env("tensor-cores")
    with pytest.raises(ValueError, match="CONVMIXER_KERNELS_DW_PATH='tensor-cores'"):
        TD._path(x, w9)


def test_forcing_tensor_cores_on_an_unsupported_call_raises(path_env):
    path_env("tensor_cores")
    x = torch.empty(2, 4, 8, 8, dtype=torch.bfloat16)
    w9 = torch.empty(4, 1, 9, 9, dtype=torch.bfloat16)
    with pytest.raises(backends.BackendUnavailableError, match="tensor_cores.*dtype torch.float32"):
        TD._path(x.float(), w9.float())
    with pytest.raises(backends.BackendUnavailableError, match="kernel 1x1"):
        TD._path(x, torch.empty(4, 1, 1, 1, dtype=torch.bfloat16))
    with pytest.raises(backends.BackendUnavailableError, match="prologue"):
        TD._path(x, w9, _pro(4))
    # the launchers raise before launching anything
    xs = _t((1, 2, 6, 6), 1, torch.float32, "nchw")
    with pytest.raises(backends.BackendUnavailableError, match="cannot run on tensor cores"):
        TD.conv_stats(xs, _t((2, 1, 9, 9), 2, torch.float32, "nchw"), None, ACT_CODE["gelu"], _pads(9))


def test_launchers_delegate_and_stay_bitwise_reproducible(path_env, tc_calls):
    """Through ops/triton/depthwise.py's launchers (auto): the tensor-core launchers run, and two runs of
    the forward, the eval forward and the backward are bitwise identical."""
    shape, k, dtype, C = (2, 3, 9, 11), 9, torch.bfloat16, 3
    x = _t(shape, 1, dtype, "channels_last")
    w = _t((C, 1, k, k), 2, dtype, "nchw", 0.3)
    b = _t((C,), 3, dtype, "nchw", 0.2)
    dy = _t(shape, 4, dtype, "channels_last")
    coef = torch.randn(4, C, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    fin = torch.zeros(6, C, device=DEVICE)
    fin[4], fin[5] = 1.25, 0.1
    act, pads = ACT_CODE["gelu"], _pads(k)

    def run():
        a, part = TD.conv_stats(x, w, b, act, pads)
        y, a2 = TD.conv_apply(x, w, b, fin, act, pads, True)
        grads = TD.input_grad(dy, a, x, w, coef, act, pads, True, True, True, True)
        return (a, part, y, a2) + tuple(grads)

    one, two = run(), run()
    assert tc_calls == {"conv_stats": 2, "conv_apply": 2, "input_grad": 2}
    _finite(*one)
    assert all(torch.equal(p, q) for p, q in zip(one, two)), "the tensor-core path is not bitwise reproducible"
    assert torch.equal(one[0], one[3]), "conv_stats and conv_apply store the same a"


def test_prologue_takes_cuda_cores(path_env, tc_calls):
    x = _t((1, 2, 6, 6), 1, torch.bfloat16, "channels_last")
    w = _t((2, 1, 7, 7), 2, torch.bfloat16, "nchw", 0.3)
    a, _ = TD.conv_stats(x, w, None, ACT_CODE["gelu"], _pads(7), prologue=_pro(2))
    _finite(a)
    assert tc_calls["conv_stats"] == 0


@pytest.mark.parametrize("path,dtype,layout,k", [
    ("auto", torch.bfloat16, "channels_last", 9),
    ("auto", torch.float16, "nchw", 8),
    ("cuda_cores", torch.bfloat16, "channels_last", 9),
], ids=["auto-bf16-cl-k9", "auto-fp16-nchw-k8", "cuda_cores-bf16-cl-k9"])
def test_block_through_the_backend_on_each_path(path_env, tc_calls, caplog, path, dtype, layout, k):
    """The whole block (train step, then eval) through the registry's Triton backend, the path chosen by
    ops/triton/depthwise.py itself: auto takes tensor cores for half dtypes at k >= 2, the forced path
    does not."""
    path_env(path)
    with caplog.at_level(logging.INFO, logger="convmixer_kernels"):
        check_block("depthwise", "triton", dim=3, shape=(2, 3, 7, 9), k=k, dtype=dtype, layout=layout,
                    steps=1, eval_steps=1)
    on_tc = path == "auto"
    assert (tc_calls["conv_stats"] > 0 and tc_calls["input_grad"] > 0 and tc_calls["conv_apply"] > 0) == on_tc
    assert on_tc or sum(tc_calls.values()) == 0
    logged = _path_records(caplog)
    assert logged and all(("tensor_cores path" if on_tc else "cuda_cores path") in m for m in logged), logged


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (2, 12, 7, 9)], ids=["even", "ragged"])
def test_da_kernel_training_even_and_masked(shape, layout):
    """pre_activation_grad with the batch-statistics terms (GELU): da = act'(a) * (k1 (dy - mean_dy) + k2 (act(a) -
    mean)) and db = sum of the stored da, against float64; the even shape runs the unmasked EVEN specialization
    (H, W, C multiples of the tile), the ragged one the masked kernel. bf16 storage: da within the dtype's rounding
    of the float64 value, db within the sum of those roundings."""
    N, C, H, W = shape
    cfg = TC.da_config(H, W, C, layout == "channels_last", DEVICE)
    even = H % cfg.th == 0 and W % cfg.tw == 0 and C % cfg.block_c == 0
    assert even == (shape == (2, 16, 8, 8))
    dy = _t(shape, 11, torch.bfloat16, layout)
    a = _t(shape, 12, torch.bfloat16, layout)
    g = torch.Generator().manual_seed(13)
    coef = (torch.rand(4, C, generator=g) + 0.5).to(DEVICE)
    da, db = TC.pre_activation_grad(dy, a, coef, ACT_CODE["gelu"], True)
    _finite(da, db)
    assert da.dtype == torch.bfloat16 and da.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    a64, dy64 = a.double(), dy.double()
    k1, k2, mdy, mean = (coef[i].double()[None, :, None, None] for i in range(4))
    a_req = a64.clone().requires_grad_(True)
    (dact,) = torch.autograd.grad(activation_reference(a_req, "gelu").sum(), a_req)
    t1, t2 = k1 * (dy64 - mdy), k2 * (activation_reference(a64, "gelu") - mean)
    ref = dact * (t1 + t2)
    err = (da.double() - ref).abs()
    fp32_slack = 1e-6 * dact.abs() * (t1.abs() + t2.abs())  # float32 arithmetic on cancelling terms
    assert (err <= ref.abs() * 2 ** -8 + fp32_slack).all(), (err - ref.abs() * 2 ** -8).max()
    torch.testing.assert_close(db.double(), da.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
