"""The command line (info, check, train, profile, bench), the training data, checkpoints, and
summarize.py. The benchmark harness's own CPU tests are in test_bench_harness.py."""
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
