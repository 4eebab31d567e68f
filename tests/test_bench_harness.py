"""The benchmark harness (bench/bench_harness/) on the CPU: the precision check that gates every
benchmark, the conv alone's fused provider, the cost model, run_case's record with the GPU timer
replaced, the profile sweep's bookkeeping and table, result files; and the commands' one-line error
where bench/ is missing (an installed wheel). Nothing here times anything."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from convmixer_kernels.cli import main
from convmixer_kernels.commands.bench import import_harness

harness = import_harness("tests")  # bench/ on sys.path, as `convmixer-kernels profile` puts it
assert harness is not None, "bench/bench_harness/ is missing from this checkout"


# ------------------------------------------------------------------ the profile sweep's table and plot

def test_profile_table_and_plot(tmp_path):
    """Speedup over cuDNN is eager channels_last's time over the provider's, per point."""
    profile = harness.sweep  # the table and plot of `convmixer-kernels profile`

    def rec(provider, k, ms):
        return {"workload": "dwconv", "mode": "fwd", "dtype": "bf16", "batch": 64, "dim": 1536, "size": 32,
                "kernel_size": k, "provider": provider, "median_ms": ms, "gbps": 1.0, "tflops": 1.0,
                "roofline_pct": 1.0}

    records = [rec("eager-cl", 9, 6.0), rec("fused-triton", 9, 1.5), rec("eager-cl", 31, 30.0),
               rec("fused-triton", 31, 2.0)]
    records.append(dict(rec("fused-cuda", 31, 0), status="n/a: not built"))
    del records[-1]["median_ms"]
    table = profile.format_table(records)
    lines = table.splitlines()
    assert lines[3].endswith("4.00x") and lines[5].endswith("15.00x") and lines[6].endswith("n/a: not built")
    msg = profile.plot(records, str(tmp_path / "p.png"))
    assert os.path.exists(tmp_path / "p.png") or "matplotlib is not installed" in msg
    assert profile._ints("3-31") == list(range(3, 32, 2)) and profile._ints("3,9") == [3, 9]


# ------------------------------------------------------------------ the benchmark's own checks (CPU)

def test_bench_precision_check_catches_a_wrong_provider():
    """The check that gates every benchmark passes the reference's other forms and fails a wrong one."""
    from bench_harness.workloads import Workload, check, prepare, reference_snapshots

    w = Workload("dw_block", "fwd+bwd", dim=8, batch=2, size=6, kernel_size=3, dtype="bf16")
    reference = w.build_reference(seed=1)
    inputs = w.make_inputs("cpu", seed=2)
    refs = reference_snapshots(w, reference, inputs, "cpu")
    for provider in ("eager-cl", "fused-torch", "fused-torch-cl"):
        ok, worst, table = check(prepare(w, provider, reference, "cpu"), inputs, *refs)
        assert ok, f"{provider}:\n{table}"
    wrong = prepare(w, "fused-torch", reference, "cpu")
    module = wrong.call
    wrong.call = lambda x: module(x) * 1.02
    ok, worst, table = check(wrong, inputs, *refs)
    assert not ok and worst > 1 and "output" in table


def test_bench_fused_provider_without_kernels_is_not_applicable():
    """A fused provider with no kernel for the workload is a skip with the reason, never a silent reference.

    (The conv alone used to name a ``depthwise_conv`` op no backend registers; its fused provider is
    now the fused eval block, forward only, so its backward is what has no fused kernel.)"""
    from bench_harness.workloads import NotApplicable, Workload, prepare

    w = Workload("dwconv", "fwd+bwd", dim=8, batch=2, size=6, kernel_size=3)
    with pytest.raises(NotApplicable, match="no fused backward"):
        prepare(w, "fused-triton", w.build_reference(), "cpu")
    with pytest.raises(ValueError, match="unknown provider"):
        prepare(w, "fast", w.build_reference(), "cpu")


def test_cost_model_uses_the_fused_budgets():
    from bench_harness.roofline import H100, block_cost

    n, c, h, k = 64, 1536, 32, 9
    unit = n * c * h * h * 2
    fwd = block_cost("dw_block", n, c, h, h, k, 2, training=True, backward=False)
    both = block_cost("dw_block", n, c, h, h, k, 2, training=True, backward=True)
    assert fwd.bytes == 5 * unit and both.bytes == 11 * unit  # design.md section 4: 5 forward, 6 backward
    assert fwd.flops == 2 * n * h * h * c * k * k
    pw = block_cost("pw_block", n, c, h, h, 1, 2, training=True, backward=False)
    assert pw.flops == 2 * n * h * h * c * c
    # pointwise forward at C=1536: the GEMM bounds it (309 GFLOP at 790 TFLOP/s = 391 us > 4 x 201 MB at 3 TB/s)
    assert pw.floor_s(H100) == pytest.approx(2 * n * h * h * c * c / 790e12)
    assert fwd.floor_s(H100) == pytest.approx(max(5 * unit / 3.0e12, fwd.flops / 67e12))
    m = fwd.metrics(fwd.floor_s(H100) * 2)
    assert m["roofline_pct"] == pytest.approx(50.0)


@pytest.mark.parametrize("op,mode", [("dw_block", "fwd+bwd"), ("pw_block", "fwd"), ("model", "train"),
                                     ("model", "infer")])
def test_bench_case_record_on_cpu(op, mode, monkeypatch):
    """run_case end to end with the GPU timer replaced: check, rotated steps, and the result record."""
    from bench_harness import workloads
    from bench_harness.timing import Timing

    calls = []

    def fake_time(step, rotated=1, **kw):
        for i in range(3):
            step(i)
            calls.append(i % rotated)
        return Timing(2.0, 1.9, 2.1, 3, rotated)

    monkeypatch.setattr(workloads, "time_cuda", fake_time)
    monkeypatch.setattr(workloads, "peak_memory_mb", lambda step: step() or 12.5)
    monkeypatch.setattr(workloads, "rotation_count", lambda nbytes, device=None: 2)
    w = workloads.Workload(op, mode, dim=8, batch=4, size=8, kernel_size=3, depth=1, patch_size=2,
                           config="tiny")
    res = workloads.run_case(w, "fused-torch-cl", "cpu", check_batch=2 if op == "model" else None)
    r = res.record
    assert calls == [0, 1, 0]
    assert r["provider"] == "fused-torch-cl" and r["layout"] == "channels_last" and r["median_ms"] == 2.0
    assert r["images_per_s"] == pytest.approx(4 / 2e-3) and r["peak_mem_mb"] == 12.5
    assert r["bytes"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / 2e-3 / 1e9)
    assert r["roofline_pct"] == pytest.approx(100 * r["floor_ms"] / 2.0)
    assert 0 < r["check"]["worst_err_over_bound"] <= 1
    assert set(r["backends"].values()) == {"torch"}


def test_profile_sweep_loop_with_a_fake_gpu(tmp_path, monkeypatch, capsys):
    """The sweep's bookkeeping with the GPU parts replaced: every point x provider is run once, the
    cuDNN baseline first; n/a and failing providers are reported, and a failure sets the exit status."""
    from bench_harness import results, workloads
    from bench_harness.workloads import CaseResult, NotApplicable

    seen = []

    def fake_run_case(w, provider, device, **kw):
        seen.append((w.op, w.kernel_size, w.dtype, provider))
        if provider.startswith("fused"):
            raise NotApplicable("no kernels in this fake")
        if provider == "compile" and w.kernel_size == 5:
            raise AssertionError("compile fails the precision rule (fake)")
        ms = {"eager-cl": 4.0, "eager": 2.0}.get(provider, 3.0) * w.kernel_size
        rec = {"workload": w.op, "mode": w.mode, "dtype": w.dtype, "batch": w.batch, "dim": w.dim, "size": w.size,
               "kernel_size": w.kernel_size, "provider": provider, "median_ms": ms, "gbps": 1.0, "tflops": 1.0,
               "roofline_pct": 1.0}
        return CaseResult(rec, lambda: None)

    # the sweep sets CONVMIXER_KERNELS_STRICT=1 for its process: restore it for the tests after this one
    monkeypatch.setenv("CONVMIXER_KERNELS_STRICT", os.environ.get("CONVMIXER_KERNELS_STRICT", "0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FAKE GPU (test)")
    monkeypatch.setattr(workloads, "run_case", fake_run_case)
    monkeypatch.setattr(results, "run_metadata", lambda: {"gpu": "FAKE GPU (test)"})
    rc = main(["profile", "--kernel-sizes", "3,5", "--ops", "dwconv", "--layouts", "nchw",
               "--providers", "eager,compile,fused", "--out", str(tmp_path)])
    assert rc == 1  # the failing compile case
    providers = ["eager-cl", "eager", "compile"] + [p for p in workloads.fused_providers("cuda", ("",))]
    assert seen == [("dwconv", k, "bf16", p) for k in (3, 5) for p in providers]
    out = capsys.readouterr().out
    assert "FAILED: compile fails the precision rule" in out and "n/a: no kernels in this fake" in out
    assert re.search(r"dwconv .* 3  eager\s+6\.000 .* 2\.00x", out)
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["meta"]["gpu"] == "FAKE GPU (test)" and len(data["results"]) == len(seen)
    assert (tmp_path / "profile.txt").exists()


def test_results_file_is_complete_after_every_record(tmp_path):
    from bench_harness.results import ResultsFile, run_metadata

    meta = run_metadata()
    assert {"gpu", "torch", "triton", "cuda", "commit", "date"} <= set(meta)
    results = ResultsFile(str(tmp_path / "out"), "bench", dict(meta, gpu="Test GPU 80GB"))
    results.add({"provider": "eager", "median_ms": 1.0})
    first = json.loads(open(results.path).read())
    assert os.path.basename(results.path).startswith("bench-test-gpu-80gb-") and len(first["results"]) == 1
    results.add({"provider": "eager-cl", "median_ms": 2.0})
    data = json.loads(open(results.path).read())
    assert data["schema"] == "convmixer-kernels-bench/1" and data["meta"]["gpu"] == "Test GPU 80GB"
    assert [r["provider"] for r in data["results"]] == ["eager", "eager-cl"]


# ------------------------------------------------------------------ the conv alone's fused provider


@pytest.mark.parametrize("layout", ["", "-cl"])
def test_conv_alone_fused_provider_is_the_labelled_eval_block(layout, monkeypatch):
    """dwconv's fused provider runs the depthwise block's eval path (one kernel on a fused backend),
    is checked against the unfused composition of what it computes, and its record says what it is."""
    from bench_harness import workloads
    from bench_harness.timing import Timing

    monkeypatch.setattr(workloads, "time_cuda", lambda step, rotated=1, **kw: step(0) or Timing(1.0, 1, 1, 1, 1))
    monkeypatch.setattr(workloads, "peak_memory_mb", lambda step: step() or 0.0)
    monkeypatch.setattr(workloads, "rotation_count", lambda nbytes, device=None: 1)
    w = workloads.Workload("dwconv", "fwd", dim=8, batch=2, size=6, kernel_size=3, dtype="fp32")
    r = workloads.run_case(w, "fused-torch" + layout, "cpu").record
    assert r["computes"] == workloads.CONV_ALONE_FUSED == "fused eval block: conv + affine + residual, one kernel"
    assert r["backends"] == {"depthwise_block": "torch"} and 0 <= r["check"]["worst_err_over_bound"] <= 1
    # its own twin computes x + affine(act(conv(x))), not the conv: the conv's reference would fail it
    p = workloads.prepare(w, "fused-torch", w.build_reference(), "cpu")
    x = w.make_inputs("cpu")["x"]
    with torch.no_grad():
        assert torch.allclose(p.call(x), p.check_reference(x), atol=1e-5)
        assert not torch.allclose(p.call(x), p.module.conv(x), atol=1e-2)
    eager = workloads.run_case(w, "eager", "cpu").record
    assert "computes" not in eager and eager["backends"] == {}


def test_sweep_table_marks_a_provider_that_computes_more():
    rec = {"workload": "dwconv", "mode": "fwd", "dtype": "bf16", "batch": 64, "dim": 1536, "size": 32,
           "kernel_size": 9, "median_ms": 1.0, "gbps": 1.0, "tflops": 1.0, "roofline_pct": 1.0}
    table = harness.sweep.format_table([dict(rec, provider="eager-cl", median_ms=3.0),
                                        dict(rec, provider="fused-triton", computes="the eval block")])
    lines = table.splitlines()
    assert "fused-triton*" in lines[3] and lines[3].endswith("3.00x") and lines[-1] == "* the eval block"


# ------------------------------------------------------------------ without bench/ (an installed wheel)


def test_harness_missing_is_one_line(tmp_path, capsys, monkeypatch):
    assert import_harness("profile", str(tmp_path)) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "profile needs the benchmark harness" in err and "source checkout" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from convmixer_kernels.commands import bench as bench_command

    monkeypatch.setattr(bench_command, "BENCH_DIR", str(tmp_path))
    monkeypatch.setattr(bench_command.import_harness, "__defaults__", (str(tmp_path),))
    assert main(["profile", "--kernel-sizes", "3", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "out").exists()
