"""The prune-eval results as Markdown tables, files (CSV, JSON, Markdown) and plots: the scorer study
(:func:`~rollout_fast.prune.prune_eval`: top-1 against the fraction dropped) and the method comparison
(:func:`~rollout_fast.prune.study.compare_methods`: top-1 against the measured speed-up)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..checkpoint import check_output_dir, remove_outputs

__all__ = ["METHOD_OUTPUTS", "PRUNE_OUTPUTS", "format_methods_table", "format_table", "plot_methods",
           "plot_prune_eval", "write_methods", "write_prune_eval"]

# what compare_methods' writer puts in its folder
METHOD_OUTPUTS = ("methods.csv", "methods.json", "methods.md", "methods_top1_speedup.png")
# what either writer puts in a prune-eval folder (an earlier run's are refused, or removed with overwrite)
PRUNE_OUTPUTS = ("results.csv", "throughput.csv", "results.json", "results.md", "prune_top1.png", *METHOD_OUTPUTS)


def format_table(result: dict) -> str:
    """Markdown tables: top-1 per scorer and fraction dropped, then throughput."""
    rows = result["rows"]
    lines = []
    if rows:
        lines = _accuracy_table(result)
    if result["throughput"]:
        lines += ["", "| scorer | keep | batch | images/s | speed-up |", "|---|---|---|---|---|"]
        for t in result["throughput"]:
            lines.append(f"| {t['scorer']} | {t['keep_ratio']} | {t['batch']} | {t['images_per_s']:.1f} | "
                         f"{t['speedup']:.2f}x |")
    if result.get("scorer_cost"):
        batch = next(k for k in result["scorer_cost"][0] if k.startswith("ms_per_image_batch"))
        head = ("| scorer (its network alone) | params | MACs/image | latency batch 1 | ms/image batch "
                f"{batch[len('ms_per_image_batch'):]} |")
        lines += ["", head, "|---|---|---|---|---|"]
        for c in result["scorer_cost"]:
            lines.append(f"| {c['scorer']} | {c['params'] / 1e6:.3f} M | {c['macs_per_image'] / 1e6:.2f} M | "
                         f"{c['latency_ms_batch1']:.3f} ms | {c[batch]:.4f} |")
    return "\n".join(lines)


def _accuracy_table(result: dict) -> list[str]:
    rows = result["rows"]
    keeps = list(dict.fromkeys(r["keep_ratio"] for r in rows))
    scorers = list(dict.fromkeys(r["scorer"] for r in rows))
    by = {(r["scorer"], r["keep_ratio"]): r for r in rows}
    head = "| scorer | " + " | ".join(f"keep {k} ({by[(scorers[0], k)]['dropped_fraction']:.0%} dropped)" for k in keeps) + " |"
    lines = [head, "|---" * (len(keeps) + 1) + "|"]
    for s in scorers:
        cells = []
        for k in keeps:
            r = by[(s, k)]
            cells.append(f"{r['top1']:.4f}" + (f" ± {r['top1_std']:.4f}" if r["seeds"] > 1 else ""))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append(f"\nfull model top-1 {result['meta']['full_top1']:.4f} on {result['meta']['images']} images")
    return lines


def write_prune_eval(result: dict, out, *, overwrite: bool = False) -> list:
    """Write ``results.csv``, ``throughput.csv``, ``results.json``, ``results.md`` and ``prune_top1.png``
    (:data:`PRUNE_OUTPUTS`; the tables only when the result has rows) to ``out``.

    With ``overwrite`` an earlier run's files are removed first, so the folder matches ``results.json``.

    Raises:
        FileExistsError: ``out`` holds an earlier run and ``overwrite`` is False (nothing is written).
        NotADirectoryError / PermissionError: ``out`` is a file, or cannot be written.
    """
    out = _prepare(out, overwrite)
    paths = []
    for name, table in (("results.csv", result["rows"]), ("throughput.csv", result["throughput"])):
        if table:
            paths.append(_write_csv(out / name, table))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(format_table(result) + "\n")
    paths += [out / "results.json", out / "results.md"]
    if result["rows"]:
        paths.append(plot_prune_eval(result, out / "prune_top1.png"))
    return paths


def plot_prune_eval(result: dict, path):
    """Top-1 against the fraction of patch tokens dropped, one curve per scorer (random: mean ± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in dict.fromkeys(r["scorer"] for r in result["rows"]):
        rs = sorted((r for r in result["rows"] if r["scorer"] == s), key=lambda r: r["dropped_fraction"])
        x = [r["dropped_fraction"] for r in rs]
        y = [r["top1"] for r in rs]
        label = s + (f" (mean of {rs[0]['seeds']} seeds ± std)" if rs[0]["seeds"] > 1 else "")
        line, = ax.plot(x, y, marker="o", label=label)
        if rs[0]["seeds"] > 1:
            sd = [r["top1_std"] for r in rs]
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                            color=line.get_color(), alpha=0.2)
    m = result["meta"]
    ax.axhline(m["full_top1"], color="gray", ls="--", lw=1, label=f"full model ({m['full_top1']:.3f})")
    ax.set_xlabel("fraction of patch tokens dropped before the blocks")
    ax.set_ylabel("top-1")
    ax.set_title(f"{m.get('model', 'model')}: pruned inference on {m['images']} images", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _prepare(out, overwrite: bool) -> Path:
    """``out`` checked (an earlier prune-eval run refused, or removed with ``overwrite``) and created."""
    out = Path(out)
    remove_outputs(out, check_output_dir(out, PRUNE_OUTPUTS, overwrite=overwrite))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_csv(path: Path, table: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    return path


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def format_methods_table(result: dict) -> str:
    """The method comparison as one Markdown table (README-ready): method, setting, mean tokens per block,
    top-1 and its change against the full model, then images/s and speed-up for each timed batch size; a
    line below names the images, device and threads."""
    rows, m = result["rows"], result["meta"]
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    timed = [b for b in batches if b is not None]
    head = ["method", "setting", "tokens/block", "top-1", "Δ top-1"]
    head += [c for b in timed for c in (f"images/s (batch {b})", f"speed-up (batch {b})")]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    by = {(r["method"], r["setting"], r["batch"]): r for r in rows}
    full = m["full_top1"]
    for method, setting in dict.fromkeys((r["method"], r["setting"]) for r in rows):
        r = by[(method, setting, batches[0])]
        delta = None if r["top1"] is None or full is None else r["top1"] - full
        cells = [method, setting, f"{r['tokens']:g}", _fmt(r["top1"], ".4f"), _fmt(delta, "+.4f")]
        for b in timed:
            t = by[(method, setting, b)]
            cells += [_fmt(t["images_per_s"], ".1f"), _fmt(t["speedup"], ".2f") + "x"]
        lines.append("| " + " | ".join(cells) + " |")
    seen = f"top-1 on {m['images']} images" if m["images"] else "throughput only"
    if m.get("top1_from"):
        seen += f" (from the run in {m['top1_from']['folder']})"
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
    lines.append(f"\n{m.get('model', 'model')}: {seen}; images/s on {m['device']} ({threads}), each method "
                 "timed in alternation with the full model, its own cost included")
    return "\n".join(lines)


def write_methods(result: dict, out, *, overwrite: bool = False) -> list:
    """Write ``methods.csv`` (one row per method, setting and batch), ``methods.json`` (the whole result),
    ``methods.md`` (:func:`format_methods_table`) and, when matplotlib is installed and the result has both
    top-1 and timings, ``methods_top1_speedup.png`` (:func:`plot_methods`) to ``out``.

    Raises:
        FileExistsError: ``out`` holds an earlier prune-eval run and ``overwrite`` is False (nothing written).
        NotADirectoryError / PermissionError: ``out`` is a file, or cannot be written.
    """
    out = _prepare(out, overwrite)
    paths = [_write_csv(out / "methods.csv", result["rows"])]
    (out / "methods.json").write_text(json.dumps(result, indent=2))
    (out / "methods.md").write_text(format_methods_table(result) + "\n")
    paths += [out / "methods.json", out / "methods.md"]
    plottable = any(r["top1"] is not None and r["speedup"] is not None for r in result["rows"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plottable = False
    if plottable:
        paths.append(plot_methods(result, out / "methods_top1_speedup.png"))
    return paths


def plot_methods(result: dict, path):
    """Top-1 against the measured speed-up, one curve per method (points labelled with their setting), the
    full model at 1x; one panel per timed batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, m = result["rows"], result["meta"]
    batches = [b for b in dict.fromkeys(r["batch"] for r in rows) if b is not None]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), dpi=120, squeeze=False)
    for ax, b in zip(axes[0], batches):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
            rs = sorted((r for r in rows if r["method"] == method and r["batch"] == b), key=lambda r: r["speedup"])
            line, = ax.plot([r["speedup"] for r in rs], [r["top1"] for r in rs], marker="o", label=method)
            for r in rs:
                ax.annotate(r["setting"], (r["speedup"], r["top1"]), fontsize=6, color=line.get_color(),
                            xytext=(3, 3), textcoords="offset points")
        ax.axhline(m["full_top1"], color="gray", ls="--", lw=1)
        ax.plot([1.0], [m["full_top1"]], marker="*", ms=10, color="black", ls="", label=f"full ({m['full_top1']:.3f})")
        ax.set_xlabel(f"speed-up over the full model (images/s, batch {b}, {m['device']})")
        ax.set_ylabel("top-1")
        ax.set_title(f"{m.get('model', 'model')}: {m['images']} images", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
