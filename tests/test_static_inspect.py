"""``convmixer-kernels inspect`` (static prediction, not a measurement) and its CI guard.

Compilation for sm_90 needs Triton out of interpreter mode, so those tests run ``inspect`` in a
subprocess without TRITON_INTERPRET; they skip with the reason where ptxas/cuobjdump are absent.
The pieces that compile nothing (SASS parsing, the bounds, the eager traffic counter, the
saved-bytes count, the guard's comparison) run in-process.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from convmixer_kernels.static import guard, predict, sass, toolchain, traffic
from convmixer_kernels.static.ceilings import H200
from convmixer_kernels.static.launches import Shape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(REPO, "bench", "results", "static-sm90-1536-20-k9-p7.json")
_tools = [t for t in ("ptxas", "cuobjdump") if not toolchain.find(t)]
NEEDS_TOOLS = pytest.mark.skipif(bool(_tools), reason=f"{' and '.join(_tools)} not found: static inspection "
                                 "needs triton's bundled ptxas/cuobjdump or the CUDA toolkit")


def _inspect(*args, timeout=600, env_extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "convmixer_kernels", "inspect", "--backend", "triton", "--json", "-",
                          *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def small():
    # the CUDA-core depthwise kernels (bf16 k=5 would take the tensor-core path, whose launches the paper-shape
    # test below covers): the hand-counted floors here are theirs
    return _inspect("--dim", "64", "--depth", "2", "--batch", "2", "--image-size", "16", "--patch-size", "2",
                    "--kernel-size", "5", env_extra={"CONVMIXER_KERNELS_DW_PATH": "cuda_cores"})


KERNEL_FIELDS = {"registers", "spill_bytes", "smem_bytes", "blocks_per_sm", "occupancy", "mix_per_warp",
                 "instr_per_ffma", "issue_us", "fma_us", "tensor_us", "dram_us", "predicted_us", "bound", "floor_us",
                 "roofline_pct", "dram_bytes", "grid", "num_warps", "num_stages", "constexprs", "loops_matched"}


@NEEDS_TOOLS
def test_inspect_small_workload_has_every_field(small):
    r = small
    assert r["meta"]["label"] == "static prediction, not a measurement"
    assert {"commit", "tools", "ceilings", "assumptions"} <= set(r["meta"])
    assert r["meta"]["tools"]["ptxas"] and r["meta"]["tools"]["triton"]
    names = {(k["block"], k["kernel"]) for k in r["kernels"]}
    assert {("dw_block", "_conv_kernel"), ("dw_block", "_input_grad_kernel"), ("pw_block", "_gemm_kernel")} <= names
    for k in r["kernels"]:
        assert "compile_error" not in k, k
        assert KERNEL_FIELDS <= set(k), sorted(KERNEL_FIELDS - set(k))
        assert k["registers"] > 0 and k["predicted_us"] > 0 and k["floor_us"] >= 0 and k["mix_per_warp"]["total"] > 0
        assert 0 < k["roofline_pct"] <= 100.0 + 1e-6 and k["blocks_per_sm"] >= 1
        assert k["predicted_us"] == pytest.approx(max(k["issue_us"], k["fma_us"], k["tensor_us"], k["dram_us"]))
    blocks = {(b["block"], b["phase"]) for b in r["blocks"]}
    assert ("dw_block", "forward+backward (training)") in blocks and ("pw_block", "backward") in blocks
    assert r["step"]["predicted_ms"] > 0 and r["memory"]["saved_per_layer_fused_bytes"] > 0


@NEEDS_TOOLS
def test_conv_kernel_floor_by_hand(small):
    """The training-forward conv at N=2, C=64, 8x8, k=5, bf16: floor = max(bytes / BW, 2 * FMAs / FMA peak)."""
    k = next(k for k in small["kernels"] if k["kernel"] == "_conv_kernel" and k["phase"] == "forward (training)")
    n, c, h, ks = 2, 64, 8, 5
    unit = n * c * h * h * 2
    P = k["grid"][0]  # persistent programs; partials [3, P, C] float32
    moved = unit + ks * ks * c * 4 + c * 2 + unit + 3 * P * c * 4  # x, fp32 weight taps, bias; a, partials
    assert k["dram_bytes"] == moved
    fmas = n * c * h * h * ks * ks
    assert k["useful_fma"] == fmas
    assert k["floor_us"] == pytest.approx(max(moved / 4.3e12, 2 * fmas / 67e12) * 1e6)
    assert k["loops_matched"] and k["mix_per_warp"]["FFMA"] > 0


@NEEDS_TOOLS
def test_guard_default_launches_vs_committed_json():
    """CI guard: the paper shape's default launches, against bench/results (10% on predicted time)."""
    if not os.path.exists(COMMITTED):
        pytest.skip(f"{COMMITTED} is not committed yet")
    with open(COMMITTED) as f:
        committed = json.load(f)
    current = _inspect("--config", "1536/20-k9-p7", "--backend", "all")  # Triton and the CUDA extension
    problems = guard.compare(current, committed, tolerance=0.10)
    assert not problems, "static regression (static prediction, not a measurement):\n" + "\n".join(problems)


_PAPER_LAUNCHES = r"""
import json
from convmixer_kernels.static import launches, report, trips
cache, out = {}, []  # report's compile cache: a kernel launched by several blocks is compiled once
for op in report.OPS:
    for l in launches.capture(op, launches.Shape(64, 1536, 32, 9)):  # 1536/20-k9-p7, bf16, channels_last
        r = report.kernel_record(l, cache)
        out.append(dict({k: r.get(k) for k in ("block", "phase", "kernel", "loops", "loops_matched", "compile_error",
                                               "predicted_us", "mma_flops", "dram_bytes")},
                        plan=trips.plan_for(l.kernel, l.constexprs, l.args, l.grid) is not None))
print(json.dumps(out))
"""


@NEEDS_TOOLS
def test_every_paper_launch_has_a_plan_and_matched_loops():
    """Every kernel the Triton backend launches for 1536/20-k9-p7 (bf16: the tensor-core depthwise path) has a
    static/trips.py plan whose loops match the SASS loops; the tensor-core kernels' trips by hand: conv 9 tap rows
    (a 32-row tile is one 32-row image), no window-chunk loop (DENSE: W = BW = KC = 32, one chunk), dw 2048 / 32 row
    steps (DENSE: no W-tile or window-chunk loop)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _PAPER_LAUNCHES], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ks = json.loads(p.stdout.strip().splitlines()[-1])
    bad = [f"{k['block']} {k['phase']}: {k['kernel']} (plan {k['plan']}, loops matched {k['loops_matched']}"
           f"{', ' + k['compile_error'][:100] if k['compile_error'] else ''})" for k in ks
           if not k["plan"] or not k["loops_matched"] or k["compile_error"]]
    assert not bad, "launches without a plan or with unmatched SASS loops:\n" + "\n".join(bad)
    names = {k["kernel"] for k in ks}
    assert {"_tc_conv_kernel", "_tc_wgrad_kernel", "_da_kernel"} <= names, sorted(names)
    trip_tree = lambda loops: [(lp["trip"], trip_tree(lp["children"])) for lp in loops]  # noqa: E731
    for k in ks:
        if k["kernel"] == "_tc_conv_kernel":
            assert trip_tree(k["loops"]) == [(9.0, [])], k["phase"]
            assert k["mma_flops"] == 2.0 * 8 * 64 * 32 * 32 * 9 * 192 * 32  # BC*BM*KC*BW per dot, 9 dots/program
        if k["kernel"] == "_tc_wgrad_kernel":
            assert trip_tree(k["loops"]) == [(64.0, [])], k["phase"]
            assert k["mma_flops"] == 2.0 * 8 * 32 * 32 * 32 * 64 * 192 * 9
        if k["kernel"] in ("_tc_conv_kernel", "_tc_wgrad_kernel", "_da_kernel"):
            assert k["dram_bytes"] >= 2 * 64 * 1536 * 32 * 32 * 2 and k["predicted_us"] > 0


def _fixture_kernels():
    k = {"block": "dw_block", "phase": "backward", "kernel": "_input_grad_kernel", "candidate": False,
         "predicted_us": 100.0, "spill_bytes": 0, "smem_bytes": 4096}
    return {"kernels": [k, dict(k, kernel="_reduce_kernel", predicted_us=10.0)]}


def test_guard_names_the_regressing_kernel():
    committed = _fixture_kernels()
    same = copy.deepcopy(committed)
    same["kernels"][0]["predicted_us"] = 109.0  # within 10%
    assert guard.compare(same, committed) == []
    slow = copy.deepcopy(committed)
    slow["kernels"][0]["predicted_us"] = 111.0
    problems = guard.compare(slow, committed)
    assert len(problems) == 1 and "_input_grad_kernel" in problems[0] and "+11%" in problems[0]
    spill = copy.deepcopy(committed)
    spill["kernels"][1]["spill_bytes"] = 8
    spill["kernels"][1]["smem_bytes"] = 300 * 1024
    problems = guard.compare(spill, committed)
    assert any("_reduce_kernel spills 8 B" in p for p in problems) and any("shared memory" in p for p in problems)
    gone = {"kernels": committed["kernels"][:1]}
    assert any("_reduce_kernel is gone" in p for p in guard.compare(gone, committed))


SASS_TEXT = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R2 ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   FFMA R2, R3, R4, R2 ;
        /*0040*/               @P0 BRA 0x30 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
"""


def test_sass_loops_and_dynamic_mix():
    from convmixer_kernels.static import trips

    f = sass.parse(SASS_TEXT)[0]
    assert [(lp.start, lp.end) for lp in f.loops] == [(0x10, 0x50)] and len(f.loops[0].children) == 1
    assert trips.assign_trips(f.loops, [trips.Loop(3, [trips.Loop(5)])])
    mix = f.dynamic_mix()
    # outer body once per outer trip (3): FFMA@10, LDG@20, BRA@50; inner (FFMA@30, BRA@40) 3 x 5 times
    assert mix["FFMA"] == 3 + 15 and mix["LDG.128"] == 3 and mix["total"] == 1 + 3 * 3 + 15 * 2 + 1


def test_occupancy_and_bounds_by_hand():
    occ = predict.occupancy(registers=128, smem=4096, num_warps=4)
    assert occ.blocks_per_sm == 4 and occ.limiter == "registers" and occ.factor == 1.0  # 65536 / (128*128)
    one = predict.occupancy(registers=255, smem=98304, num_warps=8)
    assert one.blocks_per_sm == 1 and one.factor == pytest.approx(0.5)
    b = predict.bounds({"total": 1000, "FFMA": 100}, 4, 264, occ, fma=0, mma_flops=0, dram_bytes=4.3e6)
    assert b["issue_us"] == pytest.approx(4000 * 2 / (4 * 1.98e9) * 1e6)
    assert b["dram_us"] == pytest.approx(1.0) and b["fma_us"] == pytest.approx(100 * 4 * 264 * 64 / 67e12 * 1e6)


def test_eager_traffic_counter_by_hand():
    """The unfused depthwise block, forward (training) and backward, counted op by op on meta tensors."""
    s = Shape(batch=2, dim=8, size=6, kernel_size=3, dtype=torch.bfloat16)
    unit, C, k = 2 * 8 * 6 * 6 * 2, 8, 3
    t = traffic.eager_block_traffic("dw_block", s)
    f = {op: (r, w) for op, r, w in t["forward"]["ops"]}
    assert f["convolution"] == (unit + C * k * k * 2 + C * 2, unit)  # x, weight, bias -> out
    assert f["gelu"] == (unit, unit)
    # BN (fp32 parameters and running buffers): input, weight, bias, running mean/var -> out, save_mean, save_invstd
    assert f["native_batch_norm"] == (unit + 4 * C * 4, unit + 2 * C * 4)
    assert f["add"] == (2 * unit, unit)  # the residual
    assert f["add_"] == (8, 8)  # num_batches_tracked += 1 (int64)
    assert t["forward"]["bytes"] == sum(r + w for r, w in f.values()) and len(f) == 5
    assert round(t["forward"]["passes"]) == 9
    b = {op: (r, w) for op, r, w in t["backward"]["ops"]}
    assert b["gelu_backward"] == (2 * unit, unit) and b["convolution_backward"][1] == unit + C * k * k * 2 + C * 2


def test_eager_roofline_by_hand():
    """Eager at its roofline: each op at max(bytes / DRAM, arithmetic / its units' peak), the 1x1 conv on tensor
    cores (backward: two GEMMs), the depthwise conv on fp32 FMA (backward: dx and dw), elementwise ops bytes only."""
    s = Shape(batch=64, dim=1536, size=32, kernel_size=9, dtype=torch.bfloat16)
    M, C = 64 * 32 * 32, 1536
    eager = {"dw_block": {"forward": {"ops": [("convolution", 10, 20), ("gelu", 43e5, 0)]},
                          "backward": {"ops": [("convolution_backward", 1, 1)]}},
             "pw_block": {"forward": {"ops": [("convolution", 86e10, 0)]},
                          "backward": {"ops": [("convolution_backward", 0, 2)]}}}
    r = traffic.eager_roofline(eager, s, H200)
    dw_fma = 2.0 * M * C * 81 / 67e12 * 1e6
    gemm = 2.0 * M * C * C / 788e12 * 1e6
    assert r["dw_block"]["forward"] == pytest.approx(dw_fma + 1.0)  # compute-bound conv + 1 us of GELU traffic
    assert r["dw_block"]["backward"] == pytest.approx(2 * dw_fma)
    assert r["pw_block"]["forward"] == pytest.approx(max(gemm, 86e10 / 4.3e12 * 1e6)) == pytest.approx(200e3)
    assert r["pw_block"]["backward"] == pytest.approx(2 * gemm)


def test_saved_bytes_by_hand():
    """Eager depthwise block: conv saves x, GELU saves the conv output, BN its input and 2 fp32 stats."""
    s = Shape(batch=2, dim=8, size=6, kernel_size=3, dtype=torch.bfloat16)
    unit = 2 * 8 * 6 * 6 * 2
    nbytes, n = traffic.eager_saved("dw_block", s)
    assert nbytes == 3 * unit + 2 * 8 * 4 and n == 5
    # the counter on a plain function
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    nbytes, n = traffic.saved_bytes(lambda: torch.relu(x @ w), exclude=(w,))
    assert n == 2 and nbytes == (4 * 5 + 4 * 3) * 4  # x for mm (w excluded), relu's output


def test_ceilings_are_one_table():
    assert (H200.sms, H200.clock_hz, H200.dram_bytes_per_s, H200.tensor_bf16_flops, H200.fma_fp32_flops) == \
        (132, 1.98e9, 4.3e12, 788e12, 67e12)
    assert H200.l2_bytes == 60 * 2 ** 20 and H200.smem_per_sm == 228 * 1024 and H200.regs_per_sm == 65536
    assert H200.threads_per_sm == 2048


def test_tensor_bound_counts_the_last_partial_wave():
    """288 blocks on 132 SMs x 2 slots: the tensor-bound time is two full waves', the floor is not."""
    from convmixer_kernels.static import predict
    from convmixer_kernels.static.ceilings import H200

    occ = predict.Occupancy(blocks_per_sm=2, warps_per_sm=16, occupancy=0.25, factor=1.0, limiter="registers")
    flops = 2.0 * 1536 * 1536 * 65536
    ideal = flops / H200.tensor_bf16_flops * 1e6
    b = predict.bounds({"total": 0}, 8, 288, occ, 0.0, flops, 0.0)
    assert b["tensor_us"] == pytest.approx(ideal * 2 / (288 / 264)) and b["floor_us"] == pytest.approx(ideal)
    full = predict.bounds({"total": 0}, 8, 264 * 5, occ, 0.0, flops, 0.0)
    assert full["tensor_us"] == pytest.approx(ideal)


# ------------------------------------------------------------------ the CUDA extension's launches (plan.h + nvcc)

_cuda_missing = None
try:
    from convmixer_kernels.static import cuda_plans

    _cuda_missing = cuda_plans.missing_tools()
except Exception as e:  # pragma: no cover
    _cuda_missing = f"{type(e).__name__}: {e}"
NEEDS_CUDA_TOOLS = pytest.mark.skipif(bool(_cuda_missing), reason=f"CUDA extension inspection: {_cuda_missing}")


@pytest.fixture(scope="module")
def cuda_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cmk-static-cache"))


@NEEDS_CUDA_TOOLS
def test_cuda_planner_builds_and_its_grid_matches_a_hand_count(cuda_cache, monkeypatch):
    """plan.h through the g++-built planner, N=2, C=64, 8x8, k=5, bf16, channels_last, 132 SMs."""
    monkeypatch.setenv("CMK_STATIC_CACHE", cuda_cache)
    exe = cuda_plans.planner_binary()
    assert os.path.dirname(exe) == cuda_cache and os.access(exe, os.X_OK)
    pl = cuda_plans.plans(2, 64, 8, 8, 5, 5, "bf16", True)
    f, b, e = pl["forward"], pl["backward"], pl["elementwise"]
    # forward: 32 channels x 8x16 tile -> 1x1 tiles per image, 2 channel groups; K=5 compile-time path
    assert (f["tiles"], f["channel_groups"], f["blocks"], f["threads"], f["kernel_k"]) == (2, 2, 4, 256, 5)
    # smem: x halo 32 ch x (8+4) rows x 20 floats, weights 5x5 x (32+1), statistics 8 strips x 32 x 3
    assert f["smem_bytes"] == 4 * (32 * 12 * 20 + 25 * 33 + 8 * 32 * 3)
    # backward: 16 channels x 16x16 -> 2 tiles, 4 channel groups; 4*132 target blocks -> 2 groups of 1 tile
    assert (b["tiles"], b["channel_groups"], b["groups"], b["tiles_per_group"], b["blocks"]) == (2, 4, 2, 1, 8)
    assert b["error"] is None and not b["large_tile"]
    # elementwise: 32 slots x 8 channels (16-byte loads), 8 lanes; 128 positions -> one chunk
    assert (e["vec"], e["lanes"], e["channels_per_block"], e["tiles"], e["blocks"]) == (8, 8, 256, 1, 1)
    assert cuda_plans.plans(2, 64, 32, 32, 41, 41, "bf16", True)["backward"]["error"].startswith("the kernel is too wide")


@NEEDS_CUDA_TOOLS
def test_cuda_kernels_of_a_small_workload_get_predicted_times(cuda_cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["CMK_STATIC_CACHE"] = cuda_cache
    out = subprocess.run([sys.executable, "-m", "convmixer_kernels", "inspect", "--backend", "cuda", "--json", "-",
                          "--dim", "64", "--depth", "2", "--batch", "2", "--image-size", "16", "--patch-size", "2",
                          "--kernel-size", "5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    ks = r["cuda_extension"]["kernels"]
    assert [(k["phase"], k["kernel"]) for k in ks] == [
        ("forward (training)", "depthwise_forward_kernel"), ("forward (eval)", "depthwise_forward_kernel"),
        ("forward (training)", "batchnorm_combine_kernel"), ("forward (training)", "depthwise_apply_kernel"),
        ("backward", "depthwise_grad_reduce_kernel"), ("backward", "depthwise_backward_kernel")]
    plans = r["cuda_extension"]["plans"]
    for k in ks:
        assert k["backend"] == "cuda" and "error" not in k and "compile_error" not in k, k
        assert k["registers"] > 0 and k["predicted_us"] > 0 and k["mix_per_warp"]["total"] > 0 and k["loops_matched"]
        assert k["predicted_us"] == pytest.approx(max(k["issue_us"], k["fma_us"], k["tensor_us"], k["dram_us"]))
        assert 0 < k["roofline_pct"] <= 100.0 + 1e-6 and k["blocks_per_sm"] >= 1 and k["spill_bytes"] == 0
    assert ks[0]["grid"][0] == plans["forward"]["blocks"] and ks[-1]["grid"][0] == plans["backward"]["blocks"]
    # the activation and the training/eval epilogue are compile-time: each launch is the instance it runs
    assert ks[0]["instance"] == "depthwise_forward_kernel<Tile<true, 32, 8, 16, 16>, __nv_bfloat16, 5, StaticAct<(Act)0>, true>"
    assert ks[1]["instance"] == "depthwise_forward_kernel<Tile<true, 32, 8, 16, 16>, __nv_bfloat16, 5, StaticAct<(Act)0>, false>"
    conv = ks[0]
    assert conv["useful_fma"] == 2 * 64 * 8 * 8 * 25 and conv["mix_per_warp"]["FFMA"] > 0
    blocks = {b["phase"]: b for b in r["blocks"] if b.get("backend") == "cuda"}
    assert blocks["forward+backward (training)"]["predicted_us"] > 0
    assert blocks["backward"]["predicted_us"] == pytest.approx(sum(k["predicted_us"] for k in ks[4:]))
    assert r["cuda_extension"]["functions"] and r["cuda_extension"]["label"] == "static prediction, not a measurement"
