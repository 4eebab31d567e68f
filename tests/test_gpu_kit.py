"""scripts/gpu_session.sh --dry-run: what each tier runs fits a lent machine's limits; summarize.py
leaves the README alone when it fails and writes the static-prediction section between its markers."""
import importlib.util
import json
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_session.sh")
DEVICE_TIME_S, PER_COMMAND_S, FILES_BACK = 15 * 60, 10 * 60, 8
STARTUP_S = 120  # a fresh machine's start-up counts against the session


def _dry(tier):
    out = subprocess.run(["bash", SCRIPT, "--dry-run", tier], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_tiers_fit_the_device_limits():
    budgets = {}
    for tier, must in (("tier1", ("install", "info", "correctness", "timings", "inspect")),
                       ("tier2", ("bench", "profile", "sanitizer"))):
        text = _dry(tier)
        m = re.search(rf"{tier} budget_s=(\d+) pack_s=(\d+) max_files=(\d+)", text)
        assert m, text
        budgets[tier] = int(m.group(1))
        assert int(m.group(1)) <= PER_COMMAND_S - 30 and int(m.group(3)) <= FILES_BACK
        for stage in must:
            assert re.search(rf"^  {stage}: \S", text, re.M), f"{tier} does not run {stage}:\n{text}"
        assert "pip install" not in text.split("install:")[1].split("||")[0] or "--no-index" in text
    assert budgets["tier1"] <= 5 * 60
    assert budgets["tier1"] + budgets["tier2"] + 2 * STARTUP_S <= DEVICE_TIME_S + 5 * 60  # two calls, one session


def test_prebuild_dry_run_names_the_gpu_torch():
    out = subprocess.run(["bash", SCRIPT, "--dry-run", "prebuild"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "torch==2.11.0 " in out.stdout and "cp312" in out.stdout


def _summarize():
    spec = importlib.util.spec_from_file_location("bench_summarize_kit", os.path.join(REPO, "bench", "summarize.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summarize_failure_leaves_readme_unchanged(tmp_path, monkeypatch):
    s = _summarize()
    readme = tmp_path / "README.md"
    original = "x\n<!-- perf:start -->\nold\n<!-- perf:end -->\n"
    readme.write_text(original)
    monkeypatch.setattr(s, "default_files", lambda: [])
    assert s.main(["--readme", str(readme)]) == 1
    assert readme.read_text() == original


def test_summarize_static_section(tmp_path):
    s = _summarize()
    data = {"schema": "convmixer-kernels-static/1", "meta": {"commit": "abc", "assumptions": ["one line"]},
            "workload": {"config": "tiny", "dim": 8, "depth": 1, "kernel_size": 3, "patch_size": 2, "batch": 2},
            "blocks": [{"block": "dw_block", "phase": "backward", "kernels": 2, "predicted_us": 10.0, "floor_us": 5.0,
                        "passes": 6.1, "budget_passes": 6, "eager_passes_counted": 15.0}]}
    f = tmp_path / "static-sm90-tiny.json"
    f.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- static:start -->\nold\n<!-- static:end -->\nb\n")
    assert s.main(["--static", str(f), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "Static prediction (no GPU measurement)" in text and "| tiny | triton | dw_block | backward | 2 | 10 | 5 | 50% |" in text
    assert text.startswith("a\n<!-- static:start -->\n") and text.endswith("<!-- static:end -->\nb\n")
    assert "- one line" in text and "old" not in text
