"""The Triton plumbing every kernel shares (ops/triton/common.py): the autotuner's error policy,
the fixed-order reduction, the int64 policy and the static (compile-only) target."""
import pytest
import torch

from convmixer_kernels import backends
from harness import DEVICE

pytestmark = pytest.mark.skipif(backends.environment_reason("triton", DEVICE) is not None,
                                reason=f"triton cannot run here: {backends.environment_reason('triton', DEVICE)}")


@pytest.fixture
def tuner(monkeypatch):
    from convmixer_kernels.ops.triton import common

    monkeypatch.setattr(common, "autotune_enabled", lambda: True)  # off under the interpreter otherwise
    monkeypatch.setattr(common, "_capturing", lambda: False)
    return common.Autotuner("test")


def _timer(times):
    """A fake do_bench: runs the launch once, returns the candidate's scripted time."""
    def timer(fn):
        return times[fn()]
    return timer


def test_autotuner_picks_the_fastest_and_caches(tuner):
    calls = []
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    pick = tuner.pick(("k",), ["a", "b", "c"], lambda c: calls.append(c) or c, timer=_timer(times))
    assert pick == "b" and calls == ["a", "b", "c"]
    assert tuner.pick(("k",), ["a", "b", "c"], lambda c: calls.append(c) or c, timer=_timer(times)) == "b"
    assert calls == ["a", "b", "c"]  # cached: nothing launched again


def test_autotuner_skips_candidates_that_do_not_compile_or_fit(tuner):
    from triton.runtime.errors import OutOfResources

    def launch(c):
        if c == "big":
            raise OutOfResources(300000, 232448, "shared memory")
        return c

    assert tuner.pick(("k",), ["big", "small"], launch, timer=_timer({"small": 1.0})) == "small"


def test_autotuner_lets_runtime_errors_propagate(tuner):
    def launch(c):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        tuner.pick(("k",), ["a", "b"], launch, timer=_timer({}))
    assert ("k",) not in tuner.cache


def test_autotuner_uses_the_default_during_graph_capture(tuner, monkeypatch, caplog):
    from convmixer_kernels.ops.triton import common

    monkeypatch.setattr(common, "_capturing", lambda: True)
    launched = []
    assert tuner.pick(("k",), ["default", "other"], launched.append, timer=_timer({})) == "default"
    assert not launched and ("k",) not in tuner.cache  # nothing timed, nothing cached


def test_autotuner_is_off_in_deterministic_mode(monkeypatch):
    from convmixer_kernels.ops.triton import common

    monkeypatch.setenv("CONVMIXER_KERNELS_DETERMINISTIC", "1")
    t = common.Autotuner("test")
    assert t.pick(("k",), ["default", "other"], lambda c: pytest.fail("must not launch"), timer=_timer({})) == "default"


@pytest.mark.parametrize("T, L", [(1, 5), (7, 33), (40, 3), (0, 4)])
def test_sum_rows_is_a_fixed_order_sum(T, L):
    from convmixer_kernels.ops.triton.common import sum_rows

    src = torch.randn(T, L, generator=torch.Generator().manual_seed(T * 100 + L)).to(DEVICE) * 10
    got = sum_rows(src)
    torch.testing.assert_close(got.double(), src.double().sum(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(got, sum_rows(src.clone()))  # bitwise reproducible
    nd = torch.randn(6, 2, 3).to(DEVICE)
    assert sum_rows(nd).shape == (2, 3)


def test_static_target_acts_as_the_gpu():
    from convmixer_kernels.ops.triton import common

    meta = torch.device("meta")
    with common.static_target() as target:
        assert not common.interpreting(meta) and common.num_sms(meta) == target.sms == 132
    assert common.interpreting(torch.device("cpu")) == (DEVICE.type == "cpu")
