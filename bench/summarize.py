"""Summarize benchmark results: markdown tables, a plot, and the README's performance section.

    python bench/summarize.py                         # the newest bench/results/bench-*.json
    python bench/summarize.py FILE.json [...] --out bench/results/summary.md --plot bench/results/summary.png
    python bench/summarize.py --readme README.md      # rewrite only between <!-- perf:start --> and <!-- perf:end -->

Speedups are against the best *peer* (eager NCHW, eager channels_last, torch.compile default
and max-autotune) timed in the same run. The targets are those of design.md section 7.
matplotlib is optional (the plot is skipped with a message when it is missing). A file
whose metadata says ``"fixture": true`` is test data, not a measurement: it is labelled as
such and never written into the README.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ("eager", "eager-cl", "compile", "compile-max-autotune")
START, END = "<!-- perf:start -->", "<!-- perf:end -->"
STATIC_START, STATIC_END = "<!-- static:start -->", "<!-- static:end -->"
WORKLOAD_NAMES = {"dwconv": "depthwise conv alone", "dw_block": "depthwise block (training mode)",
                  "pw_block": "pointwise block (training mode)", "model": "ConvMixer"}
# design.md section 7: (workload, mode, config, what, threshold)
TARGETS = [
    ("dwconv", "fwd", "1536/20-k9-p7", "speedup", 2.0),
    ("dwconv", "fwd", "1536/20-k9-p7", "roofline", 70.0),
    ("dw_block", "fwd+bwd", "1536/20-k9-p7", "speedup", 3.0),
    ("pw_block", "fwd+bwd", "1536/20-k9-p7", "speedup", 1.3),
    ("model", "train", "1536/20-k9-p7", "speedup", 3.0),
    ("model", "train", "1536/20-k9-p7", "images", 1000.0),
    ("model", "train", "1536/20-k9-p7", "roofline", 50.0),
    ("model", "infer", "1536/20-k9-p7", "speedup", 2.5),
    ("model", "infer", "1536/20-k9-p7", "images", 3000.0),
    ("model", "train", "1536/20-k9-p7", "memory", 0.6),
]


def load(paths: List[str]) -> Tuple[List[dict], List[dict]]:
    """(rows, metas): every result row, tagged with its file, and each file's metadata."""
    rows, metas = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not str(data.get("schema", "")).startswith("convmixer-kernels-bench/"):
            raise ValueError(f"{path}: not a convmixer-kernels bench results file (schema {data.get('schema')!r})")
        meta = dict(data["meta"], file=os.path.relpath(path))
        metas.append(meta)
        for r in data["results"]:
            rows.append(dict(r, _file=meta["file"], _gpu=meta.get("gpu")))
    return rows, metas


def default_files() -> List[str]:
    files = sorted(glob.glob(os.path.join(HERE, "results", "bench-*.json")), key=os.path.getmtime)
    return files[-1:]


def _key(r: dict) -> tuple:
    return (r["_file"], r["workload"], r["mode"], r.get("config", ""), r["shape"], r["dtype"])


def best_peers(rows: List[dict]) -> Dict[tuple, dict]:
    best: Dict[tuple, dict] = {}
    for r in rows:
        if r["provider"] in PEERS and (_key(r) not in best or r["median_ms"] < best[_key(r)]["median_ms"]):
            best[_key(r)] = r
    return best


def _order(provider: str) -> tuple:
    return (PEERS.index(provider), provider) if provider in PEERS else (len(PEERS), provider)


def _groups(rows: List[dict]) -> List[tuple]:
    return sorted({_key(r) for r in rows}, key=lambda k: (list(WORKLOAD_NAMES).index(k[1]) if k[1] in WORKLOAD_NAMES
                                                            else 99, k[3], k[2], k[4]))


def detail_tables(rows: List[dict]) -> str:
    best = best_peers(rows)
    out = []
    for kind in WORKLOAD_NAMES:
        sel = [r for r in rows if r["workload"] == kind]
        if not sel:
            continue
        out += [f"#### {WORKLOAD_NAMES[kind]}", "",
                "| config | mode | shape | provider | median ms | img/s | GB/s | TFLOP/s | % roofline | peak MiB "
                "| vs best peer |",
                "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for key in _groups(sel):
            b = best.get(key)
            for r in sorted((r for r in sel if _key(r) == key), key=lambda r: _order(r["provider"])):
                speed = f"{b['median_ms'] / r['median_ms']:.2f}x" if b else "-"
                out.append(f"| {r.get('config', '')} | {r['mode']} | {r['shape']} | {r['provider']} | "
                           f"{r['median_ms']:.3f} | {r['images_per_s']:,.0f} | {r['gbps']:,.0f} | {r['tflops']:.1f} | "
                           f"{r['roofline_pct']:.0f}% | {r['peak_mem_mb']:,.0f} | {speed} |")
        out.append("")
    return "\n".join(out)


def pivot_table(rows: List[dict]) -> str:
    """One row per workload point, one column per provider: median ms (speedup over the best peer)."""
    best = best_peers(rows)
    providers = sorted({r["provider"] for r in rows}, key=_order)
    out = ["| workload | config | mode | " + " | ".join(providers) + " |",
           "| --- | --- | --- | " + " | ".join("---:" for _ in providers) + " |"]
    for key in _groups(rows):
        cells = []
        for p in providers:
            r = next((r for r in rows if _key(r) == key and r["provider"] == p), None)
            b = best.get(key)
            cells.append("-" if r is None else f"{r['median_ms']:.2f} ms"
                         + (f" ({b['median_ms'] / r['median_ms']:.2f}x)" if b else ""))
        out.append(f"| {WORKLOAD_NAMES.get(key[1], key[1])} | {key[3]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def targets_table(rows: List[dict]) -> str:
    """The design.md section 7 targets: the best fused provider's value, and whether it is met."""
    best = best_peers(rows)
    out = ["| target (design.md §7) | best fused provider | value | met? |", "| --- | --- | ---: | --- |"]
    for workload, mode, config, what, threshold in TARGETS:
        sel = [r for r in rows if (r["workload"], r["mode"], r.get("config")) == (workload, mode, config)]
        fused = [r for r in sel if r["provider"] not in PEERS]
        label = f"{WORKLOAD_NAMES[workload]} {mode}, {config}: " + {
            "speedup": f"≥ {threshold:g}x the best peer", "roofline": f"≥ {threshold:g}% of roofline",
            "images": f"≥ {threshold:,.0f} img/s", "memory": f"peak memory ≤ {threshold:g}x eager"}[what]
        if not fused:
            out.append(f"| {label} | - | not measured | - |")
            continue
        top = min(fused, key=lambda r: r["median_ms"])
        if what == "speedup":
            b = best.get(_key(top))
            value = b["median_ms"] / top["median_ms"] if b else None
            text = f"{value:.2f}x" if value else "no peer"
            met = value is not None and value >= threshold
        elif what == "roofline":
            value, met = top["roofline_pct"], top["roofline_pct"] >= threshold
            text = f"{value:.0f}%"
        elif what == "images":
            value, met = top["images_per_s"], top["images_per_s"] >= threshold
            text = f"{value:,.0f} img/s"
        else:
            eager = next((r for r in sel if r["provider"] == "eager"), None)
            value = top["peak_mem_mb"] / eager["peak_mem_mb"] if eager and eager["peak_mem_mb"] > 0 else None
            text = f"{value:.2f}x" if value is not None else "no eager run"
            met = value is not None and value <= threshold
        out.append(f"| {label} | {top['provider']} | {text} | {'yes' if met else 'no'} |")
    return "\n".join(out)


def provenance(metas: List[dict]) -> str:
    lines = []
    for m in metas:
        label = "FABRICATED TEST FIXTURE, not a measurement: " if m.get("fixture") else ""
        lines.append(f"- {label}{m.get('gpu')} ({m.get('gpu_detail', '')}), torch {m.get('torch')}, "
                     f"triton {m.get('triton')}, CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}; commit "
                     f"`{str(m.get('commit'))[:10]}`{' (dirty tree)' if m.get('dirty') else ''}, {m.get('date')}; "
                     f"file `{m['file']}`")
    return "\n".join(lines)


def markdown(rows: List[dict], metas: List[dict], plot_path: Optional[str] = None, detail: bool = True) -> str:
    parts = ["Timed on the GPU with CUDA events (median), bf16 autocast, batch as shown; every provider passed "
             "the precision rule (design.md §6) against float64 before it was timed. Speedups are over the best "
             "peer (eager NCHW, eager channels_last, torch.compile default / max-autotune) in the same run.", "",
             provenance(metas), "", "**Targets**", "", targets_table(rows), "", "**All workloads** (median ms, "
             "speedup over the best peer)", "", pivot_table(rows), ""]
    if plot_path:
        parts += [f"![speedup over the best peer]({plot_path})", ""]
    if detail:
        parts += ["**Details**", "", detail_tables(rows)]
    return "\n".join(parts).rstrip() + "\n"


def plot(rows: List[dict], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    best = best_peers(rows)
    kinds = [k for k in WORKLOAD_NAMES if any(r["workload"] == k for r in rows)]
    colors = {p: f"C{i % 10}" for i, p in enumerate(sorted({r["provider"] for r in rows}, key=_order))}
    fig, axes = plt.subplots(len(kinds), 1, figsize=(12, 3.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        sel = [r for r in rows if r["workload"] == kind]
        groups = _groups(sel)
        providers = sorted({r["provider"] for r in sel}, key=_order)
        width = 0.8 / max(len(providers), 1)
        for j, p in enumerate(providers):
            ys = []
            for key in groups:
                r = next((r for r in sel if _key(r) == key and r["provider"] == p), None)
                b = best.get(key)
                ys.append(b["median_ms"] / r["median_ms"] if r and b else 0.0)
            ax.bar([i + j * width for i in range(len(groups))], ys, width, label=p, color=colors[p])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{k[3]}\n{k[2]}" for k in groups], fontsize=8)
        ax.set_ylabel("x best peer")
        ax.set_title(WORKLOAD_NAMES[kind])
        ax.legend(fontsize=7, ncol=min(len(providers), 4))
    gpus = sorted({str(r.get("_gpu")) for r in rows})
    fig.suptitle(f"speedup over the best peer ({', '.join(gpus)})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def rewrite_readme(readme: str, section: str, start: str = START, end: str = END) -> None:
    with open(readme) as f:
        text = f.read()
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise SystemExit(f"{readme}: needs the markers {start} and {end} (in that order) around the section; "
                         "nothing was changed")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:  # written whole, then moved: a failure leaves the README as it was
        f.write(head + start + "\n" + section.rstrip() + "\n" + end + tail)
    os.replace(tmp, readme)


# ------------------------------------------------------------------ static predictions (no GPU measurement)


def static_files() -> List[str]:
    return sorted(glob.glob(os.path.join(HERE, "results", "static-sm90-*.json")))


def static_table(paths: List[str]) -> str:
    """The "Static prediction (no GPU measurement)" section from inspect's JSON files."""
    out = ["**Static prediction (no GPU measurement).** `convmixer-kernels inspect` compiles every launch the "
           "package makes for sm_90 without a GPU and predicts each kernel's time from its machine code and counted "
           "bytes against H200 ceilings. These are predictions, not measurements; they are never mixed with the "
           "measured tables.", ""]
    assumptions = None
    out += ["| config | backend | block | phase | kernels | predicted µs | floor µs | % of floor | DRAM passes (budget) |"
            " eager passes (counted) |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    heads, stacks = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not str(data.get("schema", "")).startswith("convmixer-kernels-static/"):
            continue
        assumptions = assumptions or data["meta"].get("assumptions")
        w = data["workload"]
        name = w.get("config") or f"{w['dim']}/{w['depth']}-k{w['kernel_size']}-p{w['patch_size']}"
        for b in data["blocks"]:
            backend = b.get("backend", "triton")
            if b.get("predicted_us") is None:  # a shape the backend refuses
                out.append(f"| {name} | {backend} | {b['block']} | {b['phase']} | - | not run: "
                           f"{str(b.get('error', ''))[:60]} | - | - | - | - |")
                continue
            pct = 100 * b["floor_us"] / b["predicted_us"] if b["predicted_us"] else 0
            ev = b.get("eager_passes_counted")
            passes = f"{b['passes']:.2f} ({b.get('budget_passes') or '-'})" if b.get("passes") is not None else "-"
            out.append(f"| {name} | {backend} | {b['block']} | {b['phase']} | {b['kernels']} | "
                       f"{b['predicted_us']:,.0f} | {b['floor_us']:,.0f} | {pct:.0f}% | {passes} | "
                       f"{f'{ev:.1f}' if ev else '-'} |")
        st, mem, sk = data.get("step") or {}, data.get("memory") or {}, data.get("stack") or {}
        if sk:
            lo = sk["lowest_memory"]
            stacks.append(f"| {name} (batch {w['batch']}) | {sk['predicted_ms']:.1f} ms | {sk['floor_ms']:.1f} ms | "
                          f"{sk['images_per_s_predicted']:,.0f} | {sk['speedup_vs_per_block_fusion']:.2f}x | "
                          f"{sk['passes_per_layer']:.1f} = {sk['dram_vs_eager']:.2f}x | "
                          f"{sk['saved_per_layer_units']:.2f} = {sk['saved_vs_eager']:.2f}x | "
                          f"{lo['saved_per_layer_units']:.2f} = {lo['saved_vs_eager']:.2f}x, {lo['cost_vs_normal']:.2f}x time | "
                          f"{sk['inference_kernels_per_layer']} |")
        if st:
            roof = (f"{st['eager_roofline_ms']:.1f} ms: {st['speedup_vs_eager_roofline']:.2f}x"
                    if st.get("eager_roofline_ms") else "-")
            heads.append(f"| {name} (batch {w['batch']}) | {st['predicted_ms']:.1f} ms | {st['floor_ms']:.1f} ms | "
                         f"{st['images_per_s_predicted']:,.0f} | {roof} | {st['dram_vs_eager']:.2f}x | "
                         f"{mem.get('peak_ratio', 0):.2f}x | `{os.path.relpath(path, os.path.dirname(HERE))}` "
                         f"(commit `{str(data['meta'].get('commit'))[:10]}`) |")
    if heads:
        out += ["", "| training step (layers only) | predicted | floor | img/s predicted "
                "| eager at its roofline: fused speedup, a lower bound (target ≥ 3x) | DRAM vs eager (target ≤ 0.45x) "
                "| saved for backward vs eager (target ≤ 0.5x) | file |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        out += heads
    if stacks:
        out += ["", "The fused layer stack (`FusedSequential` with `memory=\"low\"`; design.md §3.3), one interior "
                "layer x depth:", "",
                "| training step (layers only) | predicted | floor | img/s predicted | vs per-block fusion (speed) "
                "| DRAM passes per layer = vs eager (target ≤ 0.45x) | saved tensors per layer = vs eager (target ≤ 0.5x) "
                "| `memory=\"lowest\"` (target ≤ 0.3x) | eval kernels per layer (target 2) |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        out += stacks
    out += kernel_table(paths) + sweep_table(paths)
    if assumptions:
        out += ["", "Assumptions:"] + [f"- {a}" for a in assumptions]
    return "\n".join(out) + "\n"


KERNEL_TABLE_CONFIG = "1536/20-k9-p7"  # the paper's headline configuration (and the CI guard's)


def kernel_table(paths: List[str]) -> List[str]:
    """Per kernel of the headline configuration, both backends: resources, instruction mix, predicted time."""
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        w = data.get("workload", {})
        if w.get("config") != KERNEL_TABLE_CONFIG or not data.get("kernels"):
            continue
        rows = ["", f"Per kernel, {KERNEL_TABLE_CONFIG} (batch {w['batch']}, {w['dtype']}, {w['layout']}), default "
                "launches:", "",
                "| backend | block | phase | kernel | regs | spill B | instr / FFMA | wgmma | bound | predicted µs | "
                "% of floor |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        cuda = (data.get("cuda_extension") or {}).get("kernels") or []
        for k in list(data["kernels"]) + list(cuda):
            if k.get("candidate"):
                continue
            head = f"| {k.get('backend', 'triton')} | {k['block']} | {k['phase']} | `{k['kernel']}` |"
            if k.get("predicted_us") is None:  # a shape the backend refuses, or a compile error
                rows.append(f"{head} not run: {str(k.get('error') or k.get('compile_error'))[:60]} | | | | | | |")
                continue
            ipf = k.get("instr_per_ffma")
            rows.append(f"{head} {k['registers']} | {k['spill_bytes']} | {f'{ipf:.1f}' if ipf else '-'} | "
                        f"{'yes' if k.get('hgmma') else 'no'} | {k.get('bound', '-')} | {k['predicted_us']:,.1f} | "
                        f"{k.get('roofline_pct', 0):.0f}% |")
        return rows
    return []


def sweep_table(paths: List[str]) -> List[str]:
    """The depthwise block across kernel sizes (static-sm90-dw-k-sweep.json)."""
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not str(data.get("schema", "")).startswith("convmixer-kernels-static-sweep/"):
            continue
        w = data["workload"]
        rows = ["", f"Depthwise block across kernel sizes ({w['dim']} channels, {w['grid_size']}x{w['grid_size']}, "
                f"batch {w['batch']}, {w['dtype']}, {w['layout']}), forward+backward in training:", "",
                "| k | backend | predicted µs | floor µs | % of floor |", "| ---: | --- | ---: | ---: | ---: |"]
        for entry in data["sweep"]:
            for b in entry["blocks"]:
                if b["phase"] != "forward+backward (training)":
                    continue
                backend = b.get("backend", "triton")
                if b.get("predicted_us") is None:
                    rows.append(f"| {entry['kernel_size']} | {backend} | not run: {str(b.get('error'))[:50]} | | |")
                    continue
                pct = 100 * b["floor_us"] / b["predicted_us"] if b["predicted_us"] else 0
                rows.append(f"| {entry['kernel_size']} | {backend} | {b['predicted_us']:,.0f} | {b['floor_us']:,.0f} | "
                            f"{pct:.0f}% |")
        return rows
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="results JSON files (default: the newest bench/results/bench-*.json)")
    ap.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    ap.add_argument("--plot", default=None, help="write the plot here (PNG)")
    ap.add_argument("--readme", default=None, help="rewrite the README's section between the perf markers")
    ap.add_argument("--static", action="store_true", help="the static-prediction table from "
                    "bench/results/static-sm90-*.json (or FILES) instead; with --readme, between "
                    f"{STATIC_START} and {STATIC_END}")
    args = ap.parse_args(argv)
    if args.static:
        paths = args.files or static_files()
        if not paths:
            print("no static-sm90-*.json in bench/results: run convmixer-kernels inspect --json first", file=sys.stderr)
            return 1
        text = static_table(paths)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        elif not args.readme:
            print(text)
        if args.readme:
            rewrite_readme(args.readme, text, STATIC_START, STATIC_END)
            print(f"{args.readme}: static prediction section rewritten", file=sys.stderr)
        return 0
    files = args.files or default_files()
    if not files:
        msg = ("No GPU measurements recorded yet: bench/results/ holds no bench-*.json. Run `pytest bench/` on a "
               "CUDA GPU (scripts/gpu_session.sh bench) and then this script.")
        print(msg, file=sys.stderr)
        if args.readme:
            print(f"{args.readme}: left unchanged (nothing to summarize)", file=sys.stderr)
        return 1
    rows, metas = load(files)
    if not rows:
        print(f"no results in {', '.join(files)}", file=sys.stderr)
        return 1
    fixture = any(m.get("fixture") for m in metas)
    if fixture:
        print("WARNING: a FABRICATED TEST FIXTURE is among the inputs; these are not measurements", file=sys.stderr)
    if args.plot:
        print(plot(rows, args.plot), file=sys.stderr)

    def plot_ref(doc: Optional[str]) -> Optional[str]:
        """The plot's path as a link from ``doc`` (None: no plot)."""
        if not args.plot or not os.path.exists(args.plot):
            return None
        return os.path.relpath(os.path.abspath(args.plot), os.path.dirname(os.path.abspath(doc or "x")))

    text = markdown(rows, metas, plot_ref(args.out))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"summary: {args.out}", file=sys.stderr)
    else:
        print(text)
    if args.readme:
        if fixture:
            print("refusing to put a test fixture into the README", file=sys.stderr)
            return 1
        rewrite_readme(args.readme, markdown(rows, metas, plot_ref(args.readme), detail=False))
        print(f"{args.readme}: performance section rewritten from {', '.join(m['file'] for m in metas)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
