"""The command line (info, check, train, profile, bench), the training data, checkpoints, and the
benchmark plumbing that runs without a GPU (the precision check, the cost model, summarize.py)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from convmixer_kernels import ConvMixer
from convmixer_kernels.cli import COMMANDS, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "data", "bench_results_FIXTURE_fabricated.json")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
TINY = ["--dim", "16", "--depth", "1", "--kernel-size", "3", "--no-progress"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _load_summarize():
    spec = importlib.util.spec_from_file_location("bench_summarize", os.path.join(REPO, "bench", "summarize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ --help, both entry forms

def test_every_command_is_registered():
    assert {"info", "check", "train", "profile", "bench"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_in_process(command, capsys):
    """The console script ``convmixer-kernels`` calls cli.main; --help exits 0 and shows the command's usage."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: convmixer-kernels {command}" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_python_m(command):
    out = subprocess.run([sys.executable, "-m", "convmixer_kernels", command, "--help"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"usage: convmixer-kernels {command}" in out.stdout


def test_console_script_entry_point():
    with open(os.path.join(REPO, "setup.py")) as f:
        assert "convmixer-kernels=convmixer_kernels.cli:main" in f.read()
    exe = shutil.which("convmixer-kernels")
    if exe is None:
        pytest.skip("the package is not pip-installed here, so there is no convmixer-kernels script on PATH")
    out = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: convmixer-kernels train" in out.stdout


# ------------------------------------------------------------------ the shipped data

def test_digits_file_matches_its_note():
    path = os.path.join(REPO, "convmixer_kernels", "data", "digits.npz")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(REPO, "convmixer_kernels", "data", "README.md")) as f:
        assert digest in f.read()


def test_load_digits_split_and_normalization():
    from convmixer_kernels.datasets import batches, load_digits, steps_per_epoch

    train, test = load_digits(16)
    assert train.images.shape == (1438, 1, 16, 16) and test.images.shape == (359, 1, 16, 16)
    assert train.labels.dtype == torch.int64 and set(train.labels.tolist()) == set(range(10))
    assert abs(float(train.images.mean())) < 1e-4 and abs(float(train.images.std()) - 1) < 1e-3
    # a fixed split: no image is in both, and a second load gives the same split
    train2, _ = load_digits(16)
    assert torch.equal(train.images, train2.images)
    got = list(batches(train, 100, shuffle=True, seed=3))
    assert len(got) == steps_per_epoch(len(train), 100) == 15
    assert sum(len(y) for _, y in got) == len(train)
    assert [torch.equal(a[1], b[1]) for a, b in zip(got, batches(train, 100, shuffle=True, seed=3))] == [True] * 15


# ------------------------------------------------------------------ train

def _final(out: str):
    m = re.search(r"final loss ([0-9.]+)", out)
    assert m, out
    acc = re.search(r"test accuracy ([0-9.]+)%", out)
    return float(m.group(1)), float(acc.group(1)) if acc else None


def test_train_digits_few_steps(capsys):
    assert main(["train", "--steps", "3", "--batch-size", "16", *TINY]) == 0
    out = capsys.readouterr().out
    loss, acc = _final(out)
    assert 0 < loss < 10 and 0 <= acc <= 100
    assert "handwritten digits" in out and "fused blocks ran on: " in out
    if not torch.cuda.is_available():
        assert "fused blocks ran on: torch" in out  # "auto" on a CPU


def test_train_synthetic_with_progress_bar(capsys):
    args = ["train", "--synthetic", "--synthetic-samples", "64", "--image-size", "8", "--steps", "2",
            "--batch-size", "16", "--dim", "16", "--depth", "1", "--kernel-size", "3"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "synthetic" in captured.out and "img/s" in captured.out
    bars = [line for line in captured.err.splitlines() if line.startswith("fused [")]
    assert bars and bars[-1].split()[2] == "2/2" and "loss" in bars[-1] and "img/s" in bars[-1]


def test_train_reference_model(capsys):
    assert main(["train", "--no-fused", "--steps", "2", "--batch-size", "16", *TINY]) == 0
    assert "reference: final loss" in capsys.readouterr().out


def test_train_rejects_bad_options(capsys):
    assert main(["train", "--batch-size", "1", *TINY]) == 2
    assert "batch-size" in capsys.readouterr().err


def test_checkpoint_official_layout_and_exact_resume(tmp_path, capsys):
    """Save per epoch; the state_dict loads strictly into ConvMixer (fused or not); resuming from
    epoch 1 reproduces the uninterrupted run's epoch-2 weights and optimizer state exactly."""
    common = ["train", "--synthetic", "--synthetic-samples", "48", "--image-size", "8", "--batch-size", "16",
              "--epochs", "2", "--dim", "16", "--depth", "2", "--kernel-size", "3", "--no-progress",
              "--device", "cpu"]  # bitwise reproducible there
    assert main(common + ["--save", str(tmp_path / "run-{epoch}.pt")]) == 0
    ck1 = torch.load(tmp_path / "run-1.pt", weights_only=True)
    ck2 = torch.load(tmp_path / "run-2.pt", weights_only=True)
    assert (ck1["epoch"], ck1["step"], ck2["epoch"], ck2["step"]) == (1, 3, 2, 6)
    assert ck2["format"] == "convmixer-kernels/1" and ck2["arch"] == "convmixer_16_2_k3_p2"
    sd = ck2["state_dict"]
    assert {"0.weight", "2.running_var", "3.0.fn.0.weight", "3.3.num_batches_tracked", "7.weight"} <= set(sd)
    for fused in (False, True):
        model = ConvMixer(16, 2, 3, 2, n_classes=10, in_chans=3, fused=fused)
        model.load_state_dict(sd, strict=True)
    assert int(sd["3.3.num_batches_tracked"]) == 6
    assert ck2["optimizer"]["state"], "the optimizer state was not saved"

    assert main(common + ["--resume", str(tmp_path / "run-1.pt"), "--save", str(tmp_path / "resumed-{epoch}.pt")]) == 0
    assert "at step 3" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "resumed-2.pt", weights_only=True)
    for key, value in sd.items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for idx, state in ck2["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][idx][name], value), (idx, name)


def test_resume_from_bare_state_dict(tmp_path, capsys):
    torch.manual_seed(5)
    model = ConvMixer(16, 1, 3, 2, n_classes=10, in_chans=1)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert main(["train", "--resume", str(tmp_path / "weights.pt"), "--steps", "1", "--batch-size", "16",
                 "--save", str(tmp_path / "after.pt"), *TINY]) == 0
    assert "at step 0" in capsys.readouterr().out
    after = torch.load(tmp_path / "after.pt", weights_only=True)["state_dict"]
    assert not torch.equal(after["0.weight"], model.state_dict()["0.weight"])  # it trained from those weights
    assert (after["0.weight"] - model.state_dict()["0.weight"]).abs().max() < 0.05  # ...one small step away


def test_compare_agrees_on_cpu(capsys):
    assert main(["train", "--compare", "--steps", "3", "--batch-size", "16", *TINY]) == 0
    out = capsys.readouterr().out
    assert "AGREE" in out and "DISAGREE" not in out and "speed:" in out
    assert out.count(" ok ") >= 3


def test_compare_reports_disagreement(monkeypatch, capsys):
    """A fused model that computes something else must be caught (here: a perturbed head)."""
    from convmixer_kernels.commands import train as train_cmd

    build = train_cmd.build_model

    def perturbed(cfg, fused, *a, **kw):
        model = build(cfg, fused, *a, **kw)
        if fused:
            with torch.no_grad():
                model[-1].weight.add_(torch.randn_like(model[-1].weight))
        return model

    monkeypatch.setattr(train_cmd, "build_model", perturbed)
    assert main(["train", "--compare", "--steps", "3", "--batch-size", "16", *TINY]) == 1
    assert "DISAGREE" in capsys.readouterr().out


@pytest.mark.slow
def test_default_training_beats_chance(capsys):
    """The default run (ConvMixer-64/4 k5 p2, 16x16 digits, batch 16, one epoch) learns: chance is 10%,
    it reaches about 97% here. One intra-op thread: on a shared 2-core machine OpenMP threads that
    wait on each other make it several times slower, and the run is what is tested, not the threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    _, acc = _final(capsys.readouterr().out)
    assert acc >= 80.0


# ------------------------------------------------------------------ profile and bench without a GPU

@NO_CUDA
@pytest.mark.parametrize("command", ["profile", "bench"])
def test_gpu_commands_say_they_need_cuda(command, capsys):
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err


def test_bench_passes_pytest_arguments(capsys):
    assert main(["bench", "--dry-run", "--", "-k", "model", "--bench-configs", "256/8-k5-p2"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("-k model --bench-configs 256/8-k5-p2") and os.path.join(REPO, "bench") in out


@NO_CUDA
def test_bench_suite_skips_without_cuda():
    out = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-rs", "-p", "no:cacheprovider",
                          "-k", "depthwise_conv and 256 and eager"], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "needs a CUDA GPU" in out.stdout and " passed" not in out.stdout


def test_profile_table_and_plot(tmp_path):
    """Speedup over cuDNN is eager channels_last's time over the provider's, per point."""
    from convmixer_kernels.commands import profile

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
    from convmixer_kernels.workloads import Workload, check, prepare, reference_snapshots

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
    from convmixer_kernels import backends
    from convmixer_kernels.workloads import NotApplicable, Workload, prepare

    w = Workload("dwconv", "fwd", dim=8, batch=2, size=6, kernel_size=3)
    if "triton" not in backends.implemented_backends("depthwise_conv"):
        with pytest.raises(NotApplicable, match="depthwise_conv"):
            prepare(w, "fused-triton", w.build_reference(), "cpu")
    with pytest.raises(ValueError, match="unknown provider"):
        prepare(w, "fast", w.build_reference(), "cpu")


def test_cost_model_uses_the_fused_budgets():
    from convmixer_kernels.profiling import H100, block_cost

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


# ------------------------------------------------------------------ summarize.py on a labelled fixture

def test_summarize_fixture_table(tmp_path):
    summarize = _load_summarize()
    out = tmp_path / "summary.md"
    assert summarize.main([FIXTURE, "--out", str(out)]) == 0
    text = out.read_text()
    assert "FABRICATED TEST FIXTURE" in text
    # fused-triton at 1 ms vs the best peer (eager, 4 ms): 4.00x; the model at 640 img/s misses 1000 img/s
    assert re.search(r"\| 1536/20-k9-p7 \| fwd \| 64x1536x32x32 \| fused-triton \| 1\.000 \|.*\| 4\.00x \|", text)
    assert "| ConvMixer train, 1536/20-k9-p7: ≥ 1,000 img/s | fused-triton | 640 img/s | no |" in text
    assert "| ConvMixer train, 1536/20-k9-p7: peak memory ≤ 0.6x eager | fused-triton | 0.50x | yes |" in text
    assert "not measured" in text  # targets the fixture has no rows for


def test_summarize_rewrites_only_between_markers(tmp_path):
    summarize = _load_summarize()
    readme = tmp_path / "README.md"
    original = "# title\nbefore\n<!-- perf:start -->\nold numbers\n<!-- perf:end -->\nafter\n"
    readme.write_text(original)
    # a fixture is never written into a README
    assert summarize.main([FIXTURE, "--readme", str(readme), "--out", str(tmp_path / "s.md")]) == 1
    assert readme.read_text() == original
    # a (relabelled copy of the) results file is
    data = json.loads(open(FIXTURE).read())
    data["meta"]["fixture"] = False
    data["meta"]["gpu"] = "TEST COPY OF THE FABRICATED FIXTURE"
    copy = tmp_path / "bench-test.json"
    copy.write_text(json.dumps(data))
    assert summarize.main([str(copy), "--readme", str(readme), "--out", str(tmp_path / "s.md")]) == 0
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n<!-- perf:start -->\n") and text.endswith("<!-- perf:end -->\nafter\n")
    assert "old numbers" not in text and "TEST COPY OF THE FABRICATED FIXTURE" in text and "4.00x" in text
    # no markers: nothing is changed
    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    with pytest.raises(SystemExit):
        summarize.main([str(copy), "--readme", str(bare)])
    assert bare.read_text() == "no markers\n"


@pytest.mark.parametrize("op,mode", [("dw_block", "fwd+bwd"), ("pw_block", "fwd"), ("model", "train"),
                                     ("model", "infer")])
def test_bench_case_record_on_cpu(op, mode, monkeypatch):
    """run_case end to end with the GPU timer replaced: check, rotated steps, and the result record."""
    from convmixer_kernels import workloads
    from convmixer_kernels.profiling import Timing

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
    from convmixer_kernels import profiling, workloads
    from convmixer_kernels.workloads import CaseResult, NotApplicable

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

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FAKE GPU (test)")
    monkeypatch.setattr(workloads, "run_case", fake_run_case)
    monkeypatch.setattr(profiling, "run_metadata", lambda: {"gpu": "FAKE GPU (test)"})
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
    from convmixer_kernels.profiling import ResultsFile, run_metadata

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
