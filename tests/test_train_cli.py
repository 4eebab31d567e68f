"""The train/check/info command lines (issue 13): one-line errors, --resume restoring the training
options, --save with --steps, one final loss, --compare's spread, -v without floods, info on a
CPU-only torch."""
import collections
import re

import pytest
import torch

from convmixer_kernels import ConvMixer
from convmixer_kernels.cli import main

TINY = ["--dim", "16", "--depth", "1", "--kernel-size", "3", "--no-progress"]
SYN = ["--synthetic", "--synthetic-samples", "48", "--image-size", "8", "--dim", "16", "--depth", "1",
       "--kernel-size", "3", "--device", "cpu"]  # 48 images, batch 16: 3 steps per epoch


def _one_line_error(capsys, argv, *, expect):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expect in err, err
    return err


@pytest.mark.parametrize("argv, expect", [
    (["--backend", "bogus"], "invalid choice"),
    (["--dim", "0"], "--dim"),
    (["--steps", "0"], "--steps"),
    (["--image-size", "1"], "--image-size"),
    (["--device", "foo"], "--device foo"),
    (["--kernel-size", "0"], "--kernel-size"),
])
def test_check_bad_options_are_one_line(argv, expect, capsys):
    _one_line_error(capsys, ["check", *argv], expect=expect)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message given where there is no GPU")
def test_check_without_cuda_is_one_line(capsys):
    _one_line_error(capsys, ["check", "--device", "cuda"], expect="is_available() is False")


@pytest.mark.parametrize("argv, expect", [
    (["--image-size", "4"], "image_size"),  # the digits are 8x8
    (["--patch-size", "32"], "--patch-size"),
    (["--resume", "/nonexistent/ckpt.pt"], "no such file"),
    (["--device", "foo"], "--device foo"),
    (["--lr", "-1"], "--lr"),
    (["--save", "run-{step}.pt"], "--save"),
    (["--data", "/nonexistent/data"], "no such file"),
    (["--recipe", "cifar10"], "--data"),
    (["--synthetic", "--data", "."], "exclude"),
    (["--batch-size", "1"], "batch-size"),
])
def test_train_bad_options_are_one_line(argv, expect, capsys):
    _one_line_error(capsys, ["train", *TINY, "--steps", "1", *argv], expect=expect)


def test_train_resume_of_garbage_is_one_line(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    _one_line_error(capsys, ["train", *TINY, "--resume", str(bad)], expect="not a checkpoint")


def test_resume_restores_training_options_unless_given(tmp_path, capsys):
    """The checkpoint's batch size, learning rate and schedule length come back on --resume (and it says
    so); resuming reproduces the uninterrupted run exactly; an option on the command line wins."""
    opts = SYN + ["--batch-size", "8", "--lr", "0.003", "--epochs", "2", "--no-progress"]  # 6 steps per epoch
    assert main(["train", *opts, "--save", str(tmp_path / "full-{epoch}.pt")]) == 0
    capsys.readouterr()
    # no --batch-size/--lr/--epochs: all from the epoch-1 checkpoint, so the one-cycle schedule is the same
    assert main(["train", *SYN, "--no-progress", "--resume", str(tmp_path / "full-1.pt"),
                 "--save", str(tmp_path / "resumed.pt")]) == 0
    out = capsys.readouterr().out
    assert "restored from the checkpoint" in out
    assert "batch_size=8" in out and "lr=0.003" in out and "epochs=2" in out
    assert "at step 6" in out and "12 steps of batch 8" in out
    full = torch.load(tmp_path / "full-2.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed["config"]["train"]["batch_size"] == 8 and resumed["step"] == 12
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    # an explicit option wins, and the override is reported
    assert main(["train", *SYN, "--no-progress", "--epochs", "3", "--batch-size", "16",
                 "--resume", str(tmp_path / "full-1.pt")]) == 0
    assert "overrides the checkpoint: batch_size 8 -> 16" in capsys.readouterr().out


def test_resume_with_other_model_size_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *SYN, "--no-progress", "--steps", "1", "--save", str(tmp_path / "c.pt")]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["train", *SYN, "--dim", "32", "--resume", str(tmp_path / "c.pt")],
                    expect="does not fit the checkpoint")


def test_save_with_steps_keeps_epoch_checkpoints(tmp_path, capsys):
    """--steps 4 with 3 steps per epoch: run-1.pt is epoch 1 (step 3), not overwritten by the mid-epoch end;
    no literal {epoch} is printed."""
    assert main(["train", *SYN, "--batch-size", "16", "--steps", "4", "--no-progress",
                 "--save", str(tmp_path / "run-{epoch}.pt")]) == 0
    out = capsys.readouterr().out
    assert "{epoch}" not in out and "run-1.pt" in out and "run-step4.pt" in out
    ep1 = torch.load(tmp_path / "run-1.pt", weights_only=True)
    mid = torch.load(tmp_path / "run-step4.pt", weights_only=True)
    assert (ep1["step"], ep1["epoch"], mid["step"], mid["epoch"]) == (3, 1, 4, 1)
    ConvMixer(16, 1, 3, 2, n_classes=10).load_state_dict(mid["state_dict"])


def test_progress_bar_and_summary_show_the_same_final_loss(capsys):
    assert main(["train", *SYN, "--batch-size", "16", "--steps", "23"]) == 0  # bar lines every 10%: 2-3 steps apart
    captured = capsys.readouterr()
    bars = [line for line in captured.err.splitlines() if line.startswith("fused [")]
    assert bars and bars[-1].split()[2] == "23/23"
    bar_loss = re.search(r"loss ([0-9.]+)", bars[-1]).group(1)
    summary_loss = re.search(r"final loss ([0-9.]+)", captured.out).group(1)
    assert bar_loss == summary_loss


def test_compare_reports_spread_not_a_noise_speedup(capsys):
    assert main(["train", "--compare", "--steps", "12", "--batch-size", "16", *TINY]) == 0
    out = capsys.readouterr().out
    speed = [line for line in out.splitlines() if line.startswith("speed:")]
    assert len(speed) == 1 and "interleaved blocks" in speed[0] and "range" in speed[0], out
    assert "speedup" not in out
    # too few timed steps: says so instead of a ratio
    assert main(["train", "--compare", "--steps", "3", "--batch-size", "16", *TINY]) == 0
    assert "too few to measure" in capsys.readouterr().out


def test_verbose_does_not_flood(capsys):
    assert main(["-v", "train", "--steps", "12", "--batch-size", "16", *TINY]) == 0
    err = capsys.readouterr().err.splitlines()
    counts = collections.Counter(line for line in err if line.startswith("DEBUG"))
    assert counts, "-v shows the backend choices"
    assert max(counts.values()) == 1, counts.most_common(2)


def test_dedupe_filter_lets_powers_of_ten_through():
    import logging

    from convmixer_kernels.cli import DedupeFilter

    f = DedupeFilter()
    rec = lambda: logging.LogRecord("x", logging.DEBUG, __file__, 1, "same %s", ("line",), None)  # noqa: E731
    passed = [i + 1 for i in range(1000) if f.filter(rec())]
    assert passed == [1, 10, 100, 1000]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_info_device_cuda_on_cpu_torch_calls_nothing_available(capsys):
    assert main(["info", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    backend_lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert backend_lines and not any(line.rstrip().endswith("available") and "unavailable" not in line
                                     for line in backend_lines), out
    assert "triton  unavailable: torch.cuda.is_available() is False" in out


def test_resume_on_other_data_replaces_the_saved_data_source(tmp_path, capsys):
    assert main(["train", *SYN, "--no-progress", "--steps", "1", "--save", str(tmp_path / "syn.pt")]) == 0
    capsys.readouterr()
    # the checkpoint says synthetic 3-channel 8x8; --no-synthetic means the digits (1 channel): a clear misfit
    _one_line_error(capsys, ["train", "--no-synthetic", "--dim", "16", "--depth", "1", "--kernel-size", "3",
                             "--steps", "2", "--resume", str(tmp_path / "syn.pt")], expect="does not fit")


def test_train_memory_low_trains_the_fused_stack(capsys):
    """--memory low builds the stack (FusedSequential memory='low'); on this machine's torch backend its layers
    run one by one, so the run completes with the same loss machinery."""
    from convmixer_kernels.commands.train import build_model

    cfg = dict(dim=8, depth=2, kernel_size=3, patch_size=2, n_classes=10, in_chans=3, activation="gelu")
    assert build_model(cfg, True, "torch", "cpu", False, "low").memory == "low"
    assert main(["train", *SYN, "--no-progress", "--steps", "2", "--memory", "low"]) == 0
