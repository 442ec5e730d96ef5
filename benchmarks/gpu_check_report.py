"""The results folder of ``benchmarks/gpu_check.py``: results.md, results.json, steps.log (the junit files are
pytest's own), the targets of the issues checked against the figures, and the exit status.

Pure Python (no torch): it reads the steps' records, the benchmarks' JSON reports and the junit files.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROLLOUT_X_FLOOR = 1.3  # rollout op at batch 256: at most this multiple of one read of the attention
ROLLOUT_VS_REFERENCE = 50.0  # ... and at least this many times faster than the reference
CAPTURE_X_FORWARD = 1.15  # forward + rollout over the plain forward, batch 256 bf16
OK_STATUSES = ("ok", "dry-run")


# ------------------------------------------------------------------------------------------ inputs
def bench_json(step) -> dict | None:
    """The benchmark step's ``--json`` report, or None."""
    if "--json" not in step.argv:
        return None
    path = Path(step.argv[step.argv.index("--json") + 1])
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_summary(path: Path) -> dict | None:
    """tests / passed / failed / errors / skipped, the failing tests and the commonest skip reasons."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = Counter()
    failures, skips = [], Counter()
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            failures.append(
                f"{name}: {(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}"
            )
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            skips[(case.find("skipped").get("message") or "")[:160]] += 1
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {
        **{k: counts[k] for k in ("tests", "passed", "failed", "errors", "skipped")},
        "failures": failures,
        "skip_reasons": skips.most_common(8),
        "source": path.name,
    }


def output_summary(output: str) -> dict | None:
    """Counts from pytest's last summary line (when no junit file was written)."""
    lines = [x for x in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", x)]
    if not lines:
        return None
    counts = {k: 0 for k in ("passed", "failed", "errors", "skipped")}
    for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1]):
        counts["errors" if word.startswith("error") else word] += int(n)
    return {"tests": sum(counts.values()), **counts, "failures": [], "skip_reasons": [], "source": "output"}


def tests(steps) -> dict:
    out = {}
    for s in steps:
        if s.kind != "pytest" or not s.result or s.result["status"] in ("dry-run", "skipped"):
            continue
        junit = Path(s.argv[s.argv.index("--junitxml") + 1])
        out[s.name] = junit_summary(junit) or output_summary(s.result.get("output", "")) or {}
    return out


# ------------------------------------------------------------------------------------------ targets
def targets(benchmarks: dict) -> list[dict]:
    """Each GPU target of the issues against the measured rows (CUDA rows only; none in a dry run)."""
    out = []
    for name, data in sorted(benchmarks.items()):
        rows = [r for r in (data or {}).get("rows", []) if str(r.get("device", "")).startswith("cuda")]
        if name.startswith("bench-rollout"):
            for r in rows:
                if r["B"] == 256 and r["provider"] in ("cuda", "cuda-op", "triton"):
                    met = (
                        r["x_floor"] <= ROLLOUT_X_FLOOR and r["speedup_vs_reference"] >= ROLLOUT_VS_REFERENCE
                    )
                    out.append(
                        {
                            "target": f"rollout op {r['provider']}, {r['model']} B=256 {r['dtype']}: "
                            f"<= {ROLLOUT_X_FLOOR}x floor and >= {ROLLOUT_VS_REFERENCE:.0f}x reference",
                            "measured": f"{r['x_floor']:.2f}x floor, {r['speedup_vs_reference']:.1f}x reference "
                            f"({r['median_ms']:.3f} ms)",
                            "met": met,
                        }
                    )
        elif name == "bench-capture":
            fused = next((r for r in rows if r["provider"] == "fused"), None)
            if fused and fused.get("ratio") is not None:
                out.append(
                    {
                        "target": f"forward + rollout (fused, {fused['path']}) B={fused['B']} {fused['dtype']}: "
                        f"<= {CAPTURE_X_FORWARD}x the plain forward",
                        "measured": f"{fused['ratio']:.3f}x ({fused['median_ms']:.2f} ms)",
                        "met": fused["ratio"] <= CAPTURE_X_FORWARD,
                    }
                )
            if fused and fused.get("extra_bytes") is not None:
                out.append(
                    {
                        "target": "fused capture's peak over the forward's <= B*L*N^2 float32",
                        "measured": f"{fused['extra_bytes'] / 2**20:.1f} MiB of "
                        f"{fused['budget_extra_bytes'] / 2**20:.1f} MiB",
                        "met": fused["extra_bytes"] <= fused["budget_extra_bytes"],
                    }
                )
        elif name.startswith("bench-prune"):
            for r in rows:
                if r["batch"] == 256 and r["scorer"] != "full":
                    out.append(
                        {
                            "target": f"pruned throughput {r['model']} ({r['autocast']}), {r['scorer']} keep "
                            f"{r['keep_ratio']}, B=256 (no target: reported)",
                            "measured": f"{r['images_per_s']:.0f} images/s, {r['speedup']:.2f}x the full model",
                            "met": None,
                        }
                    )
    return out


def exit_status(results: dict) -> int:
    """1: a test or a step failed; 2: nothing failed but a step timed out or was skipped; 0: all ran."""
    statuses = [s["status"] for s in results["steps"]]
    failed_tests = any(t.get("failed", 0) or t.get("errors", 0) for t in results["tests"].values())
    if failed_tests or "failed" in statuses:
        return 1
    return 2 if any(s not in OK_STATUSES for s in statuses) else 0


# ------------------------------------------------------------------------------------------ writing
def write(out: Path, results: dict, steps) -> int:
    """(Re)write results.json, results.md and steps.log in ``out``; return the exit status so far."""
    done = [s for s in steps if s.result]
    results["steps"] = [{k: v for k, v in s.result.items() if k != "output"} for s in done]
    results["benchmarks"] = {s.name: bench_json(s) for s in done if s.kind == "bench"}
    results["tests"] = tests(done)
    results["targets"] = targets(results["benchmarks"])
    results["pending"] = [s.name for s in steps if not s.result]
    results["exit_status"] = exit_status(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))
    log = []
    for s in done:
        r = s.result
        log += [
            f"===== {s.name}: {r['status']} in {r['seconds']} s (limit {r['timeout_s']} s) {r['note']}",
            f"$ {r['command']}",
            r.get("output", ""),
            "",
        ]
    (out / "steps.log").write_text("\n".join(log))
    return results["exit_status"]


def _table(items: list[dict]) -> str:
    if not items:
        return "(none)"
    keys = list(items[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(i.get(k, "")) for k in keys) + " |" for i in items]
    return "\n".join(lines)


ENV_KEYS = [
    "device",
    "capability",
    "build_arch",
    "sm_count",
    "device_memory_gib",
    "driver",
    "nvidia_smi",
    "torch_cuda",
    "nvcc",
    "cudnn",
    "torch",
    "triton",
    "timm",
    "pytest",
    "python",
    "python_executable",
    "platform",
    "cpu_count",
    "date_utc",
]


def markdown(results: dict) -> str:
    env, git = results.get("env", {}), results.get("git", {})
    dry = results["mode"] == "dry-run"
    title = "dry run (no GPU measurement)" if dry else env.get("device", "GPU")
    md = [
        f"# GPU check: {title}, {env.get('date_utc', results.get('started_utc'))}",
        "",
        f"Command: `{results['command']}` ({results['mode']}; {results.get('seconds') or '...'} s of a "
        f"{results['budget_s']:.0f} s budget; exit status {results['exit_status']}"
        + (f"; not yet run: {', '.join(results['pending'])}" if results.get("pending") else "")
        + ")",
        "",
        "## Environment",
        "",
        "| | |",
        "|---|---|",
    ]
    md += [f"| {k} | {env[k]} |" for k in ENV_KEYS if k in env]
    md += [
        f"| commit | {git.get('commit')} (files changed: {git.get('changed_files')}) |",
        f"| sources sha256/16 | {git.get('source_sha256_16')} |",
        "",
        "## Steps",
        "",
        "| step | status | seconds | limit s | note |",
        "|---|---|---:|---:|---|",
    ]
    md += [
        f"| {s['name']} | {s['status']} | {s['seconds']} | {s['timeout_s'] if s['timeout_s'] is not None else '-'} "
        f"| {s['note'] or ''} |"
        for s in results["steps"]
    ]
    md += ["", "Commands:", ""] + [f"- {s['name']}: `{s['command']}`" for s in results["steps"]]
    md += ["", "## Tests", ""]
    if results["tests"]:
        md += ["| selection | tests | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|---:|"]
        md += [
            f"| {n} | {t.get('tests')} | {t.get('passed')} | {t.get('failed')} | {t.get('errors')} | "
            f"{t.get('skipped')} |"
            for n, t in results["tests"].items()
        ]
        for n, t in results["tests"].items():
            md += [f"- {n} failure: `{f}`" for f in t.get("failures", [])[:40]]
            md += [f"- {n} skipped x{c}: {reason}" for reason, c in t.get("skip_reasons", [])]
    else:
        md += ["Not run" + (" (dry run: the GPU selection was collected, see Steps)." if dry else ".")]
    md += ["", "## Targets", ""]
    if results["targets"]:
        md += ["| target | measured | verdict |", "|---|---|---|"]
        md += [
            f"| {t['target']} | {t['measured']} | "
            f"{'-' if t['met'] is None else ('met' if t['met'] else 'NOT met')} |"
            for t in results["targets"]
        ]
    else:
        md += ["Not measured" + (" (dry run: the smoke rows are CPU figures)." if dry else ".")]
    md += ["", "## Benchmarks"]
    for name, data in results["benchmarks"].items():
        md += ["", f"### {name}", ""]
        if not data:
            md += ["No report (the step did not start or wrote nothing)."]
            continue
        state = (
            "complete" if data.get("complete") else f"incomplete: {data.get('stopped') or 'stopped early'}"
        )
        md += [f"`{data['script']} {' '.join(data['argv'])}` ({state})", ""]
        if data.get("dry_run"):
            md += [
                "Plan at the GPU sizes:",
                "",
                _table(data.get("plan", [])),
                "",
                "Smoke run on the CPU:",
                "",
            ]
        md += [data.get("markdown") or "(no rows)"]
        md += [f"- error in {e['where']}: `{e['error'][:300]}`" for e in data.get("errors", [])]
        if data.get("extra", {}).get("verdict"):
            md += ["", data["extra"]["verdict"].replace("\n", "  \n")]
    return "\n".join(md) + "\n"


def summary(results: dict) -> str:
    """The last lines printed: steps, tests and targets in brief (the device tool returns the output's tail)."""
    lines = ["", "step                    status     seconds"]
    lines += [f"{s['name']:<24}{s['status']:<11}{s['seconds']:>7}" for s in results["steps"]]
    for n, t in results["tests"].items():
        lines.append(
            f"{n}: {t.get('passed')} passed, {t.get('failed')} failed, {t.get('errors')} errors, "
            f"{t.get('skipped')} skipped"
        )
    for t in results["targets"]:
        verdict = "-" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"{verdict:<8}{t['target']}: {t['measured']}")
    return "\n".join(lines)
