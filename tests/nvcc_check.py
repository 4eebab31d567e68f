"""The nvcc compile check of csrc/kernels (.ci/compile_cuda.sh), run in the foreground or beside the suite.

conftest.py starts it in the background when a whole run is collected (see
``pytest_collection_modifyitems``); ``test_every_kernel_source_compiles_with_nvcc`` then takes its
result from ``result()``, which waits for that run or, when none was started, compiles now.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from typing import Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, ".ci", "compile_cuda.sh")
TIMEOUT_S = 1800

_background: Optional[Tuple[subprocess.Popen, "tempfile._TemporaryFileWrapper"]] = None


def available() -> bool:
    return shutil.which("nvcc") is not None


def start_in_background(jobs: int) -> None:
    """Launch the compile with ``jobs`` parallel nvcc processes, its output to a temporary file."""
    global _background
    if _background is not None:
        return
    log = tempfile.TemporaryFile(mode="w+")
    env = dict(os.environ, CMK_COMPILE_JOBS=str(jobs))
    # its own process group, so that stopping it also stops the nvcc processes it started
    proc = subprocess.Popen(["bash", SCRIPT], stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    _background = (proc, log)


def result() -> Tuple[int, str]:
    """(exit status, output) of the compile: the background run's, or a foreground run's."""
    global _background
    if _background is None:
        proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=TIMEOUT_S)
        return proc.returncode, proc.stdout + proc.stderr
    proc, log = _background
    _background = None
    try:
        status = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise
    log.seek(0)
    output = log.read()
    log.close()
    return status, output


def stop_background() -> None:
    """End a background compile whose test never ran (an interrupted or failing-fast run)."""
    global _background
    if _background is None:
        return
    proc, log = _background
    _background = None
    _kill(proc)
    log.close()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
