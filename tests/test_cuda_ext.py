"""The CUDA extension backend of the depthwise block (csrc/, convmixer_kernels/ops/cuda/depthwise.py).

Without a GPU this tests:
* the build switches of csrc/build_cuda.py, the missing-extension error, the version and
  architecture checks of convmixer_kernels/_cuda_ext.py;
* the kernels themselves, in the CPU emulator: csrc/ compiled with g++ and -DCMK_EMULATE runs
  every CUDA kernel as blocks of std::threads on CPU tensors (csrc/emulate/emulate.h), through
  the real binding and the real autograd/torch.library glue, against the float64 reference
  with the precision rule of design.md section 6;
* that every kernel source compiles with nvcc for sm_80 and sm_90 (.ci/compile_cuda.sh; slow).
On a machine with a GPU and the extension built, the same block tests also run on CUDA.
"""
from __future__ import annotations

import importlib.util
import functools
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from convmixer_kernels import _cuda_ext
from convmixer_kernels.ops.depthwise_block import depthwise_block_reference
from convmixer_kernels.verify import compare

import nvcc_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_cuda = _load_file("cmk_build_cuda", os.path.join(REPO, "csrc", "build_cuda.py"))
emulator = _load_file("cmk_emulator_build", os.path.join(REPO, "csrc", "emulate", "build.py"))


@pytest.fixture
def fresh_loader(monkeypatch):
    """A _cuda_ext that has not tried to import the extension yet (restored afterwards)."""
    monkeypatch.setattr(_cuda_ext, "_state", {"tried": False, "module": None, "error": None})
    return _cuda_ext


# ------------------------------------------------------------------ build switches


def _buildable(monkeypatch, torch_version="2.11.0+cu130", cuda="13.0", nvcc=True):
    monkeypatch.setattr(build_cuda, "torch_cuda_version", lambda: (torch_version, cuda))
    if not nvcc:
        monkeypatch.setattr(build_cuda, "find_cuda_home", lambda env: None)


def test_no_extension_without_cuda_torch(monkeypatch):
    _buildable(monkeypatch, torch_version="2.13.0+cpu", cuda=None)
    assert build_cuda.cuda_extension_build(force=False, env={}) == ([], {})


def test_force_without_cuda_torch_raises_naming_the_cause(monkeypatch):
    _buildable(monkeypatch, torch_version="2.13.0+cpu", cuda=None)
    with pytest.raises(build_cuda.CudaBuildError, match=r"FORCE_BUILD=1 .* CPU build"):
        build_cuda.cuda_extension_build(force=True, env={})
    with pytest.raises(build_cuda.CudaBuildError, match="CPU build"):  # the variable alone forces too
        build_cuda.cuda_extension_build(env={"CONVMIXER_KERNELS_FORCE_BUILD": "1"})


def test_no_extension_without_nvcc_and_force_names_nvcc(monkeypatch):
    _buildable(monkeypatch, nvcc=False)
    assert build_cuda.cuda_extension_build(force=False, env={}) == ([], {})
    with pytest.raises(build_cuda.CudaBuildError, match="nvcc"):
        build_cuda.cuda_extension_build(force=True, env={})


def test_no_extension_without_torch(monkeypatch):
    _buildable(monkeypatch, torch_version=None, cuda=None)
    assert build_cuda.cuda_extension_build(env={}) == ([], {})
    with pytest.raises(build_cuda.CudaBuildError, match="torch is not importable"):
        build_cuda.cuda_extension_build(force=True, env={})


def test_skip_wins_unless_forced(monkeypatch):
    _buildable(monkeypatch)
    calls = []
    monkeypatch.setattr(build_cuda, "why_not_buildable", lambda env: calls.append(env) or "probe was called")
    assert build_cuda.cuda_extension_build(env={"CONVMIXER_KERNELS_SKIP_CUDA_BUILD": "1"}) == ([], {})
    assert calls == []  # skipped before probing anything
    with pytest.raises(build_cuda.CudaBuildError, match="probe was called"):
        build_cuda.cuda_extension_build(env={"CONVMIXER_KERNELS_SKIP_CUDA_BUILD": "1",
                                             "CONVMIXER_KERNELS_FORCE_BUILD": "1"})


@pytest.mark.parametrize("text, archs", [("80;90", ["80", "90"]), ("8.0 9.0", ["80", "90"]),
                                         ("sm_86,sm_90a", ["86", "90a"]), (" 90;90 ", ["90"])])
def test_parse_archs(text, archs):
    assert build_cuda.parse_archs(text) == archs


@pytest.mark.parametrize("text", ["", "sm80x", "9", "ampere"])
def test_parse_archs_rejects_junk(text):
    with pytest.raises(build_cuda.CudaBuildError, match="CONVMIXER_KERNELS_CUDA_ARCHS"):
        build_cuda.parse_archs(text)


def test_gencode_has_sass_per_arch_and_portable_ptx():
    flags = build_cuda.gencode_flags(["80", "90a"])
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                     "-gencode=arch=compute_90,code=compute_90"]


def test_build_info_header_is_valid_c(tmp_path):
    info = {"torch": '2.11.0+cu130 "quoted"', "cuda": "13.0", "archs": "80;90", "ptx": "90", "nvcc": "13.0"}
    path = build_cuda.write_build_info_header(info, str(tmp_path))
    text = open(path).read()
    assert '#define CMK_BUILD_TORCH "2.11.0+cu130 \\"quoted\\""' in text
    assert '#define CMK_BUILD_ARCHS "80;90"' in text


@pytest.mark.skipif(build_cuda.find_cuda_home(os.environ) is None, reason="needs the CUDA toolkit (nvcc)")
def test_buildable_configuration_gives_one_extension(monkeypatch, tmp_path):
    """With a CUDA torch (simulated) and nvcc: the extension with every kernel source and the archs asked for."""
    _buildable(monkeypatch)
    monkeypatch.setattr(build_cuda, "GENERATED_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", build_cuda.find_cuda_home(os.environ))
    exts, cmdclass = build_cuda.cuda_extension_build(env={"CONVMIXER_KERNELS_CUDA_ARCHS": "86;90",
                                                          "PATH": os.environ.get("PATH", "")})
    (ext,) = exts
    assert ext.name == "convmixer_kernels._C" and "build_ext" in cmdclass
    kernels = sorted(os.path.relpath(s, REPO) for s in build_cuda.kernel_sources())
    assert len(kernels) >= 7 and sorted(s for s in ext.sources if s.endswith(".cu")) == kernels
    assert "csrc/binding.cpp" in ext.sources
    nvcc_flags = ext.extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_86,code=sm_86" in nvcc_flags and "-gencode=arch=compute_90,code=sm_90" in nvcc_flags
    header = open(os.path.join(tmp_path, "cmk_build_info.h")).read()
    assert '"2.11.0+cu130"' in header and '"86;90"' in header


# ------------------------------------------------------------------ loading the extension


def test_missing_extension_names_the_build_command(fresh_loader, monkeypatch):
    def not_built(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_cuda_ext.importlib, "import_module", not_built)
    error = fresh_loader.load_error()
    assert "not built" in error and _cuda_ext.BUILD_COMMAND in error
    assert _cuda_ext.BUILD_COMMAND == "CONVMIXER_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e ."
    with pytest.raises(RuntimeError, match="CONVMIXER_KERNELS_FORCE_BUILD=1 pip install --no-build-isolation -e ."):
        fresh_loader.extension()


def test_unloadable_extension_says_rebuild(fresh_loader, monkeypatch):
    def broken(name):
        raise ImportError("convmixer_kernels/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa")

    monkeypatch.setattr(_cuda_ext.importlib, "import_module", broken)
    error = fresh_loader.load_error()
    assert "undefined symbol" in error and "another torch" in error and _cuda_ext.BUILD_COMMAND in error


def _fake_extension(monkeypatch, **info):
    module = types.ModuleType("convmixer_kernels._C")
    module.build_info = lambda: dict(info)
    monkeypatch.setitem(sys.modules, "convmixer_kernels._C", module)
    return module


def test_version_mismatch_is_refused(fresh_loader, monkeypatch):
    _fake_extension(monkeypatch, torch="1.13.0+cu117", cuda="11.7", archs="80;90", ptx="90", emulated=False)
    error = fresh_loader.load_error()
    assert f"built against torch 1.13.0+cu117 but torch {torch.__version__} is running" in error
    assert _cuda_ext.BUILD_COMMAND in error
    with pytest.raises(RuntimeError, match="refusing"):
        fresh_loader.extension()


def test_cuda_version_mismatch_is_refused(fresh_loader, monkeypatch):
    _fake_extension(monkeypatch, torch=torch.__version__, cuda="11.7", archs="80", ptx="80", emulated=False)
    assert f"built against CUDA 11.7 but torch uses CUDA {torch.version.cuda}" in fresh_loader.load_error()


def test_local_version_tag_is_not_a_mismatch():
    info = dict(torch="2.11.0", cuda="13.0", emulated=False)
    assert _cuda_ext.build_mismatch(info, "2.11.0+cu130", "13.0") is None
    assert "CUDA 13.0" in _cuda_ext.build_mismatch(info, "2.11.0+cu128", "12.8")
    assert "torch 2.11.0" in _cuda_ext.build_mismatch(info, "2.12.0+cu130", "13.0")


def test_matching_build_loads(fresh_loader, monkeypatch):
    module = _fake_extension(monkeypatch, torch=torch.__version__, cuda=str(torch.version.cuda), archs="80;90",
                             ptx="90", emulated=False)
    assert fresh_loader.load_error() is None and fresh_loader.extension() is module


def test_emulator_build_is_never_loaded_as_the_extension(fresh_loader, monkeypatch):
    _fake_extension(monkeypatch, torch=torch.__version__, cuda=str(torch.version.cuda), emulated=True)
    assert "emulator" in fresh_loader.load_error()


@pytest.mark.parametrize("capability, ok", [((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True),
                                            ((10, 0), True), ((7, 5), False), ((12, 0), True)])
def test_arch_check(capability, ok):
    error = _cuda_ext.arch_error(capability, {"archs": "80;90", "ptx": "90"})
    assert (error is None) == ok
    if not ok:
        assert f'CONVMIXER_KERNELS_CUDA_ARCHS="{capability[0]}{capability[1]}"' in error
        assert _cuda_ext.BUILD_COMMAND in error


def test_arch_specific_code_runs_only_there():
    info = {"archs": "90a", "ptx": "90"}
    assert _cuda_ext.arch_error((9, 0), info) is None
    assert _cuda_ext.arch_error((8, 0), info) is not None


# ------------------------------------------------------------------ nvcc compile check


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_check.available(), reason="nvcc is not installed")
def test_every_kernel_source_compiles_with_nvcc():
    """.ci/compile_cuda.sh: every csrc/kernels/*.cu for sm_80 and sm_90, without torch headers (minutes;
    in a whole run it compiles beside the suite and this test runs last, see conftest.py)."""
    status, output = nvcc_check.result()
    assert status == 0, output[-8000:]
    for name in ("depthwise_fwd_bf16.cu", "depthwise_bwd_f32.cu", "depthwise_launch.cu"):
        assert f"ok    sm_80  csrc/kernels/{name} (-O0" in output
        assert f"ok    sm_90  csrc/kernels/{name} (-O3" in output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None or emulator.cuda_include_dir() is None,
                    reason="needs g++ and the CUDA toolkit headers")
def test_binding_compiles_against_torch_cuda_headers(tmp_path):
    """csrc/binding.cpp as the real build compiles it (not the emulator branch), syntax only.

    torch's CPU wheel ships the c10/cuda headers but not one CMake-generated file; a stub
    stands in for it when it is missing.
    """
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [str(tmp_path)] + include_paths() + [sysconfig.get_paths()["include"], emulator.cuda_include_dir(),
                                                   os.path.join(REPO, "csrc")]
    cmd = (["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H"] + [f"-I{d}" for d in includes]
           + [os.path.join(REPO, "csrc", "binding.cpp")])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr[-4000:]


# ------------------------------------------------------------------ the kernels (emulator or GPU)


@pytest.fixture(scope="module")
def emulated_module():
    reason = emulator.missing_requirement()
    if reason:
        pytest.skip(f"CPU emulator of the CUDA kernels unavailable: {reason}")
    return emulator.build()


@pytest.fixture(params=["emulator", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernels(request, monkeypatch):
    """(device, extension module): the CPU emulator build, or the real extension on a GPU."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the compiled kernels run in the CPU emulator only")
        monkeypatch.setattr(_cuda_ext, "_state", {"tried": False, "module": None, "error": None})
        if _cuda_ext.load_error():
            pytest.skip(_cuda_ext.load_error())
        return torch.device("cuda"), _cuda_ext.extension()
    module = request.getfixturevalue("emulated_module")
    monkeypatch.setattr(_cuda_ext, "_state", {"tried": True, "module": module, "error": None})
    return torch.device("cpu"), module


class _CudaBackend:
    """The depthwise block on the "cuda" backend, called as the reference is (the op contract's entry point)."""

    def __init__(self):
        from convmixer_kernels.ops import depthwise_block
        from convmixer_kernels.ops.cuda import depthwise

        self.depthwise_block_cuda = functools.partial(depthwise_block.depthwise_block_fused, backend="cuda")
        self.unsupported = lambda **config: depthwise_block.unsupported(**config) or depthwise.unsupported(**config)


def _dbc():
    return _CudaBackend()


def _randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _problem(N, C, H, W, KH, KW, seed=0):
    """Random input and parameters (float64, CPU): x, w, b, gamma, beta, running mean, running var."""
    return (_randn((N, C, H, W), seed), _randn((C, 1, KH, KW), seed + 1, 0.3), _randn(C, seed + 2, 0.5),
            1.0 + _randn(C, seed + 3, 0.2), _randn(C, seed + 4, 0.2), _randn(C, seed + 5, 0.1),
            0.5 + torch.rand(C, generator=torch.Generator().manual_seed(seed + 6), dtype=torch.float64))


def _run(fn, problem, *, dtype, device, layout, train, activation, momentum=0.1, x_view=None):
    """One forward + random-weighted backward: {y, dx, dw, db, dgamma, dbeta, running_mean, running_var}.

    x, w, b run in ``dtype``; BatchNorm parameters and buffers stay float32 (float64 for the
    float64 reference), as under autocast.
    """
    x, w, b, g, beta, rm, rv = problem
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = x.to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if x_view is not None:
        x = x_view(x)
    x.requires_grad_(True)
    w, b = (t.to(device, dtype).requires_grad_(True) for t in (w, b))
    g, beta = (t.to(device, bn_dtype).requires_grad_(True) for t in (g, beta))
    rm, rv = (t.to(device, bn_dtype) for t in (rm, rv))
    y = fn(x, w, b, g, beta, rm, rv, train, momentum, 1e-5, activation=activation, padding="same")
    dy = _randn(y.shape, 99).to(device, y.dtype)
    (y * dy).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad, "dgamma": g.grad, "dbeta": beta.grad,
            "running_mean": rm, "running_var": rv}


def _check_precision(problem, *, dtype, device, layout, train, activation, x_view=None):
    kw = dict(device=device, layout=layout, train=train, activation=activation, x_view=x_view)
    fused = _run(_dbc().depthwise_block_cuda, problem, dtype=dtype, **kw)
    reference = _run(depthwise_block_reference, problem, dtype=dtype, **kw)
    ref64 = _run(depthwise_block_reference, problem, dtype=torch.float64, **kw)
    rows = [compare(name, fused[name], reference[name], ref64[name], dtype) for name in ref64]
    bad = [f"{r.name}: |fused-ref64| {r.err_fused:.3e} > bound {r.bound:.3e} (|torch-ref64| {r.err_reference:.3e})"
           for r in rows if not r.ok]
    assert not bad, "\n".join(bad)
    return fused


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (N, C, H, W, KH, KW, layout, train, activation, dtype): both layouts, every activation and dtype,
# k = 1..9 on the compile-time paths and even/rectangular/large k on the general one, kernels
# larger than the map, channel counts that are not multiples of the 32-channel block or the
# 16-byte vector, and training and eval.
BLOCK_CASES = [
    (2, 8, 7, 9, 3, 3, "nchw", True, "gelu", F32),
    (2, 8, 7, 9, 3, 3, "channels_last", True, "gelu", F32),
    (2, 16, 6, 5, 9, 9, "channels_last", True, "gelu_tanh", BF16),
    (1, 12, 5, 6, 9, 9, "nchw", False, "relu", F32),
    (2, 5, 6, 7, 4, 4, "nchw", True, "relu", F32),
    (2, 6, 6, 7, 2, 5, "channels_last", True, "gelu", F16),
    (1, 32, 5, 6, 1, 1, "channels_last", False, "gelu", BF16),
    (2, 24, 7, 6, 5, 5, "channels_last", False, "gelu_tanh", F16),
    (2, 3, 12, 11, 7, 7, "nchw", True, "gelu", BF16),
    (2, 36, 4, 5, 7, 7, "channels_last", True, "relu", F32),
    (1, 4, 3, 4, 6, 6, "channels_last", True, "gelu", F32),  # even k larger than the map
]


@pytest.mark.parametrize("N, C, H, W, KH, KW, layout, train, activation, dtype", BLOCK_CASES)
def test_block_matches_float64_reference(kernels, N, C, H, W, KH, KW, layout, train, activation, dtype):
    device, _ = kernels
    fused = _check_precision(_problem(N, C, H, W, KH, KW), dtype=dtype, device=device, layout=layout, train=train,
                             activation=activation)
    assert fused["y"].is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                    else torch.contiguous_format)


def test_large_kernel_runs_in_row_chunks(kernels):
    """k = 31 does not fit shared memory whole: the kernels loop over chunks of kernel rows."""
    device, ext = kernels
    assert ext.config_error(1, 8, 6, 6, 31, 31, True) == ""
    _check_precision(_problem(1, 8, 6, 6, 31, 31), dtype=F32, device=device, layout="channels_last", train=True,
                     activation="gelu")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_strided_input_cut_from_a_larger_tensor(kernels, layout):
    """Non-dense input (a crop and a channel slice): the kernels read it through its strides."""
    device, _ = kernels
    problem = list(_problem(2, 9, 7, 8, 3, 3))
    big = _randn((2, 12, 9, 11), 7)
    problem[0] = big  # cropped below to [2, 9, 7, 8]
    _check_precision(problem, dtype=F32, device=device, layout=layout, train=True, activation="gelu",
                     x_view=lambda x: x[:, 1:10, 1:8, 2:10])


def test_backward_groups_loop_over_several_tiles(kernels):
    """The dW partials of consecutive tiles accumulate in one slot per block: more tiles than blocks."""
    device, ext = kernels
    x, w, b, *_ = _problem(2, 8, 17, 17, 3, 3)
    x = x.float().to(device).contiguous(memory_format=torch.channels_last)
    w, b = w.float().to(device), b.float().to(device)
    a, _ = ext.forward(x, w, b, None, None, 0, 1, 1, True)
    ones, zeros = torch.ones(8, device=device), torch.zeros(8, device=device)
    dy = _randn(x.shape, 5).float().to(device)
    _, dw_part, db_part = ext.backward(dy, a, x, w, zeros, ones, zeros, zeros, 0, 1, 1, False)
    tiles = 2 * 3 * 3  # N x ceil(17 / 8) x ceil(17 / 8)
    assert dw_part.shape[0] < tiles  # each block visits several tiles
    xd = x.double().requires_grad_(True)
    ad = a.double().requires_grad_(True)
    wd, bd = w.double().requires_grad_(True), b.double().requires_grad_(True)
    da = torch.autograd.grad(F.gelu(ad), ad, dy.double())[0]
    gw, gb = torch.autograd.grad(F.conv2d(xd, wd, bd, padding=1, groups=8), (wd, bd), da)
    torch.testing.assert_close(dw_part.sum((0, 1)).double(), gw[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db_part.sum((0, 1)).double(), gb, rtol=1e-5, atol=1e-5)


def test_batch_statistics_partials_follow_the_shared_format(kernels):
    """[3, T, C] (count, mean, M2) per tile; combine == ops.batchnorm.finalize_reference's tile order."""
    from convmixer_kernels.ops.batchnorm import finalize_reference

    device, ext = kernels
    x, w, b, *_ = _problem(2, 5, 9, 10, 3, 3)
    x, w, b = (t.float().to(device) for t in (x, w, b))
    a, partials = ext.forward(x, w, b, None, None, 2, 1, 1, True)
    assert partials.shape[0] == 3 and partials.shape[2] == 5 and partials.shape[1] >= 2
    g = F.relu(a.double())
    assert torch.equal(partials[0].sum(0).double(), torch.full((5,), 2.0 * 9 * 10, dtype=torch.float64))
    combined = ext.combine(partials)
    for got, want in zip(finalize_reference(combined, None, None, 1e-5), finalize_reference(partials, None, None, 1e-5)):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(combined[1, 0].double(), g.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(combined[2, 0].double(), g.var((0, 2, 3), unbiased=False) * 180, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_no_conv_bias_no_batchnorm_affine(kernels, train):
    """bias=None and affine=False (gamma, beta None) take the same kernels."""
    device, _ = kernels
    x, w, _b, _g, _beta, rm, rv = (t.float().to(device) for t in _problem(2, 6, 5, 6, 3, 3))
    results = []
    for fn in (_dbc().depthwise_block_cuda, depthwise_block_reference):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        rmi, rvi = rm.clone(), rv.clone()
        y = fn(xi, wi, None, None, None, rmi, rvi, train, 0.1, 1e-5, activation="gelu_tanh", padding="same")
        y.backward(_randn(y.shape, 4).float().to(device))
        results.append((y, xi.grad, wi.grad, rmi, rvi))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_deterministic(kernels):
    device, _ = kernels
    problem = _problem(2, 16, 9, 10, 5, 5)
    kw = dict(dtype=BF16, device=device, layout="channels_last", train=True, activation="gelu")
    first, second = _run(_dbc().depthwise_block_cuda, problem, **kw), _run(_dbc().depthwise_block_cuda, problem, **kw)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_output_gradient_in_another_layout(kernels):
    """A channels_last input with an NCHW output gradient (autograd may hand either)."""
    device, _ = kernels
    dbc = _dbc()
    x, w, b, g, beta, rm, rv = (t.float().to(device) for t in _problem(2, 8, 6, 7, 3, 3))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    y = dbc.depthwise_block_cuda(x, w, b, g, beta, rm.clone(), rv.clone(), True, 0.1, 1e-5, activation="gelu",
                                 padding="same")
    y_ref = depthwise_block_reference(ref_x, w, b, g, beta, rm.clone(), rv.clone(), True, 0.1, 1e-5,
                                      activation="gelu", padding="same")
    dy = _randn(y.shape, 3).float().to(device).contiguous()  # NCHW
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)


def test_nan_propagates_like_the_reference(kernels):
    device, _ = kernels
    x, w, b, g, beta, rm, rv = (t.float().to(device) for t in _problem(1, 4, 6, 6, 3, 3))
    x[0, 1, 2, 3] = float("nan")
    args = (x, w, b, g, beta, rm, rv, False, 0.0, 1e-5)  # eval: y stays finite away from the NaN
    y = _dbc().depthwise_block_cuda(*args, activation="gelu", padding="same")
    y_ref = depthwise_block_reference(*args, activation="gelu", padding="same")
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y).any()


def _conv_reference(x, w, b, pad_top, pad_left):
    """float64 a = conv(x, w) + b with the 'same' padding (pad_top, pad_left) on the left/top side."""
    KH, KW = w.shape[2:]
    padded = F.pad(x.double(), (pad_left, KW - 1 - pad_left, pad_top, KH - 1 - pad_top))
    return F.conv2d(padded, w.double(), b.double(), groups=x.shape[1])


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


# Every kernel size 1..31 on both layouts (odd and even, k > H and W; channels_last k >= 13 takes
# the 8-channel large tile), plus rectangular kernels; float32 here, 16-bit dtypes below.
KERNEL_SIZES = [(k, k) for k in range(1, 32)] + [(3, 7), (9, 2), (13, 31), (31, 12)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("KH, KW", KERNEL_SIZES)
def test_conv_kernels_every_kernel_size(kernels, layout, KH, KW):
    device, ext = kernels
    _check_conv_kernels(ext, device, layout, KH, KW)


def test_nchw_huge_kernel_runs_in_row_chunks(kernels):
    """NCHW k = 81 does not fit shared memory whole: forward and backward loop over kernel-row chunks."""
    device, ext = kernels
    assert ext.config_error(1, 10, 5, 7, 81, 81, False) == ""
    _check_conv_kernels(ext, device, "nchw", 81, 81)


def _check_conv_kernels(ext, device, layout, KH, KW):
    """Binding-level forward (a) and backward (dx, dW, dB partials) against float64, float32 inputs."""
    N, C, H, W = 1, 10, 5, 7  # C: not a multiple of the 8- or 32-channel block
    x, w, b, *_ = _problem(N, C, H, W, KH, KW, seed=KH * 37 + KW)
    x, w, b = (t.float().to(device) for t in (x, w, b))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    pt, pl = (KH - 1) // 2, (KW - 1) // 2
    dy = _randn(x.shape, 11).float().to(device)
    coef = (1.0 + _randn(C, 12, 0.3)).float().to(device)
    zeros = torch.zeros(C, device=device)
    a, _ = ext.forward(x, w, b, None, None, 0, pt, pl, True)
    dx, dw_part, db_part = ext.backward(dy, a, x, w, zeros, coef, zeros, zeros, 0, pt, pl, False)
    assert dw_part.shape[2:] == (C, KH, KW) and db_part.shape[2:] == (C,)
    a_ref = _conv_reference(x, w, b, pt, pl)
    dx_ref, dw_ref, db_ref = _conv_backward_reference_given_a(x, w, a, dy, coef, pt, pl)  # the backward reads this a
    assert _rel(a, a_ref) < 2e-6
    assert _rel(dx, dx_ref) < 2e-6
    assert _rel(dw_part.sum((0, 1)), dw_ref) < 2e-6
    assert _rel(db_part.sum((0, 1)), db_ref) < 2e-6
    assert dx.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _conv_backward_reference_given_a(x, w, a, dy, coef_dy, pad_top, pad_left):
    """float64 (dx, dw, db) from the kernel's own stored a (so only the backward's arithmetic is compared)."""
    KH, KW = w.shape[2:]
    ad = a.double().requires_grad_(True)
    da = torch.autograd.grad(F.gelu(ad), ad, dy.double() * coef_dy.double().view(1, -1, 1, 1))[0]
    xd = x.double().requires_grad_(True)
    wd = w.double().requires_grad_(True)
    bd = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    out = F.conv2d(F.pad(xd, (pad_left, KW - 1 - pad_left, pad_top, KH - 1 - pad_top)), wd, bd, groups=x.shape[1])
    gx, gw, gb = torch.autograd.grad(out, (xd, wd, bd), da)
    return dy.double() + gx, gw[:, 0], gb


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("k", [4, 9, 17, 31])
def test_conv_kernels_half_precision(kernels, dtype, layout, k):
    """16-bit storage, fp32 arithmetic: within a few storage roundings of float64 (C = 16: vector loads)."""
    device, ext = kernels
    N, C, H, W = 1, 16, 6, 5
    x, w, b, *_ = _problem(N, C, H, W, k, k, seed=k)
    x, w, b = (t.to(device, dtype) for t in (x, w, b))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    pt = (k - 1) // 2
    dy = _randn(x.shape, 13).to(device, dtype)
    coef = torch.ones(C, device=device)
    zeros = torch.zeros(C, device=device)
    a, _ = ext.forward(x, w, b, None, None, 0, pt, pt, True)
    dx, dw_part, db_part = ext.backward(dy, a, x, w, zeros, coef, zeros, zeros, 0, pt, pt, False)
    a_ref = _conv_reference(x, w, b, pt, pt)
    dx_ref, dw_ref, db_ref = _conv_backward_reference_given_a(x, w, a, dy, coef, pt, pt)
    eps = 2.0 ** -8 if dtype == BF16 else 2.0 ** -11  # one storage rounding
    assert _rel(a, a_ref) < 2 * eps
    assert _rel(dx, dx_ref) < 2 * eps
    assert _rel(dw_part.sum((0, 1)), dw_ref) < 1e-5  # fp32 partials of exactly stored inputs
    assert _rel(db_part.sum((0, 1)), db_ref) < 1e-5


@pytest.mark.parametrize("dtype, train", [(F32, True), (BF16, True), (F32, False), (F16, False)])
def test_nchw_vector_epilogues(kernels, dtype, train):
    """W = 40: full strips take the 16-byte epilogues, the strip past the map's edge the scalar one."""
    device, _ = kernels
    _check_precision(_problem(1, 3, 5, 40, 5, 5), dtype=dtype, device=device, layout="nchw", train=train,
                     activation="gelu")


@pytest.mark.parametrize("layout, k, N, H, W, tiles", [
    ("channels_last", 3, 3, 33, 17, 3 * 3 * 2),   # 16-channel 16x16 tile, k = 3 (registers, compile-time k)
    ("channels_last", 9, 3, 33, 17, 3 * 3 * 2),
    ("channels_last", 10, 3, 33, 17, 3 * 3 * 2),  # general path, partials added per tile
    ("channels_last", 31, 3, 20, 18, 3 * 2 * 2),  # 8-channel tile, one pass, registers
    ("nchw", 9, 3, 33, 20, 3 * 3 * 1),
    ("nchw", 31, 3, 33, 20, 3 * 3 * 1),
])
def test_backward_blocks_accumulate_several_tiles_deterministically(kernels, layout, k, N, H, W, tiles):
    """Every backward path with more tiles than blocks: bitwise equal runs, partials sum to float64's dW, dB."""
    device, ext = kernels
    x, w, b, *_ = _problem(N, 8, H, W, k, k, seed=k)
    x, w, b = x.float().to(device), w.float().to(device), b.float().to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    pt = (k - 1) // 2
    a, _ = ext.forward(x, w, b, None, None, 0, pt, pt, True)
    dy = _randn(x.shape, 5).float().to(device)
    ones, zeros = torch.ones(8, device=device), torch.zeros(8, device=device)
    runs = [ext.backward(dy, a, x, w, zeros, ones, zeros, zeros, 0, pt, pt, False) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    dx_ref, dw_ref, db_ref = _conv_backward_reference_given_a(x, w, a, dy, ones, pt, pt)
    dx, dw_part, db_part = runs[0]
    assert dw_part.shape[0] < tiles  # each block visits several tiles
    assert _rel(dx, dx_ref) < 2e-6 and _rel(dw_part.sum((0, 1)), dw_ref) < 2e-6 and _rel(db_part.sum((0, 1)), db_ref) < 2e-6


def test_channels_last_backward_never_chunks_kernel_rows(kernels):
    """channels_last runs the whole kernel in one pass (k <= 31); k = 32 would need a second pass."""
    _, ext = kernels
    assert ext.config_error(1, 8, 6, 6, 31, 31, True) == ""
    assert "too wide" in ext.config_error(1, 8, 6, 6, 32, 32, True)


def test_combine_tree_matches_the_sequential_order(kernels):
    """The parallel fixed-shape combine: the float64 totals of (count, mean, M2), bitwise stable run to run."""
    device, ext = kernels
    T, C = 1000, 37  # not a multiple of the combine's slices or channel block
    g = torch.Generator().manual_seed(3)
    count = torch.randint(1, 65, (T, C), generator=g).float()
    mean = torch.randn(T, C, generator=g) * 3 + 1
    m2 = torch.rand(T, C, generator=g) * count
    partials = torch.stack([count, mean, m2]).to(device)
    out = ext.combine(partials)
    assert out.shape == (3, 1, C) and torch.equal(out, ext.combine(partials))
    n = count.double().sum(0)
    mu = (count.double() * mean.double()).sum(0) / n
    total_m2 = m2.double().sum(0) + (count.double() * (mean.double() - mu) ** 2).sum(0)
    torch.testing.assert_close(out[0, 0].double(), n)
    torch.testing.assert_close(out[1, 0].double(), mu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[2, 0].double(), total_m2, rtol=1e-5, atol=1e-3)


def test_cpu_tensors_are_refused_before_the_device_guard(kernels):
    """A tensor on the wrong device gets a message naming the argument and its device."""
    device, ext = kernels
    wrong = torch.device("meta") if device.type == "cpu" else torch.device("cpu")
    x = torch.randn(1, 4, 5, 5, device=wrong)
    w = torch.randn(4, 1, 3, 3, device=wrong)
    with pytest.raises(RuntimeError, match=rf"the input must .* got .*{wrong.type}"):
        ext.forward(x, w, None, None, None, 0, 1, 1, True)
    with pytest.raises(RuntimeError, match=rf"the statistics partials must .* got .*{wrong.type}"):
        ext.combine(torch.zeros(3, 2, 4, device=wrong))
    with pytest.raises(RuntimeError, match=rf"the pre-activation a must .* got .*{wrong.type}"):
        ext.grad_reduce(x, x, torch.zeros(4, device=wrong), 0)


# ------------------------------------------------------------------ errors and fallbacks


def test_binding_errors_name_the_problem(kernels):
    device, ext = kernels
    x = torch.randn(2, 4, 5, 5, device=device)
    w = torch.randn(4, 1, 3, 3, device=device)
    with pytest.raises(RuntimeError, match=r"dtype Double; the CUDA kernels take float32, float16 or bfloat16"):
        ext.forward(x.double(), w.double(), None, None, None, 0, 1, 1, True)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[C, 1, KH, KW\] with C = 4, got \[3, 1, 3, 3\]"):
        ext.forward(x, w[:3], None, None, None, 0, 1, 1, True)
    with pytest.raises(RuntimeError, match=r"4-D \[N, C, H, W\], got shape \[4, 5, 5\]"):
        ext.forward(x[0], w, None, None, None, 0, 1, 1, True)
    with pytest.raises(RuntimeError, match=r"the weight has dtype BFloat16 but the input has dtype Float"):
        ext.forward(x, w.bfloat16(), None, None, None, 0, 1, 1, True)
    with pytest.raises(RuntimeError, match="too wide"):
        ext.forward(x.contiguous(memory_format=torch.channels_last), torch.randn(4, 1, 81, 81, device=device), None,
                    None, None, 0, 40, 40, True)


def test_unsupported_reasons(kernels):
    device, _ = kernels
    dbc = _dbc()
    from convmixer_kernels.ops.batchnorm import BatchNormCall

    bn = BatchNormCall(None, None, None, None, True, 0.1, 1e-5)
    x = torch.randn(2, 4, 5, 5, device=device)
    w = torch.randn(4, 1, 3, 3, device=device)
    ok = dict(weight=w, bn=bn, activation="gelu", padding="same")
    assert dbc.unsupported(x=x, compute_dtype=x.dtype, **ok) is None
    assert "float64" in dbc.unsupported(x=x.double(), compute_dtype=torch.float64, **ok)
    assert "empty" in dbc.unsupported(x=x[:0], compute_dtype=x.dtype, **ok)
    wide = dict(ok, weight=torch.randn(4, 1, 41, 41, device=device))
    assert "too wide" in dbc.unsupported(x=x.contiguous(memory_format=torch.channels_last), compute_dtype=x.dtype,
                                         **wide)
    assert dbc.unsupported(x=x, compute_dtype=x.dtype, **wide) is None  # NCHW tiles are narrower per channel
    assert "does not keep" in dbc.unsupported(x=x, compute_dtype=x.dtype, **dict(ok, padding=(0, 0)))


def test_unsupported_without_extension_names_the_build_command(fresh_loader, monkeypatch):
    def not_built(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_cuda_ext.importlib, "import_module", not_built)
    from convmixer_kernels.ops.batchnorm import BatchNormCall

    dbc = _dbc()

    x = torch.randn(2, 4, 5, 5)
    reason = dbc.unsupported(x=x, weight=torch.randn(4, 1, 3, 3), bn=BatchNormCall(None, None, None, None, True, 0.1,
                                                                                    1e-5),
                             compute_dtype=x.dtype, activation="gelu", padding="same")
    assert _cuda_ext.BUILD_COMMAND in reason


# ------------------------------------------------------------------ static (sm_90 SASS): the prologue's kernels


def _static_cuda_missing():
    try:
        from convmixer_kernels.static import cuda_plans

        return cuda_plans.missing_tools()
    except Exception as e:  # noqa: BLE001 (a reason to skip, whatever it is)
        return f"{type(e).__name__}: {e}"


@pytest.mark.slow
@pytest.mark.skipif(bool(_static_cuda_missing()), reason=f"static CUDA inspection: {_static_cuda_missing()}")
@pytest.mark.parametrize("k, layout", [(31, "channels_last"), (9, "nchw")])
def test_static_prologue_lives_in_its_own_kernels(k, layout):
    """The default conv kernels hold no prologue code: a runtime switch at staging cost them 0.1-1.3% in sm_90
    instructions, and static/cuda_plans.py once matched its staging loop as the backward's da staging (CUDA
    backward, 64x1536x32x32 bf16 k=31: 15634 -> 19294 us predicted). The *_prologue_kernel instances stage x
    through it alone: one prologue loop with trips, every loop matched by role, no spills. Static sm_90
    prediction (nvcc, no GPU)."""
    from convmixer_kernels.static import cuda_plans, report

    shape = report.Workload(kernel_size=k, layout=layout).shape()
    for prologue in (False, True):
        ls, pl = cuda_plans.launches(shape, "bf16", prologue=prologue)
        conv = [l for l in ls if l.role in ("forward", "backward")]
        assert all(("prologue" in l.kernel) == prologue for l in conv)
        assert len(conv) == (2 if prologue else 3)  # no eval forward with a prologue
        compiled = cuda_plans.compile_instances([l.instance for l in conv])
        for l in conv:
            c, func = compiled[l.instance]
            assert cuda_plans.cuda_trips(func, l, shape, pl["vec_ok"]), f"{l.instance}: a loop without a role"
            assert c.resources.spill_bytes == 0, f"{l.instance} spills {c.resources.spill_bytes} B"
            pro = [lp for lp in func.all_loops() if cuda_plans._prologue(func, lp)]  # outer loops first
            if prologue:
                assert pro and pro[0].trip > 0, l.instance
            else:
                assert not pro, f"{l.instance} holds the prologue's staging loop"


@pytest.mark.slow
@pytest.mark.skipif(bool(_static_cuda_missing()), reason=f"static CUDA inspection: {_static_cuda_missing()}")
def test_static_default_kernels_are_compiled_per_activation():
    """The default kernels take the activation (and the forward its training/eval epilogue) as template arguments:
    each launch is an instance holding only the code it runs. With the runtime switch every per-element loop held all
    three activations (sm_90, 1536/20 bf16 channels_last apply: 627 instructions per 8 elements, 327 with GELU alone);
    here a ReLU instance's elementwise loops hold no special-function (MUFU) instruction while GELU's do, every loop
    has a role, and no default instance spills. Static sm_90 (nvcc, no GPU)."""
    from convmixer_kernels.ops.activation import ACT_CODE
    from convmixer_kernels.static import cuda_plans, report

    launches = {}
    for act in ACT_CODE:
        shape = report.Workload(kernel_size=9, activation=act).shape()
        ls, pl = cuda_plans.launches(shape, "bf16")
        launches[act] = (shape, pl, [l for l in ls if l.role != "combine"])
    compiled = cuda_plans.compile_instances([l.instance for _, _, ls in launches.values() for l in ls])
    for act, (shape, pl, ls) in launches.items():
        fwd = [l for l in ls if l.role == "forward"]
        assert [l.instance.endswith(", true>") for l in fwd] == [True, False], [l.instance for l in fwd]
        for l in ls:
            assert f"StaticAct<(Act){ACT_CODE[act]}>" in l.instance, l.instance
            c, func = compiled[l.instance]
            assert cuda_plans.cuda_trips(func, l, shape, pl["vec_ok"]), f"{l.instance}: a loop without a role"
            assert c.resources.spill_bytes == 0, f"{l.instance} spills {c.resources.spill_bytes} B"
            if l.role in ("apply", "grad_reduce"):
                (loop,) = [lp for lp in func.loops if lp.trip > 1]  # the per-position loop
                mufu = sum(1 for ins in func.instrs if loop.start <= ins.addr <= loop.end and ins.cls == "MUFU")
                assert (mufu == 0) == (act == "relu"), f"{l.instance}: {mufu} MUFU in its loop"
