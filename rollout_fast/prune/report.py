"""The prune-eval result as Markdown tables, files (CSV, JSON, Markdown) and the top-1 plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..checkpoint import check_output_dir, remove_outputs

__all__ = ["PRUNE_OUTPUTS", "format_table", "plot_prune_eval", "write_prune_eval"]

# what write_prune_eval writes in its folder (an earlier run's are refused, or removed with overwrite)
PRUNE_OUTPUTS = ("results.csv", "throughput.csv", "results.json", "results.md", "prune_top1.png")


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
    out = Path(out)
    remove_outputs(out, check_output_dir(out, PRUNE_OUTPUTS, overwrite=overwrite))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in (("results.csv", result["rows"]), ("throughput.csv", result["throughput"])):
        if table:
            with (out / name).open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(table[0]))
                w.writeheader()
                w.writerows(table)
            paths.append(out / name)
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
