"""The benchmark harness (not installed with the package; imported from this source checkout).

* ``workloads``: what is timed (conv alone, each block, the model) and each provider's way of
  running it; ``run_case`` checks a provider with ``convmixer_kernels.verify`` then times it.
* ``roofline``: the roofline numbers and the fused-budget traffic/FLOP model.
* ``timing``: CUDA-event medians, L2-defeating input rotation, peak memory, named ranges.
* ``results``: result files with their metadata (GPU, versions, commit, date).
* ``sweep``: the ``convmixer-kernels profile`` sweep, table and plot.

``bench/conftest.py`` (``pytest bench/``) and ``convmixer_kernels/commands/{bench,profile}.py``
import it with ``bench/`` on ``sys.path``; ``bench/host_overhead.py`` is a CPU script beside it.
"""
