"""The Triton depthwise block beyond the shared grid (test_blocks.py): tile and channel-block edges,
int64 offsets, k = 31, layouts, determinism, poisoned outputs, what is saved for backward,
torch.library (opcheck) and torch.compile(fullgraph=True); CUDA-only tests at the paper's shapes.

On a machine without a GPU these run in the Triton interpreter (tests/conftest.py), so shapes
stay tiny; every comparison is against the float64 reference under verify.py's rule.
"""
import contextlib
import copy
import functools
import os

import pytest
import torch

from convmixer_kernels import ConvMixer, FusedDepthwiseBlock
from convmixer_kernels.ops import alloc, tuning
from convmixer_kernels.ops import depthwise_block as D
from convmixer_kernels.ops.triton import common as TC
from convmixer_kernels.ops.triton import depthwise as TD
from convmixer_kernels.ops.batchnorm import BatchNormCall
from convmixer_kernels.verify import compare, compare_train_then_eval, format_rows, three_copies
from harness import DEVICE, ON_GPU, backends_under_test, check_block, fuser, make_block, make_inputs

pytestmark = pytest.mark.skipif("triton" not in backends_under_test(D.OP),
                                reason="the Triton backend cannot run here (no CUDA and no TRITON_INTERPRET)")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (these shapes are too large for the interpreter)")

OP_FWD = torch.ops.convmixer_kernels.depthwise_block_fwd
TRITON = functools.partial(D.depthwise_block_fused, backend="triton")
OP_BWD = torch.ops.convmixer_kernels.depthwise_block_bwd


# ---------------------------------------------------------------- helpers

def _params(C, k, dtype=torch.float32, seed=0, bias=True, affine=True):
    g = torch.Generator().manual_seed(seed)
    p = dict(weight=torch.randn(C, 1, k, k, generator=g) * 0.4,
             bias=torch.randn(C, generator=g) * 0.2 if bias else None,
             bn_weight=torch.rand(C, generator=g) + 0.5 if affine else None,
             bn_bias=torch.randn(C, generator=g) * 0.2 if affine else None,
             running_mean=torch.randn(C, generator=g) * 0.1, running_var=torch.rand(C, generator=g) + 0.5)
    return {k_: (None if v is None else v.to(DEVICE, dtype if k_ in ("weight", "bias") else torch.float32))
            for k_, v in p.items()}


def _step(fn, x, params, dy, *, train, activation="gelu", padding="same", momentum=0.1, eps=1e-5, dtype=None):
    """One forward + backward of ``fn`` (the op-level signature); returns every result by name."""
    dtype = dtype or x.dtype
    x = x.detach().to(dtype).requires_grad_(True)
    # conv parameters in the compute dtype; BatchNorm's in float32 (float64 for the reference)
    leaves = {k: (None if params[k] is None else params[k].detach().clone().to(
        dtype if k in ("weight", "bias") or dtype == torch.float64 else params[k].dtype).requires_grad_(True))
        for k in ("weight", "bias", "bn_weight", "bn_bias")}
    rm = params["running_mean"].clone().to(torch.float64 if dtype == torch.float64 else torch.float32)
    rv = params["running_var"].clone().to(rm.dtype)
    y = fn(x, leaves["weight"], leaves["bias"], leaves["bn_weight"], leaves["bn_bias"], rm, rv, train, momentum,
           eps, activation=activation, padding=padding)
    (y * dy.to(y.dtype)).sum().backward()
    out = {"y": y.detach(), "dx": x.grad, "running_mean": rm, "running_var": rv}
    for k, t in leaves.items():
        if t is not None:
            out["d" + k] = t.grad
    return out


def _check_against_float64(x, params, *, train, activation="gelu", padding="same", seed=3):
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    got = _step(TRITON, x, params, dy, train=train, activation=activation, padding=padding)
    ref = _step(D.depthwise_block_reference, x, params, dy, train=train, activation=activation, padding=padding,
                dtype=torch.float64)
    rows = [compare(k, got[k], ref[k], ref[k], torch.float32) for k in ref]
    assert all(r.ok for r in rows), format_rows(rows, only_failures=True)
    return got


@contextlib.contextmanager
def _tile_config(monkeypatch, cfg):
    """Force one tile configuration (the interpreter's default takes whole 8x8 tiles)."""
    monkeypatch.setattr(TD, "default_config", lambda *args, **kw: cfg)
    yield


# ---------------------------------------------------------------- tiles, channel blocks, offsets

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("k", [3, 4])
def test_many_tiles_and_channel_blocks(monkeypatch, layout, train, k):
    """2x4 tiles and 4-channel blocks over C=10: partial tiles at the bottom and right, a partial
    channel block, several tiles per persistent backward program, halos crossing tile edges."""
    x = make_inputs((2, 10, 5, 7), 1, layout)[0]
    with _tile_config(monkeypatch, TD.TileConfig(2, 4, 4, 1)):
        _check_against_float64(x, _params(10, k), train=train)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("k", [1, 10])
def test_kernel_wider_than_tiles_and_1x1(monkeypatch, layout, k):
    """k = 10 (even) on 2x4 tiles of a 5x11 map: column taps wholly outside a tile are skipped (the
    uniform branch), tap rows outside the map too, the weight gradient runs two column groups
    (9 + 1 taps), partial tiles at the bottom and right; k = 1: no halo at all (in eval: with batch
    statistics a 1x1 depthwise weight's gradient nearly cancels, beyond float32's 1e-5 rule for any
    summation order)."""
    x = make_inputs((1, 5, 5, 11), 1, layout)[0]
    with _tile_config(monkeypatch, TD.TileConfig(2, 4, 4, 1)):
        _check_against_float64(x, _params(5, k), train=k > 1)


def test_bf16_pairs_wide_kernel(monkeypatch):
    """bf16 windows read as int32 channel pairs, with an odd channel count (the last pair half padded),
    column-tap skipping and two weight-gradient column groups, against the bf16 precision rule."""
    ref = make_block("depthwise", 5, k=10)
    fused, ref_d, ref64 = three_copies(ref, fuser("depthwise", "triton"), torch.bfloat16, DEVICE)
    xs = make_inputs((1, 5, 5, 11), 2, "channels_last")
    with _tile_config(monkeypatch, TD.TileConfig(2, 4, 4, 1)):
        rows = compare_train_then_eval(fused, ref_d, ref64, xs[:1], xs[1:], torch.bfloat16)
    assert all(r.ok for r in rows), format_rows(rows, only_failures=True)
    assert fused.last_backend == "triton"


def test_bf16_pairs_wide_kernel_on_cuda_cores(monkeypatch):
    """``test_bf16_pairs_wide_kernel`` with the CUDA-core kernels forced (CONVMIXER_KERNELS_DW_PATH): bf16 at
    k >= 7 takes the tensor-core path by default (``depthwise._path``), so this is what keeps the int32
    channel pairs, column-tap skipping and the two weight-gradient column groups tested in bf16."""
    monkeypatch.setenv(TD.ENV_PATH, "cuda_cores")
    x = torch.empty(1, 5, 5, 11, dtype=torch.bfloat16)
    assert TD._path(x, torch.empty(5, 1, 10, 10, dtype=torch.bfloat16)) == "cuda_cores"
    test_bf16_pairs_wide_kernel(monkeypatch)


def test_int64_offsets_path(monkeypatch):
    """The 64-bit offset variant of every kernel computes the same thing (forced on a small input)."""
    monkeypatch.setattr(TD, "needs_int64", lambda *tensors: True)
    x = make_inputs((2, 6, 5, 6), 1, "channels_last")[0]
    _check_against_float64(x, _params(6, 3), train=True)


def test_needs_int64_detects_large_tensors():
    big = torch.empty((1, 2, 2 ** 15, 2 ** 15), device="meta")  # 2**31 elements
    assert TC.needs_int64(big)
    assert TC.needs_int64(torch.empty((2, 1, 4, 4), device="meta").as_strided((2, 1, 4, 4), (2 ** 31, 16, 4, 1)))
    assert not TC.needs_int64(torch.empty((64, 1536, 32, 32), device="meta"))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_kernel_31_on_12x12(monkeypatch, train):
    """k = 31 is far larger than the map: most taps fall in the zero padding, in both directions."""
    x = make_inputs((1, 4, 12, 12), 1, "channels_last")[0]
    with _tile_config(monkeypatch, TD.TileConfig(16, 16, 4, 1)):  # one tile: 961 taps are slow to interpret
        _check_against_float64(x, _params(4, 31), train=train)


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_activations_with_odd_padding_tuple(activation):
    """An explicit symmetric padding tuple (the module's attribute when not "same") works too."""
    x = make_inputs((2, 5, 6, 5), 1, "nchw")[0]
    _check_against_float64(x, _params(5, 5), train=True, activation=activation, padding=(2, 2))


def test_no_bias_no_affine():
    x = make_inputs((2, 5, 6, 5), 1, "channels_last")[0]
    got = _check_against_float64(x, _params(5, 3, bias=False, affine=False), train=True)
    assert "dbias" not in got and "dbn_weight" not in got


# ---------------------------------------------------------------- layouts, determinism, poison

def test_channels_last_matches_nchw_bitwise():
    """Same tiles and reduction order in both layouts: identical bits, outputs and every gradient."""
    params = _params(6, 5)
    x = make_inputs((2, 6, 7, 9), 1, "nchw")[0]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    a = _step(TRITON, x, params, dy, train=True)
    b = _step(TRITON, x.contiguous(memory_format=torch.channels_last), params,
              dy.contiguous(memory_format=torch.channels_last), train=True)
    assert b["y"].is_contiguous(memory_format=torch.channels_last) and a["y"].is_contiguous()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_deterministic_runs_are_bitwise_identical():
    """With torch.use_deterministic_algorithms(True): two training steps and an eval step, twice."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tuning.deterministic() and not tuning.autotune_enabled()
        results = []
        for _ in range(2):
            block = fuser("depthwise", "triton")(make_block("depthwise", 6, k=5)).to(DEVICE)
            snaps = []
            for i, x in enumerate(make_inputs((2, 6, 7, 9), 3, "channels_last")):
                block.train(i < 2)
                x = x.clone().requires_grad_(True)
                y = block(x)
                (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE)).sum().backward()
                snaps.append([y.detach(), x.grad] + [p.grad.clone() for p in block.parameters()]
                             + [b.clone() for b in block.buffers()])
                block.zero_grad()
            assert block.last_backend == "triton"
            results.append(snaps)
        for s1, s2 in zip(*results):
            for t1, t2 in zip(s1, s2):
                assert torch.equal(t1, t2)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_poisoned_outputs_are_all_written(monkeypatch):
    """Outputs are poisoned (NaN) before launch here; with finite inputs none may stay NaN, at tile
    and channel-block edges included."""
    assert alloc.poisoning(), "tests/conftest.py sets CONVMIXER_KERNELS_POISON=1"
    x = make_inputs((2, 7, 5, 9), 1, "nchw")[0]
    with _tile_config(monkeypatch, TD.TileConfig(4, 4, 4, 1)):
        for train in (True, False):
            got = _step(TRITON, x, _params(7, 4), torch.randn_like(x), train=train)
            for key, t in got.items():
                assert torch.isfinite(t).all(), f"{key} has unwritten (NaN) elements"


def test_poison_shows_unwritten_elements():
    """The poisoning the test above relies on really marks what a kernel does not write."""
    t = alloc.empty((3, 4), dtype=torch.float32, device=DEVICE)
    assert torch.isnan(t).all()


# ---------------------------------------------------------------- what autograd keeps

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_only_x_a_and_channel_statistics_are_saved(train):
    """design.md section 4: x and a are the only activation-sized tensors saved for backward."""
    params = _params(6, 5)
    x = make_inputs((2, 6, 7, 9), 1, "channels_last")[0].requires_grad_(True)
    leaves = [params[k].clone().requires_grad_(True) for k in ("weight", "bias", "bn_weight", "bn_bias")]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = TRITON(x, *leaves, params["running_mean"].clone(), params["running_var"].clone(),
                                     train, 0.1, 1e-5, activation="gelu", padding="same")
    big = [t for t in saved if t.numel() == x.numel()]
    small = [t for t in saved if t.numel() != x.numel()]
    assert len(big) == 2 and any(t is x for t in big), [tuple(t.shape) for t in saved]
    assert all(t.numel() <= leaves[0].numel() for t in small), [tuple(t.shape) for t in small]
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in leaves)


def test_no_grad_eval_keeps_nothing():
    """Inference (eval, no grad): one kernel, and no pre-activation tensor is kept."""
    params = _params(6, 3)
    x = make_inputs((2, 6, 5, 5), 1, "channels_last")[0]
    with torch.no_grad():
        y, a, stats = OP_FWD(x, params["weight"], params["bias"], params["bn_weight"], params["bn_bias"],
                             params["running_mean"], params["running_var"], False, 1e-5, 0, 1, 1, False, "triton")
    assert a.numel() == 0 and stats.shape == (6, 6) and y.shape == x.shape


# ---------------------------------------------------------------- autocast (input already in half precision)

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_with_half_input(layout, dtype):
    """A float32 block under autocast fed a half-precision input, as the previous layer produces it:
    conv in the autocast dtype, BatchNorm parameters, buffers and gradients in float32."""
    ref = make_block("depthwise", 8, k=3)
    fused, ref_d, ref64 = three_copies(ref, fuser("depthwise", "triton"), torch.float32, DEVICE)
    for m in (fused, ref_d, ref64):
        m.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    xs = make_inputs((2, 8, 6, 6), 3, layout)
    rows = compare_train_then_eval(fused, ref_d, ref64, xs[:2], xs[2:], dtype, autocast=dtype)
    assert all(r.ok for r in rows), format_rows(rows, only_failures=True)
    assert fused.last_backend == "triton"
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in fused.parameters())
    assert all(b.dtype != dtype for b in fused.buffers())


# ---------------------------------------------------------------- backend choice

def test_unsupported_configurations_say_why():
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    w = torch.randn(4, 1, 3, 3, device=DEVICE)
    bn = BatchNormCall(None, None, None, None, True, 0.1, 1e-5)
    ok = dict(x=x, weight=w, bn=bn, compute_dtype=torch.float32, activation="gelu", padding="same")
    assert D.unsupported(**ok) is None and TD.unsupported(**ok) is None
    assert "float64" in D.unsupported(**{**ok, "x": x.double(), "compute_dtype": torch.float64})
    assert "size" in D.unsupported(**{**ok, "padding": (0, 0)})
    assert "channels" in D.unsupported(**{**ok, "x": torch.randn(2, 0, 5, 5, device=DEVICE),
                                          "weight": torch.randn(0, 1, 3, 3, device=DEVICE)})


# ---------------------------------------------------------------- torch.library

def _compile_backend():
    return "inductor"


def test_compile_fullgraph_block_matches_eager():
    """torch.compile(fullgraph=True) on a fused block: no graph breaks, same numbers as eager,
    training (buffers updated) and eval."""
    torch._dynamo.reset()
    eager = fuser("depthwise", "triton")(make_block("depthwise", 6, k=3)).to(DEVICE)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=_compile_backend())
    for i, x in enumerate(make_inputs((2, 6, 5, 7), 2, "channels_last")):
        for m in (eager, compiled_module):
            m.train(i == 0)
        outs = []
        for m in (eager, compiled):
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE)).sum().backward()
            outs.append([y.detach(), xi.grad])
        for a, b in zip(outs[0], outs[1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert compiled_module.last_backend == "triton"
    for (n, p1), p2 in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-6, atol=1e-6, msg=n)
    for b1, b2 in zip(eager.buffers(), compiled_module.buffers()):
        torch.testing.assert_close(b1, b2, rtol=0, atol=0)


def test_compile_fullgraph_convmixer():
    """The whole fused model compiles without graph breaks and matches eager. The pointwise blocks
    use Triton too where that backend is implemented, else the reference."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    pointwise = "triton" if "triton" in backends_under_test("pointwise_block") else "torch"
    model = ConvMixer(8, 2, kernel_size=3, patch_size=2, n_classes=5, fused=True, backend=pointwise).to(DEVICE)
    blocks = [m for m in model.modules() if isinstance(m, FusedDepthwiseBlock)]
    assert len(blocks) == 2
    for b in blocks:
        b.backend = "triton"
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=_compile_backend())
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    outs = []
    for m in (eager, compiled):
        y = m(x)
        y.square().sum().backward()
        outs.append(y.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert all(b.last_backend == "triton" for b in blocks)
    for (n, p1), p2 in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, b1), b2 in zip(eager.named_buffers(), model.buffers()):
        torch.testing.assert_close(b1, b2, rtol=1e-6, atol=1e-6, msg=n)


# ---------------------------------------------------------------- compiled (not interpreted) kernels

_COMPILE_FOR_SM90 = r"""
import itertools
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from convmixer_kernels.ops.triton import batchnorm as TB
from convmixer_kernels.ops.triton import common as TC
from convmixer_kernels.ops.triton import depthwise as D

def build(fn, dtype, consts, unit_strides=(), f32_scratch=False):
    sig, constexprs = {}, {}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    for name in fn.arg_names:
        if name == "scratch_ptr":
            sig[name] = "*fp32" if f32_scratch else dtype
            continue
        if name in consts or name in unit_strides:  # launches specialize strides equal to 1 the same way
            sig[name], constexprs[name] = "constexpr", consts.get(name, 1)
        else:
            sig[name] = (dtype if name in ("x_ptr", "b_ptr", "a_ptr", "y_ptr", "dy_ptr", "dx_ptr", "da_ptr")
                         else "*fp32") if name.endswith("_ptr") else ("fp32" if name == "eps" else "i32")
    compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32))

for dtype, (k, train, int64, act) in itertools.product(["*bf16", "*fp32"], [(9, True, False, 0), (4, False, True, 2)]):
    common = dict(TH=8, TW=8, BLOCK_C=32, INT64=int64, ACT=act)
    conv = dict(common, KH=k, KW=k, PT=(k - 1) // 2, PL=(k - 1) // 2)
    pairs = dtype == "*bf16"  # bf16 windows read as int32 channel pairs
    build(D._conv_kernel, dtype, dict(conv, HAS_BIAS=True, TRAIN=train, STORE_A=True, PAIRS=pairs, PRO_ACT=-1), ("sxc", "soc"))
    build(D._apply_kernel, dtype, common, ("sxw", "sow"))
    build(D._reduce_kernel, dtype, common)
    build(D._input_grad_kernel, dtype, dict(conv, TRAIN=train, NEED_DX=True, STORE_DA=True), ("sgc", "soc"),
          f32_scratch=True)
    build(D._weight_grad_kernel, dtype, dict(conv, G=min(k, 9), TH=4, TW=8, PAIRS=pairs, PRO_ACT=-1), ("sdc", "sxc"))
build(TC._sum_rows_kernel, "*fp32", dict(BLOCK=128, SPLIT=8))
build(TB._finalize_kernel, "*fp32", dict(HAS_WEIGHT=True, HAS_BIAS=True, SPLIT=32, BLOCK_C=32))
print("compiled")
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU every kernel is compiled for real by the other tests")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile every kernel (both dtypes, train and
    eval, int64 offsets, the shared activation and statistics functions) to sm_90 code, no GPU needed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# ---------------------------------------------------------------- CUDA only: the paper's shapes

PAPER = {
    # name: (dim, input shape, kernel, activation)
    "1536_20_k9": (1536, (8, 1536, 32, 32), 9, "gelu"),
    "768_32_k7_relu": (768, (8, 768, 32, 32), 7, "relu"),
    "1024_20_k9_p14": (1024, (8, 1024, 16, 16), 9, "gelu"),
    "cifar_256_8_k5_b64": (256, (64, 256, 16, 16), 5, "gelu"),
    "k31": (64, (4, 64, 32, 32), 31, "gelu"),
}


@gpu_only
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("name", list(PAPER))
def test_paper_shapes_cuda(name, layout):
    dim, shape, k, act = PAPER[name]
    check_block("depthwise", "triton", dim=dim, shape=shape, k=k, activation=act, layout=layout, steps=1)


@gpu_only
@pytest.mark.parametrize("name", ["1536_20_k9", "k31"])
def test_paper_shapes_bf16_autocast_cuda(name):
    dim, shape, k, act = PAPER[name]
    check_block("depthwise", "triton", dim=dim, shape=shape, k=k, activation=act, layout="channels_last",
                steps=1, autocast=torch.bfloat16)


@gpu_only
@pytest.mark.parametrize("name", ["1536_20_k9", "k31"])
def test_paper_shapes_bf16_autocast_cuda_cores_path(monkeypatch, name):
    """The CUDA-core kernels at the paper's half-precision shapes (the default there is the tensor-core path)."""
    monkeypatch.setenv(TD.ENV_PATH, "cuda_cores")
    test_paper_shapes_bf16_autocast_cuda(name)


@gpu_only
def test_auto_picks_triton_on_cuda():
    block = FusedDepthwiseBlock.from_module(make_block("depthwise", 8, k=5)).to(DEVICE)
    block(torch.randn(2, 8, 6, 6, device=DEVICE))
    assert block.last_backend in ("triton", "cuda")


@gpu_only
def test_int64_offsets_cuda():
    """A tensor of 2**31 elements (4 GiB in bf16): the eval kernel's last rows match the reference
    computed on a crop (the crop's own border rows are not compared)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2 ** 30:
        pytest.skip("needs about 14 GiB of free GPU memory")
    C, k = 2, 5
    x = torch.randn(1, C, 2 ** 15, 2 ** 15, device="cuda", dtype=torch.bfloat16)
    p = _params(C, k, dtype=torch.bfloat16)
    with torch.no_grad():
        y = TRITON(x, p["weight"], p["bias"], p["bn_weight"], p["bn_bias"], p["running_mean"],
                                     p["running_var"], False, 0.1, 1e-5, activation="gelu", padding="same")
        crop = x[:, :, -32:, -64:].float()
        ref = D.depthwise_block_reference(crop, p["weight"].float(), p["bias"].float(), p["bn_weight"],
                                          p["bn_bias"], p["running_mean"], p["running_var"], False, 0.1, 1e-5,
                                          activation="gelu", padding="same")
    torch.testing.assert_close(y[:, :, -16:, -16:].float(), ref[:, :, -16:, -16:], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(3, 16, 16, 8), (3, 11, 9, 13)])  # whole tiles (EVEN) and ragged ones
@pytest.mark.parametrize("act", [0, 1, 2])
def test_grad_sums_matches_float64_and_repeats_bitwise(shape, act):
    """``grad_sums``: (sum dy, sum dy * xhat) per channel against float64, chunks spanning images (the
    stepped tile counters wrap), both layouts and bf16; two runs bitwise identical."""
    from convmixer_kernels.ops.batchnorm import MEAN, RSTD
    N, C, H, W = shape
    g = torch.Generator().manual_seed(act)
    a = torch.randn(N, C, H, W, generator=g)
    dy = torch.randn(N, C, H, W, generator=g)
    stats = torch.zeros(6, C)
    stats[MEAN] = torch.randn(C, generator=g) * 0.1
    stats[RSTD] = torch.rand(C, generator=g) + 0.5
    acts = [lambda t: torch.nn.functional.gelu(t), lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
            torch.relu]
    for dtype in (torch.float32, torch.bfloat16):
        a_, dy_ = a.to(dtype).double(), dy.to(dtype).double()
        xhat = (acts[act](a_) - stats[MEAN].double()[None, :, None, None]) * stats[RSTD].double()[None, :, None, None]
        ref = torch.stack([dy_.sum((0, 2, 3)), (dy_ * xhat).sum((0, 2, 3))])
        for fmt in (torch.contiguous_format, torch.channels_last):
            args = (dy.to(DEVICE, dtype).contiguous(memory_format=fmt), a.to(DEVICE, dtype).contiguous(memory_format=fmt),
                    stats.to(DEVICE), act)
            got = TD.grad_sums(*args)
            torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-3)
            assert torch.equal(got, TD.grad_sums(*args))
