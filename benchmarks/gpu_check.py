"""One prepared GPU check (issue 17): build, the tests that skip on the CPU, every benchmark, one results folder.

GPU time comes in short pieces (about 15 minutes of one H100/H200, no internet, the repository plus at most
64 MiB travelling with the command), so the whole check is this one command, within ``--budget-s`` (default
480 s), each step in a subprocess with its own time limit and its output captured:

=================  ======  ===============================================================================
step               budget  what
=================  ======  ===============================================================================
env                10 s    device, driver, CUDA, nvcc, torch, triton, timm, python (a child process)
build              165 s   ``pip install --no-build-isolation --no-deps -e .`` with TORCH_CUDA_ARCH_LIST
                           the device's capability (9.0 without one) and MAX_JOBS the CPU count
info               15 s    ``python -m rollout_fast.info``
tests-gpu          120 s   ``pytest -m "cuda or triton" tests/ops tests/capture`` (-x off; junit-gpu.xml):
                           the CUDA and Triton backends of the rollout op, the gather, the fused attention
                           and its capture, torch.compile over them, opcheck
bench-rollout-*    30 s    bench_rollout.py, DeiT-S/ViT-B/ViT-L/ViT-B-384, batch 256/32/1, float32 and
                           bfloat16: reference, per-sample loop (batch <= 32), cuda, triton, floor
bench-capture      35 s    bench_capture.py: deit_small-shaped random model, batch 256, bf16: plain forward,
                           fused capture, qk-hooks, vit-explain-style capture, grad; peak memory
bench-gather       12 s    bench_gather.py, batch 1/32/256, keep 0.5/0.25
bench-prune-*      15 s    bench_prune.py at keep 0.5/0.25: a random-init deit_small at 224 (bf16 autocast;
                           random, cls-attention) and the embedded cifar10-vit with its shipped student
bench-attention    15 s    bench_attention.py, batch 1/32/256 bf16
tests-rest         rest    the other tests of tests/ops and tests/capture (junit-rest.xml), on the time left
=================  ======  ===============================================================================

A step may use the time earlier steps left unused, never the time later steps' budgets reserve; a step
that would start with less than 10 s is recorded as skipped; one that runs past its limit gets SIGINT
(pytest then still writes its junit file; the benchmarks have already written every group they measured)
and is recorded as a timeout. After every step ``results.md`` (paste into benchmarks/RESULTS.md),
``results.json`` (every figure, the plans, the steps, the test summary, the environment) and ``steps.log``
(each step's command and output) are rewritten in the output folder: ``--out``, else $GPU_CHECK_OUT, else
$OUT (the device machine's), else benchmarks/results/<date>-<device>/. At most 5 files. Exit status 1 when a
test or a step failed, 2 when nothing failed but a step timed out or was skipped, else 0.

Without a GPU (or with ``--dry-run``) the same command runs the CPU-side parts: the build (unless
``--skip-build``: then its command is checked and recorded), ``rollout_fast.info``, ``pytest --collect-only`` of
the GPU selection (which must find the CUDA, Triton, opcheck and torch.compile tests of every op), and every
benchmark with ``--dry-run`` (the plan at the sizes the GPU run uses, then its ``--smoke`` variant on the CPU,
all in one child process). tests/test_gpu_check.py runs that in CI.

Usage::

    make gpu-check                                             # python3 (or .venv's) benchmarks/gpu_check.py
    python3 benchmarks/gpu_check.py --out /tmp/gc              # or GPU_CHECK_OUT=/tmp/gc
    python3 benchmarks/gpu_check.py --dry-run --skip-build --out /tmp/gc        # what CI runs
    python3 benchmarks/gpu_check.py --only tests-gpu bench-capture --budget-s 200 --skip-build   # a rerun
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check_report as report  # noqa: E402

TOTAL_BUDGET_S = 480.0
WRITE_RESERVE_S = 5.0
MIN_STEP_S = 10.0
KILL_GRACE_S = 8.0
BENCH_MARGIN_S = 6.0  # a benchmark stops starting new groups this long before its step's limit
DEFAULT_ARCH = "9.0"
TEST_ROOMS = ["tests/ops", "tests/capture"]
GPU_SELECTION = "cuda or triton"
# every one of these must be in the GPU selection: (test file, a substring of some test name there)
EXPECTED_GPU_TESTS = [
    ("tests/ops/test_rollout.py", "test_cuda_matches_reference"),
    ("tests/ops/test_rollout.py", "test_triton_matches_reference"),
    ("tests/ops/test_rollout_kernels.py", "opcheck_compiled_cuda"),
    ("tests/ops/test_rollout_kernels.py", "opcheck_triton"),
    ("tests/ops/test_rollout_kernels.py", "torch_compile_cuda"),
    ("tests/ops/test_rollout_kernels.py", "torch_compile_triton"),
    ("tests/ops/test_gather.py", "cuda"),
    ("tests/ops/test_gather.py", "triton"),
    ("tests/ops/test_attention.py", "opcheck_cuda"),
    ("tests/ops/test_attention.py", "torch_compile_cuda"),
    ("tests/capture/test_fused_capture.py", "triton"),
]

PROBE = r"""
import datetime, importlib.util, json, os, platform, shutil, subprocess, sys
info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "python_executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count()}
def run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (r.stdout or r.stderr).strip()
    except Exception as e:
        return f"unavailable ({type(e).__name__})"
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                sm_count=p.multi_processor_count, device_memory_gib=round(p.total_memory / 2 ** 30, 1),
                cudnn=torch.backends.cudnn.version())
for mod in ("triton", "timm", "pytest", "hypothesis"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = f"not available ({type(e).__name__})"
info["pytest_timeout"] = importlib.util.find_spec("pytest_timeout") is not None
info["nvcc"] = run(["nvcc", "--version"]).splitlines()[-1] if shutil.which("nvcc") else "not on PATH"
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"])
    info["driver"] = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()[0]
print(json.dumps(info))
"""


@dataclass
class Step:
    name: str
    budget_s: float
    kind: str                      # probe | build | run | pytest | bench
    argv: list[str]
    env: dict = field(default_factory=dict)
    optional: bool = False         # runs on the time left over only
    result: dict = field(default_factory=dict)
    display: str | None = None     # how the command is shown, when not the argv itself

    def command(self) -> str:
        if self.display:
            return self.display
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        argv = [Path(a).name if a == sys.executable else a for a in self.argv]
        return (prefix + " " if prefix else "") + " ".join(shlex.quote(str(a)) for a in argv)


# ----------------------------------------------------------------------------------------- the plan
def arch_list(info: dict) -> str:
    """TORCH_CUDA_ARCH_LIST for the build: $TORCH_CUDA_ARCH_LIST, else the device's capability, else 9.0."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    cap = info.get("capability")
    return f"{cap[0]}.{cap[1]}" if cap else DEFAULT_ARCH


def bench_steps(py: str, work: Path) -> list[Step]:
    """The benchmark steps at GPU sizes (``--json`` into ``work``; ``--budget-s`` is added when run)."""
    def bench(name, budget, script, *args):
        return Step(name, budget, "bench", [py, f"benchmarks/{script}", *args, "--json", str(work / f"{name}.json")])

    rollout = ["--device", "cuda", "--batches", "256", "32", "1", "--batch-major", "--loop-max-batch", "32",
               "--max-gib", "60", "--reps", "10", "--slow-reps", "2", "--warmup", "2"]
    return [
        bench("bench-rollout-float32", 30, "bench_rollout.py", *rollout, "--dtype", "float32"),
        bench("bench-rollout-bfloat16", 30, "bench_rollout.py", *rollout, "--dtype", "bfloat16"),
        bench("bench-capture", 35, "bench_capture.py", "--device", "cuda", "--dtype", "bfloat16", "--batch", "256",
              "--providers", "forward", "fused", "qk-hooks", "vit-explain", "grad", "--reps", "10",
              "--slow-reps", "2", "--warmup", "2"),
        bench("bench-gather", 12, "bench_gather.py", "--device", "cuda", "--dtype", "bfloat16",
              "--batches", "1", "32", "256", "--keep", "0.5", "0.25", "--reps", "20", "--warmup", "3"),
        bench("bench-prune-deit", 15, "bench_prune.py", "--device", "cuda", "--model", "deit_small_patch16_224",
              "--scorers", "random", "cls-attention", "--keeps", "0.5", "0.25", "--batches", "1", "256",
              "--autocast", "bfloat16", "--min-time", "0.3"),
        bench("bench-prune-cifar", 13, "bench_prune.py", "--device", "cuda", "--model", "cifar10-vit",
              "--scorers", "random", "cls-attention", "student", "--keeps", "0.5", "0.25", "--batches", "256",
              "--min-time", "0.3"),
        bench("bench-attention", 15, "bench_attention.py", "--device", "cuda", "--dtype", "bfloat16",
              "--batches", "1", "32", "256", "--reps", "10", "--warmup", "2"),
    ]


def plan_steps(py: str, info: dict, out: Path, work: Path, pytest_timeout: bool) -> list[Step]:
    """Every step after ``env``, in order."""
    build_env = {"TORCH_CUDA_ARCH_LIST": arch_list(info),
                 "MAX_JOBS": os.environ.get("MAX_JOBS", str(info.get("cpu_count") or os.cpu_count() or 4))}
    pytest = [py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts="]
    if pytest_timeout:  # the plugin loads itself (entry point); a hung test then fails alone
        pytest += ["--timeout", "90"]
    return [
        Step("build", 165, "build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                                     "--disable-pip-version-check", "-e", "."], build_env),
        Step("info", 15, "run", [py, "-m", "rollout_fast.info"]),
        Step("tests-gpu", 120, "pytest", [*pytest, "-m", GPU_SELECTION, "--junitxml", str(out / "junit-gpu.xml"),
                                          *TEST_ROOMS]),
        *bench_steps(py, work),
        Step("tests-rest", 0, "pytest", [*pytest, "-m", f"not ({GPU_SELECTION})", "--junitxml",
                                         str(out / "junit-rest.xml"), *TEST_ROOMS], optional=True),
    ]


def step_timeout(step: Step, later: list[Step], remaining: float) -> float:
    """Seconds ``step`` may run: its budget plus whatever the later steps' budgets do not reserve (an
    optional step: everything left), never past the total deadline less the write reserve."""
    avail = remaining - WRITE_RESERVE_S
    if step.optional:
        return avail
    reserved = sum(s.budget_s for s in later if not s.optional)
    return min(avail, max(step.budget_s, avail - reserved))


# ------------------------------------------------------------------------------------ running steps
def child_env(dry: bool, extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    if dry:  # the dry run's benchmarks measure the CPU kernels, not Triton's interpreter
        env.pop("TRITON_INTERPRET", None)
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """A step's process (its own process group, output captured), started now, waited for later."""

    def __init__(self, argv: list[str], env: dict):
        self.t0 = time.monotonic()
        # SIGINT back to its default in the child: a parent started in the background (nohup, `cmd &`) ignores
        # it, the child would inherit that, and pytest would not write its junit file at the step's limit
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True,
                                     preexec_fn=_default_sigint)

    def wait(self, timeout: float) -> tuple[int | None, str, float, bool]:
        """(return code, output, seconds, timed out), ``timeout`` counted from the start: SIGINT to the process
        group then, SIGKILL ``KILL_GRACE_S`` later."""
        proc, timed_out = self.proc, False
        try:
            out, _ = proc.communicate(timeout=max(0.5, timeout - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
        return proc.returncode, out or "", time.monotonic() - self.t0, timed_out


def run_command(argv: list[str], env: dict, timeout: float) -> tuple[int | None, str, float, bool]:
    return Child(argv, env).wait(timeout)


def record(step: Step, status: str, seconds: float, timeout: float | None, rc=None, note: str = "",
           output: str = "") -> None:
    step.result = {"name": step.name, "status": status, "seconds": round(seconds, 1), "budget_s": step.budget_s,
                   "timeout_s": None if timeout is None else round(timeout, 1), "rc": rc, "command": step.command(),
                   "note": note, "output": output}


def execute(step: Step, timeout: float, dry: bool) -> None:
    """Run one step for real (GPU mode, or the build/info/probe in a dry run)."""
    argv = list(step.argv)
    if step.kind == "bench":
        argv += ["--budget-s", f"{max(1.0, timeout - BENCH_MARGIN_S):.0f}"]
    rc, out, secs, timed_out = run_command(argv, child_env(dry, step.env), timeout)
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    note = f"stopped at its {timeout:.0f} s limit" if timed_out else ("" if rc == 0 else f"exit status {rc}")
    data = report.bench_json(step) if step.kind == "bench" else None
    if data and data.get("errors"):
        note += f"; {len(data['errors'])} measurements raised (see Benchmarks)"
    if status == "ok" and data is not None and not data.get("complete"):
        status, note = "incomplete", data.get("stopped") or "the benchmark did not finish"
    record(step, status, secs, timeout, rc, note.strip("; "), out)


# ---------------------------------------------------------------------------------- the dry run
def dry_build(step: Step, py: str) -> None:
    """The build's command checked, not run: setup.py reads the variables, pip is there, the arch list parses."""
    problems = []
    setup = (REPO / "setup.py").read_text()
    for var in step.env:
        if var not in setup:
            problems.append(f"setup.py does not mention {var}")
    if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?([; ]\d+\.\d+a?(\+PTX)?)*", step.env["TORCH_CUDA_ARCH_LIST"]):
        problems.append(f"TORCH_CUDA_ARCH_LIST {step.env['TORCH_CUDA_ARCH_LIST']!r} does not parse")
    rc, out, secs, _ = run_command([py, "-m", "pip", "--version"], child_env(True), 60)
    if rc != 0:
        problems.append(f"pip is not available: {out.strip()[-300:]}")
    record(step, "failed" if problems else "dry-run", secs, None, rc, "; ".join(problems) or
           "command checked, not run (--skip-build): setup.py reads TORCH_CUDA_ARCH_LIST and MAX_JOBS, pip found",
           out)


def start_collect(step: Step) -> Child:
    """``pytest --collect-only`` of the step's selection (no junit file)."""
    argv = [a for a in step.argv if a != "-rfEs"]
    i = argv.index("--junitxml")
    return Child(argv[:i] + argv[i + 2:] + ["--collect-only"], child_env(True))


def finish_collect(step: Step, child: Child, timeout: float) -> None:
    """The collection must hold every expected test of the GPU selection."""
    rc, out, secs, timed_out = child.wait(timeout)
    ids = [line.strip() for line in out.splitlines() if "::" in line]
    missing = [f"{f}::*{s}*" for f, s in EXPECTED_GPU_TESTS
               if step.name == "tests-gpu" and not any(i.startswith(f + "::") and s in i for i in ids)]
    ok = rc == 0 and not timed_out and ids and not missing
    note = f"{len(ids)} tests collected" + (f"; missing from the selection: {', '.join(missing)}" if missing else "")
    record(step, "dry-run" if ok else "failed", secs, timeout, rc, note, out)
    step.result["collected"] = len(ids)


def start_benches(steps: list[Step], work: Path) -> Child:
    """Every benchmark step's command line with ``--dry-run`` (the plan at GPU sizes, then ``--smoke`` on the
    CPU), all in one child process (:func:`bench_child`) to pay for the imports once."""
    spec = [{"name": s.name, "script": s.argv[1], "argv": s.argv[2:] + ["--dry-run"]} for s in steps]
    (work / "bench-dry-spec.json").write_text(json.dumps(spec))
    return Child([sys.executable, str(Path(__file__).resolve()), "--bench-child", str(work / "bench-dry-spec.json"),
                  str(work / "bench-dry-result.json")], child_env(True))


def finish_benches(steps: list[Step], child: Child, work: Path, timeout: float) -> None:
    rc, out, _, timed_out = child.wait(timeout)
    path = work / "bench-dry-result.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for s in steps:
        r = results.get(s.name)
        if r is None:
            record(s, "timeout" if timed_out else "failed", 0.0, timeout, rc, "the dry-run child did not report it",
                   out[-4000:])
        else:
            record(s, "dry-run" if r["rc"] == 0 else "failed", r["seconds"], timeout, r["rc"],
                   "plan at the GPU sizes, then --smoke on the CPU" if r["rc"] == 0 else r["error"], r["output"])


def bench_child(spec_path: str, result_path: str) -> int:
    """In one process: each benchmark's ``main(argv)`` with its output captured; the results as JSON."""
    results = {}
    for item in json.loads(Path(spec_path).read_text()):
        buf, t0, rc, error = io.StringIO(), time.monotonic(), 0, ""
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                name = Path(item["script"]).stem
                module = sys.modules.get(name) or importlib.import_module(name)
                rc = module.main(item["argv"]) or 0
            except SystemExit as e:
                rc, error = (e.code if isinstance(e.code, int) else 1) or 0, f"SystemExit({e.code})"
            except Exception as e:  # noqa: BLE001 - reported as the step's failure
                rc, error = 1, f"{type(e).__name__}: {e}"
                traceback.print_exc()
        results[item["name"]] = {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "error": error,
                                 "output": buf.getvalue()}
        Path(result_path).write_text(json.dumps(results))
    return 0


# ------------------------------------------------------------------------------------------- main
def out_folder(arg: str | None, info: dict, dry: bool) -> Path:
    chosen = arg or os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT")
    if chosen:
        return Path(chosen)
    slug = "dry-run" if dry else re.sub(r"[^a-z0-9]+", "-", str(info.get("device", "gpu")).lower()).strip("-")
    return BENCH / "results" / f"{datetime.date.today().isoformat()}-{slug}"


def source_digest() -> str:
    """sha256 over setup.py, pyproject.toml, csrc/ and rollout_fast/*.py: which sources were checked."""
    h = hashlib.sha256()
    files = [REPO / "setup.py", REPO / "pyproject.toml", *sorted((REPO / "csrc").rglob("*")),
             *sorted((REPO / "rollout_fast").rglob("*.py"))]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def git_state() -> dict:
    def git(*a):
        try:
            r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=20, check=False)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = os.environ.get("GPU_CHECK_COMMIT") or git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "rollout_fast", "csrc", "setup.py", "benchmarks", "tests")
    return {"commit": commit or "unknown (no git here; set GPU_CHECK_COMMIT)",
            "changed_files": None if dirty is None else len([x for x in dirty.splitlines() if x.strip()]),
            "source_sha256_16": source_digest()}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=None, help="results folder (default: $GPU_CHECK_OUT, $OUT, "
                                               "benchmarks/results/<date>-<device>)")
    p.add_argument("--dry-run", action="store_true", help="the CPU-side parts only, even with a GPU")
    p.add_argument("--skip-build", action="store_true", help="check and record the build command, do not run it")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", TOTAL_BUDGET_S)),
                   help=f"total wall-clock budget (default {TOTAL_BUDGET_S:.0f}; $GPU_CHECK_BUDGET_S)")
    p.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run only these steps (env always)")
    p.add_argument("--bench-child", nargs=2, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.bench_child:
        return bench_child(*args.bench_child)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    py = sys.executable
    probe = Step("env", 10, "probe", [py, "-c", PROBE], display="python -c PROBE (gpu_check.py: versions, device)")
    execute(probe, step_timeout(probe, [], deadline - time.monotonic()), dry=True)
    try:
        info = json.loads(probe.result["output"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {}
    probe.result["output"] = probe.result["output"][-2000:]
    dry = args.dry_run or not info.get("cuda_available", False)
    out = out_folder(args.out, info, dry)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        steps = plan_steps(py, info, out, Path(tmp), bool(info.get("pytest_timeout")))
        if args.only:
            unknown = set(args.only) - {s.name for s in steps}
            if unknown:
                print(f"gpu_check: --only: unknown steps {sorted(unknown)}; steps: {[s.name for s in steps]}")
                return 2
            steps = [s for s in steps if s.name in args.only]
        results = {"mode": "dry-run" if dry else "gpu", "command": "python " + " ".join(
            [str(Path(__file__).relative_to(REPO)), *(argv if argv is not None else sys.argv[1:])]),
            "started_utc": started, "budget_s": args.budget_s, "env": {**info, "build_arch": arch_list(info)},
            "git": git_state(), "out": str(out)}
        run_all(steps, probe, results, out, Path(tmp), deadline, dry, args.skip_build, py)
        results["seconds"] = round(time.monotonic() - t_start, 1)
        code = report.write(out, results, [probe, *steps])
    print(report.summary(results))
    print(f"gpu_check: results in {out} (exit status {code})")
    return code


def run_all(steps: list[Step], probe: Step, results: dict, out: Path, work: Path, deadline: float, dry: bool,
            skip_build: bool, py: str) -> None:
    """Each step in order, within the deadline; the results folder is rewritten after each one. In a dry run
    the CPU-side children (info, the collection, the benchmarks' dry runs) start together once the build is
    done, and are waited for in order."""
    benches = [s for s in steps if s.kind == "bench"]
    started: dict[str, Child] = {}
    for i, step in enumerate(steps):
        remaining = deadline - time.monotonic()
        timeout = step_timeout(step, steps[i + 1:], remaining)
        if dry and not started and step.kind != "build":
            started = start_dry_children(steps, benches, work)
        if step.result:  # a dry run's benchmarks are recorded together
            continue
        print(f"gpu_check: {step.name} (limit {timeout:.0f} s): {step.command()}", flush=True)
        if step.name in started or (step.kind == "bench" and "benches" in started):
            wait_dry_child(step, started, benches, work, remaining, timeout)
        elif timeout < MIN_STEP_S:
            record(step, "skipped", 0.0, timeout, note=f"the total budget was spent ({remaining:.0f} s left)")
        elif step.kind == "build" and skip_build:
            dry_build(step, py)
        elif dry and step.kind == "pytest":
            record(step, "dry-run", 0.0, timeout, note="not collected in the dry run (the CPU suite runs them)")
        else:
            execute(step, timeout, dry)
        print(f"gpu_check: {step.name}: {step.result['status']} in {step.result['seconds']} s"
              + (f" ({step.result['note']})" if step.result["note"] else ""), flush=True)
        results["seconds"] = None
        report.write(out, results, [probe, *steps])


def start_dry_children(steps: list[Step], benches: list[Step], work: Path) -> dict[str, Child]:
    started = {}
    for s in steps:
        if s.name == "info":
            started[s.name] = Child(s.argv, child_env(True, s.env))
        elif s.name == "tests-gpu":
            started[s.name] = start_collect(s)
    if benches:
        started["benches"] = start_benches(benches, work)
    return started


def wait_dry_child(step: Step, started: dict[str, Child], benches: list[Step], work: Path, remaining: float,
                   timeout: float) -> None:
    if step.kind == "bench":
        finish_benches(benches, started["benches"], work, min(remaining - WRITE_RESERVE_S,
                                                              sum(s.budget_s for s in benches)))
    elif step.kind == "pytest":
        finish_collect(step, started[step.name], timeout)
    else:
        rc, output, secs, timed_out = started[step.name].wait(timeout)
        record(step, "timeout" if timed_out else ("ok" if rc == 0 else "failed"), secs, timeout, rc,
               "" if rc == 0 else f"exit status {rc}", output)


if __name__ == "__main__":
    sys.exit(main())
