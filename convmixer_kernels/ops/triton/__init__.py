"""The Triton backend: one file per op, plus the plumbing they share (``common.py``)."""
