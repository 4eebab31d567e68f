"""Benchmark suite set-up: ``pytest bench/`` (pytest-benchmark), on a CUDA GPU only.

* Without CUDA every benchmark is skipped with the reason (the suite is not part of the
  test command: ``pytest`` alone collects ``tests/`` only).
* ``CONVMIXER_KERNELS_STRICT=1``: a fused provider that would fall back to the
  reference fails instead of timing the wrong thing.
* The harness is ``bench/bench_harness/`` (this folder is put on ``sys.path``).
* Providers, side by side in one process: ``workloads.bench_providers()`` (eager NCHW,
  eager channels_last, torch.compile default and max-autotune, every fused backend
  "auto" may use on CUDA, in NCHW and channels_last).
* Every provider is checked against the float64 reference (precision rule) before it
  is timed with CUDA events (median); the conv alone's fused provider is the fused eval
  block (conv + affine + residual, one kernel), checked against what it computes and
  labelled in its record's ``computes``; the numbers are in each benchmark's
  ``extra_info`` and in a results file ``bench/results/bench-<gpu>-<date>-<commit>.json``
  (``--bench-out DIR`` to write elsewhere). ``python bench/summarize.py`` turns the
  files into a table, a plot and the README's performance section.

pytest-benchmark's own columns are host wall-clock (a synchronized call per round) and
only a sanity check; the GPU medians are the numbers.
"""
import gc
import os
import sys

os.environ["CONVMIXER_KERNELS_STRICT"] = "1"
os.environ.pop("CONVMIXER_KERNELS_BACKEND", None)  # the providers name their backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:  # bench_harness, whatever pytest's import mode
    sys.path.insert(0, BENCH_DIR)

NO_GPU = ("bench/ needs a CUDA GPU (torch.cuda.is_available() is False): it times kernels with CUDA events; "
          "run `pytest bench/` on a GPU machine (scripts/gpu_session.sh bench)")


def pytest_addoption(parser):
    g = parser.getgroup("convmixer-kernels bench")
    g.addoption("--bench-out", default=os.path.join(os.path.dirname(__file__), "results"),
                help="folder for the results JSON (default: bench/results)")
    g.addoption("--bench-configs", default="", help="comma-separated paper configurations to run, e.g. 1536/20-k9-p7")
    g.addoption("--bench-providers", default="", help="comma-separated providers to run (default: all)")
    g.addoption("--bench-batch", type=int, default=64, help="batch size (default 64)")
    g.addoption("--bench-check-batch", type=int, default=8,
                help="batch of the float64 check for whole-model workloads (default 8; ops check at full batch)")
    g.addoption("--bench-rep-ms", type=float, default=300.0, help="GPU time to spend timing each case (ms)")


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()]


def pytest_generate_tests(metafunc):
    """Tests taking ``case`` get (workload, provider) pairs from their module's ``workloads(batch, configs)``."""
    if "case" not in metafunc.fixturenames:
        return
    from bench_harness.workloads import bench_providers

    opt = metafunc.config.getoption
    configs = _csv(opt("--bench-configs")) or None
    wanted = _csv(opt("--bench-providers"))
    providers = [p for p in bench_providers("cuda") if not wanted or p in wanted]
    cases, ids = [], []
    for w in metafunc.module.workloads(opt("--bench-batch"), configs):
        for p in providers:
            cases.append((w, p))
            ids.append(f"{w.config.replace('/', '_')}-{w.mode}-{p}")
    metafunc.parametrize("case", cases, ids=ids)


def pytest_collection_modifyitems(config, items):
    reason = None
    if not torch.cuda.is_available():
        reason = NO_GPU
    else:
        try:
            import pytest_benchmark  # noqa: F401
        except ImportError:
            reason = "bench/ needs pytest-benchmark: pip install pytest-benchmark"
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def bench_results(request):
    """Every benchmark's record, rewritten to bench/results/bench-<gpu>-<date>-<commit>.json as it comes."""
    from bench_harness.results import ResultsFile

    results = ResultsFile(request.config.getoption("--bench-out"), "bench")
    yield results
    if results.path:
        print(f"\nbench results: {results.path} ({len(results.records)} cases)")


@pytest.fixture(scope="session")
def reference_cache():
    return {}  # reference snapshots of the current workload, shared by its providers


@pytest.fixture
def bench_case(request, bench_results, reference_cache, benchmark):
    """Run one (workload, provider) case: check, time on the GPU, record; skips if not applicable."""
    from bench_harness.workloads import NotApplicable, run_case

    opt = request.config.getoption

    def run(case):
        workload, provider = case
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        check_batch = min(opt("--bench-check-batch"), workload.batch) if workload.op == "model" else None
        try:
            result = run_case(workload, provider, "cuda", check_batch=check_batch, rep_ms=opt("--bench-rep-ms"),
                              refs=reference_cache)
        except NotApplicable as e:
            pytest.skip(f"{provider} on {workload.describe()}: {e}")
        benchmark.extra_info.update(result.record)
        benchmark.pedantic(result.step, rounds=3, iterations=1, warmup_rounds=1)
        bench_results.add(result.record)
        r = result.record
        computes = f" [{r['computes']}]" if r.get("computes") else ""
        print(f"\n{provider:>24}{computes} {workload.describe()}: {r['median_ms']:.3f} ms, "
              f"{r['images_per_s']:.0f} img/s, "
              f"{r['gbps']:.0f} GB/s, {r['tflops']:.1f} TFLOP/s, {r['roofline_pct']:.0f}% of roofline, "
              f"peak +{r['peak_mem_mb']:.0f} MiB")
        return r

    yield run
    gc.collect()
    torch.cuda.empty_cache()
