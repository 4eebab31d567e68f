"""Backend selection: auto, explicit requests, the environment variable, fallbacks, and the CLI's info."""
import logging
import subprocess
import sys
import types

import pytest
import torch

from convmixer_kernels import BackendUnavailableError, FusedPointwiseBlock, available_backends, backends, \
    explain_backends


@pytest.fixture
def fake_op(monkeypatch):
    """An op with a torch and a 'triton' implementation whose triton side refuses odd channel counts."""
    registry = dict(backends._REGISTRY)
    monkeypatch.setattr(backends, "_REGISTRY", registry)
    monkeypatch.setattr(backends, "_warned", set())
    kernels = types.ModuleType("fake_triton_kernels")
    kernels.unsupported = lambda x=None, **_: "odd channel count" if x.shape[1] % 2 else None
    monkeypatch.setitem(sys.modules, "fake_triton_kernels", kernels)
    backends.register_op("fake_op", reference=torch.neg, fused=lambda x, backend: -x,
                         unsupported=lambda **_: None, kernels={"triton": "fake_triton_kernels"})
    return "fake_op"


def test_auto_on_cpu_is_torch_and_says_why():
    reasons = explain_backends(torch.device("cpu"))
    assert list(reasons) == ["cuda", "triton", "torch"]
    assert reasons["torch"] is None
    assert "CUDA tensor" in reasons["cuda"]
    assert reasons["triton"] is not None  # the interpreter is never chosen by auto
    assert available_backends(torch.device("cpu")) == ["torch"]


def test_explicit_unavailable_backend_raises_with_reason_and_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA tensor"):
        backends.choose_backend("depthwise_block", "cuda", x.device)
    if "triton" in backends.implemented_backends("pointwise_block"):
        block = FusedPointwiseBlock(4, backend="triton")
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
            block(x)


def test_missing_extension_error_names_the_build_command(monkeypatch):
    from convmixer_kernels import _cuda_ext
    reason = _cuda_ext.load_error()
    if reason is None:
        pytest.skip("the CUDA extension is built here")
    assert "pip install --no-build-isolation" in reason and "CONVMIXER_KERNELS_FORCE_BUILD=1" in reason


def test_environment_variable_overrides_auto_only(monkeypatch, fake_op):
    monkeypatch.setenv("CONVMIXER_KERNELS_BACKEND", "torch")
    assert backends.requested_backend("auto") == "torch"
    assert backends.requested_backend("triton") == "triton"  # an explicit choice wins
    monkeypatch.setenv("CONVMIXER_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CONVMIXER_KERNELS_BACKEND"):
        backends.requested_backend("auto")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.requested_backend("bogus")


def test_config_fallback_is_logged_once(monkeypatch, fake_op, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x_odd, x_even = torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2)
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        assert backends.choose_backend(fake_op, "triton", x_odd.device, x=x_odd) == "torch"
        assert backends.choose_backend(fake_op, "triton", x_odd.device, x=x_odd) == "torch"
        assert backends.choose_backend(fake_op, "triton", x_even.device, x=x_even) == "triton"
    assert caplog.text.count("odd channel count") == 1


def test_strict_mode_turns_fallback_into_error(monkeypatch, fake_op):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("CONVMIXER_KERNELS_STRICT", "1")
    x = torch.randn(1, 3, 2, 2)
    with pytest.raises(BackendUnavailableError, match="odd channel count"):
        backends.choose_backend(fake_op, "triton", x.device, x=x)


def test_auto_skips_with_debug_log(monkeypatch, fake_op, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 4, 2, 2)
    with caplog.at_level(logging.DEBUG, logger="convmixer_kernels"):
        assert backends.choose_backend(fake_op, "auto", x.device, x=x) == "torch"
    assert "auto skipped backend 'triton'" in caplog.text and "interpreter" in caplog.text
    assert "auto skipped backend 'cuda'" in caplog.text


def test_unimplemented_backend_request_runs_auto_and_says_so(monkeypatch, fake_op, caplog):
    """A backend asked for by name that has no implementation of this op (the pointwise block on
    "cuda") runs what auto would choose, logged once; strict mode refuses instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends.register_op("torch_only_op", reference=torch.neg, fused=lambda x, backend: -x,
                         unsupported=lambda **_: None, kernels={})
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        assert backends.choose_backend("torch_only_op", "triton", torch.device("cpu")) == "torch"
    assert "torch_only_op has no triton implementation" in caplog.text
    monkeypatch.setenv("CONVMIXER_KERNELS_STRICT", "1")
    with pytest.raises(BackendUnavailableError, match="no triton implementation"):
        backends.choose_backend("torch_only_op", "triton", torch.device("cpu"))


@pytest.mark.parametrize("argv", [[sys.executable, "-m", "convmixer_kernels", "info"]])
def test_info_command(argv):
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    for word in ("torch", "triton", "CUDA extension", "backends", "available"):
        assert word in out


def test_check_command_passes_on_this_machine():
    out = subprocess.run([sys.executable, "-m", "convmixer_kernels", "check", "--steps", "2", "--depth", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "within the precision rule" in out.stdout
