"""Static performance evidence without a GPU: ``convmixer-kernels inspect``.

Every figure here is a **static prediction, not a measurement**: the package's own launchers run
on ``meta`` tensors with an sm_90 target (nothing is launched), each recorded launch is compiled
ahead of time for sm_90a, and the compiler's resource report (``ptxas -v``) and machine code
(``cuobjdump -sass``) are read. Loop bodies in the SASS times their trip counts give a dynamic
instruction mix; with counted DRAM bytes and the ceilings of one table (``ceilings.py``) that gives
a predicted time per kernel. Modules:

* ``ceilings``  the H200 table every prediction is made against (one place to replace with measured figures)
* ``launches``  the one adapter to the package's launchers: records (kernel, grid, args, constexprs,
  warps, stages) instead of launching
* ``trips``     per-kernel loop trip counts, useful work and DRAM bytes, derived from a launch
* ``cuda_plans`` the CUDA extension's launches: grids from csrc/kernels/plan.h (a g++-built planner, cached under
  build/cmk-static/), the instances compiled alone with nvcc, loop trips by role, bytes from the plan
* ``toolchain`` ptxas / cuobjdump / nvcc discovery, ahead-of-time compilation, ``ptxas -v`` parsing
* ``sass``      SASS parsing: instructions, classes, loops (backward branches), dynamic mix
* ``predict``   occupancy, the four bounds, the predicted time per kernel
* ``traffic``   the eager reference counted the same way (TorchDispatchMode on meta tensors) and
  saved-for-backward bytes (saved_tensors_hooks)
* ``report``    a workload end to end: JSON and the readable table
"""
LABEL = "static prediction, not a measurement"
