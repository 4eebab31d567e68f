"""Result files: every record of a run with what traces it (GPU, versions, commit, date, roofline)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import List, Optional

import torch

from .roofline import H100

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_metadata() -> dict:
    """What a result file needs to be traced: the GPU, versions, the commit and the date."""
    from convmixer_kernels import __version__

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "convmixer_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "roofline": H100.as_dict(),
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:  # triton missing: the record says so
        meta["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["gpu_detail"] = f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    return meta


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower() or "unknown"


class ResultsFile:
    """Records of one run, rewritten to one JSON file after every record, with the run's metadata
    (a run cut short, say by a device time limit, still leaves what it measured).

    ``path`` is a file, or a folder where ``<kind>-<gpu>-<date>-<commit>.json`` is created.
    """

    def __init__(self, path: str, kind: str, meta: Optional[dict] = None):
        self.target, self.kind, self.meta = path, kind, meta
        self.records: List[dict] = []
        self.path: Optional[str] = None

    def add(self, record: dict) -> None:
        if self.meta is None:
            self.meta = run_metadata()
        if self.path is None:
            if self.target.endswith(".json"):
                self.path = self.target
            else:
                date = str(self.meta.get("date", ""))[:19].replace(":", "")
                gpu, commit = slug(self.meta.get("gpu") or "cpu"), str(self.meta.get("commit"))[:7]
                name = f"{self.kind}-{gpu}-{date}-{commit}.json"
                self.path = os.path.join(self.target, name)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.records.append(record)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"schema": f"convmixer-kernels-{self.kind}/1", "meta": self.meta, "results": self.records},
                      f, indent=1)
        os.replace(tmp, self.path)
