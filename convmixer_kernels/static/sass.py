"""SASS (``cuobjdump -sass``) parsing: instructions, their classes, loops, and the dynamic mix.

A loop is a backward branch: ``BRA`` (possibly predicated) to a lower address; its body is
[target, branch]. Loops nest by address containment. The dynamic count of an instruction is
1 times the trip count of every loop containing it; forward branches are taken as executing
both sides (an upper bound for kernels whose ``if``s are on constexprs or masks, which is what
this package's kernels have). Counts are per warp: every warp of a program runs the same stream.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_BRA_TARGET = re.compile(r"0x([0-9a-f]+)")

CLASSES = ("FFMA", "HFMA2", "HGMMA", "HMMA", "LDG", "STG", "LDS", "STS", "LDGSTS", "LDSM", "LDL", "STL",
           "ATOM", "RED", "BAR", "SHFL", "MUFU", "other")


@dataclass
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. LDG.E.128
    operands: str
    predicated: bool

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def cls(self) -> str:
        b = self.base
        if b == "HFMA2" and "-RZ, RZ" in self.operands:  # ptxas' move-immediate idiom, not math
            return "other"
        if b in ("FFMA", "HFMA2", "HGMMA", "HMMA", "LDG", "STG", "LDS", "STS", "LDGSTS", "LDSM", "LDL", "STL",
                 "BAR", "SHFL", "MUFU"):
            return b
        if b in ("ATOM", "ATOMG", "ATOMS"):
            return "ATOM"
        if b in ("RED", "REDG"):
            return "RED"
        return "other"

    @property
    def width_bits(self) -> Optional[int]:
        """Access width of a memory instruction (bits per thread)."""
        if self.cls not in ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDGSTS"):
            return None
        mods = self.opcode.split(".")[1:]
        for m, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("16", 16), ("U8", 8), ("S8", 8)):
            if m in mods:
                return bits
        return 32


@dataclass
class Loop:
    start: int
    end: int  # address of the backward branch
    children: List["Loop"] = field(default_factory=list)
    trip: float = 1.0
    matched: bool = False

    def contains(self, addr: int) -> bool:
        return self.start <= addr <= self.end

    def as_dict(self) -> dict:
        return {"start": hex(self.start), "end": hex(self.end), "body_instructions": (self.end - self.start) // 16 + 1,
                "trip": self.trip, "matched": self.matched, "children": [c.as_dict() for c in self.children]}


@dataclass
class Function:
    name: str
    instrs: List[Instr]
    loops: List[Loop]  # top-level loops, in address order

    def all_loops(self) -> List[Loop]:
        out, todo = [], list(self.loops)
        while todo:
            lp = todo.pop(0)
            out.append(lp)
            todo = lp.children + todo
        return out

    def multiplier(self, addr: int) -> float:
        m, level = 1.0, self.loops
        while True:
            inner = next((lp for lp in level if lp.contains(addr)), None)
            if inner is None:
                return m
            m *= inner.trip
            level = inner.children

    def static_mix(self) -> Dict[str, int]:
        return _mix(self.instrs, lambda i: 1.0)

    def dynamic_mix(self) -> Dict[str, float]:
        """Warp-instructions per warp, by class (and memory classes by width), loops times trips."""
        return _mix(self.instrs, lambda i: self.multiplier(i.addr))


def _mix(instrs: List[Instr], weight) -> Dict[str, float]:
    out: Dict[str, float] = {c: 0 for c in CLASSES}
    out["total"] = 0
    for ins in instrs:
        if ins.opcode == "BRA" and _BRA_TARGET.search(ins.operands) and \
                int(_BRA_TARGET.search(ins.operands).group(1), 16) == ins.addr:
            continue  # the trailing `BRA self` after EXIT never runs
        if ins.opcode == "NOP":
            continue
        w = weight(ins)
        out[ins.cls] += w
        out["total"] += w
        bits = ins.width_bits
        if bits is not None:
            key = f"{ins.cls}.{bits}"
            out[key] = out.get(key, 0) + w
    return out


def _loops(instrs: List[Instr]) -> List[Loop]:
    flat = []
    for ins in instrs:
        if ins.base != "BRA":
            continue
        m = _BRA_TARGET.search(ins.operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < ins.addr:
            flat.append(Loop(target, ins.addr))
    # several backward branches to one target (continue-like paths) are one loop: keep the outermost end
    merged: Dict[int, Loop] = {}
    for lp in flat:
        if lp.start not in merged or lp.end > merged[lp.start].end:
            merged[lp.start] = lp
    roots: List[Loop] = []
    for lp in sorted(merged.values(), key=lambda l: (l.start, -l.end)):
        level = roots
        while True:
            parent = next((p for p in level if p.start <= lp.start and lp.end <= p.end), None)
            if parent is None:
                level.append(lp)
                break
            level = parent.children
    return roots


def parse(text: str) -> List[Function]:
    """Every function of a ``cuobjdump -sass`` listing."""
    funcs: List[Function] = []
    name, instrs = None, []
    for line in text.splitlines():
        fm = _FUNC.match(line)
        if fm:
            if name is not None:
                funcs.append(Function(name, instrs, _loops(instrs)))
            name, instrs = fm.group(1), []
            continue
        m = _LINE.match(line)
        if m and name is not None:
            instrs.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), bool(m.group(2))))
    if name is not None:
        funcs.append(Function(name, instrs, _loops(instrs)))
    return funcs
