"""benchmarks/gpu_check.py (``make gpu-check``), the one prepared GPU check of issue 17, proven without a GPU:

- the dry run itself (``--dry-run --skip-build``): every step listed in the results, the build command
  checked, the GPU tests found by ``pytest --collect-only``, every benchmark's plan at the GPU sizes and its
  smoke run on the CPU, at most 8 well-named files in the output folder;
- the GPU mode's machinery on stand-in steps: junit and benchmark reports read back, a failing test giving
  exit status 1, a step stopped at its time limit, steps skipped once the budget is spent;
- the time-limit policy, the build's arch list and the targets' verdicts.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
STEPS = [
    "env",
    "build",
    "info",
    "tests-gpu",
    "bench-rollout-float32",
    "bench-rollout-bfloat16",
    "bench-capture",
    "bench-gather",
    "bench-prune-deit",
    "bench-prune-cifar",
    "bench-attention",
    "tests-rest",
]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def gc():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_dry")
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--skip-build", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return out, res, time.monotonic() - t0


def test_dry_run_lists_every_step_and_passes(dry_run):
    out, res, seconds = dry_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "dry-run" and results["exit_status"] == 0 and not results["pending"]
    assert [s["name"] for s in results["steps"]] == STEPS
    assert all(s["status"] in ("ok", "dry-run") for s in results["steps"]), results["steps"]
    md = (out / "results.md").read_text()
    for name in STEPS:
        assert f"| {name} |" in md, name
    log = (out / "steps.log").read_text()
    assert all(f"===== {name}:" in log for name in STEPS)
    assert "rollout_fast: " in log  # python -m rollout_fast.info ran
    files = [p for p in out.rglob("*") if p.is_file()]  # the device tool returns 8 files, plain names
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    assert seconds < 240


def test_dry_run_checks_the_build_command(dry_run):
    build = next(
        s for s in json.loads((dry_run[0] / "results.json").read_text())["steps"] if s["name"] == "build"
    )
    assert build["status"] == "dry-run"
    assert "pip install --no-build-isolation --no-deps --no-index" in build["command"]
    assert re.search(r"TORCH_CUDA_ARCH_LIST=\S+ MAX_JOBS=\d+ ", build["command"])


def test_dry_run_collects_the_gpu_tests(dry_run):
    tests_gpu = next(
        s for s in json.loads((dry_run[0] / "results.json").read_text())["steps"] if s["name"] == "tests-gpu"
    )
    assert "-m 'cuda or triton'" in tests_gpu["command"] and "--junitxml" in tests_gpu["command"]
    assert tests_gpu["collected"] >= 50 and "missing" not in tests_gpu["note"]


def test_dry_run_plans_the_gpu_sizes_and_smoke_runs_each_benchmark(dry_run):
    benchmarks = json.loads((dry_run[0] / "results.json").read_text())["benchmarks"]
    assert sorted(benchmarks) == sorted(s for s in STEPS if s.startswith("bench-"))
    for name, data in benchmarks.items():
        assert data["dry_run"] and data["complete"] and data["plan"] and data["rows"], name
        assert all(r.get("device", "cpu") == "cpu" for r in data["rows"]), name
    for dtype in ("float32", "bfloat16"):
        plan = benchmarks[f"bench-rollout-{dtype}"]["plan"]
        assert {p["model"] for p in plan if p["B"] == 256} == {"DeiT-S", "ViT-B", "ViT-L", "ViT-B/384"}
        assert {p["dtype"] for p in plan} == {dtype} and {1, 32, 256} == {p["B"] for p in plan}
        assert all("loop" not in p["providers"] for p in plan if p["B"] == 256)
        assert all("skipped" not in p["providers"] for p in plan)  # nothing over --max-gib
    capture = benchmarks["bench-capture"]["plan"][0]
    assert (capture["model"], capture["B"], capture["dtype"]) == ("deit_small_patch16_224", 256, "bfloat16")
    assert "vit-explain" in capture["providers"] and "fused" in capture["providers"]
    keeps = {
        p["keep"] for p in benchmarks["bench-prune-deit"]["plan"] + benchmarks["bench-prune-cifar"]["plan"]
    }
    assert keeps == {0.5, 0.25}
    assert "student" in {p["scorer"] for p in benchmarks["bench-prune-cifar"]["plan"]}


# ------------------------------------------------------------------------------ the GPU mode's machinery
def _results(gc):
    return {
        "mode": "gpu",
        "command": "python benchmarks/gpu_check.py",
        "started_utc": "now",
        "budget_s": 60.0,
        "env": {"device": "stand-in"},
        "git": {},
        "out": "-",
    }


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


JUNIT = """
import sys
path = sys.argv[sys.argv.index("--junitxml") + 1]
open(path, "w").write('<testsuites><testsuite name="pytest" tests="3">'
    '<testcase classname="tests.ops.test_rollout" name="test_a"/>'
    '<testcase classname="tests.ops.test_rollout" name="test_b"><failure message="assert 1 == 2">x</failure></testcase>'
    '<testcase classname="tests.ops.test_gather" name="test_c"><skipped message="needs X"/></testcase>'
    '</testsuite></testsuites>')
print("1 failed, 1 passed, 1 skipped")
sys.exit(1)
"""

BENCH_JSON = """
import json, sys
rows = [dict(model="DeiT-S", B=256, dtype="bfloat16", device="cuda", provider="cuda", x_floor=1.1,
             speedup_vs_reference=80.0, median_ms=0.5),
        dict(model="DeiT-S", B=256, dtype="bfloat16", device="cuda", provider="triton", x_floor=1.6,
             speedup_vs_reference=55.0, median_ms=0.7),
        dict(model="DeiT-S", B=32, dtype="bfloat16", device="cuda", provider="cuda", x_floor=3.0,
             speedup_vs_reference=9.0, median_ms=0.1)]
assert "--budget-s" in sys.argv
json.dump({"script": "bench_rollout.py", "argv": [], "dry_run": False, "plan": [], "rows": rows,
           "markdown": "| table |", "complete": True, "stopped": None, "extra": {}},
          open(sys.argv[sys.argv.index("--json") + 1], "w"))
"""


def test_gpu_mode_reads_back_tests_and_benchmarks_and_fails_on_a_failed_test(gc, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    steps = [
        gc.Step("tests-gpu", 20, "pytest", [*_py(JUNIT), "--junitxml", str(out / "junit-gpu.xml")]),
        gc.Step("bench-rollout-bfloat16", 20, "bench", [*_py(BENCH_JSON), "--json", str(work / "r.json")]),
    ]
    probe = gc.Step("env", 1, "probe", ["true"])
    gc.record(probe, "ok", 0.1, 1)
    results = _results(gc)
    gc.run_all(steps, probe, results, out, work, time.monotonic() + 60, False, False, sys.executable)
    code = gc.report.write(out, results, [probe, *steps])
    status = {s["name"]: s["status"] for s in results["steps"]}
    assert status == {"env": "ok", "tests-gpu": "failed", "bench-rollout-bfloat16": "ok"}
    assert code == 1 and results["exit_status"] == 1
    t = results["tests"]["tests-gpu"]
    assert (t["tests"], t["passed"], t["failed"], t["skipped"]) == (3, 1, 1, 1)
    assert t["failures"] == ["tests.ops.test_rollout::test_b: assert 1 == 2"]
    verdicts = {t["target"].split(",")[0]: t["met"] for t in results["targets"]}
    assert verdicts == {"rollout op cuda": True, "rollout op triton": False}
    md = (out / "results.md").read_text()
    assert "NOT met" in md and "test_b" in md and "| table |" in md and "needs X" in md
    assert "===== tests-gpu: failed" in (out / "steps.log").read_text()


def test_a_step_past_its_limit_is_interrupted_and_recorded(gc, monkeypatch):
    monkeypatch.setattr(gc, "KILL_GRACE_S", 5.0)
    step = gc.Step(
        "bench-capture",
        1.5,
        "bench",
        [*_py("import time; print('started', flush=True); time.sleep(60)"), "--json", "unused.json"],
    )
    t0 = time.monotonic()
    gc.execute(step, 1.5, dry=False)
    assert time.monotonic() - t0 < 10
    assert step.result["status"] == "timeout" and "started" in step.result["output"]
    assert "KeyboardInterrupt" in step.result["output"]  # SIGINT first: pytest still writes its junit file


def test_steps_are_skipped_once_the_budget_is_spent(gc, tmp_path):
    steps = [
        gc.Step("info", 15, "run", _py("print(1)")),
        gc.Step("tests-rest", 0, "pytest", [*_py("1"), "--junitxml", str(tmp_path / "j.xml")], optional=True),
    ]
    probe = gc.Step("env", 1, "probe", ["true"])
    gc.record(probe, "ok", 0.1, 1)
    results = _results(gc)
    gc.run_all(
        steps, probe, results, tmp_path, tmp_path, time.monotonic() + 4.0, False, False, sys.executable
    )
    assert gc.report.write(tmp_path, results, [probe, *steps]) == 2
    assert [s["status"] for s in results["steps"]] == ["ok", "skipped", "skipped"]
    assert "total budget was spent" in results["steps"][1]["note"]


def test_step_timeout_gives_slack_forward_and_keeps_later_budgets(gc):
    a, b, c = (
        gc.Step("a", 100, "run", []),
        gc.Step("b", 50, "run", []),
        gc.Step("c", 0, "run", [], optional=True),
    )
    assert gc.step_timeout(a, [b, c], 400) == 400 - gc.WRITE_RESERVE_S - 50  # slack flows to the earlier step
    assert gc.step_timeout(a, [b, c], 120) == 100  # its budget even when later ones then get squeezed
    assert gc.step_timeout(a, [b, c], 60) == 60 - gc.WRITE_RESERVE_S  # never past the deadline
    assert gc.step_timeout(c, [], 90) == 90 - gc.WRITE_RESERVE_S  # an optional step takes what is left


def test_build_arch_from_the_device(gc, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert gc.arch_list({"capability": [9, 0]}) == "9.0"
    assert gc.arch_list({"capability": [8, 6]}) == "8.6"
    assert gc.arch_list({}) == "9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert gc.arch_list({"capability": [9, 0]}) == "8.0;9.0"


def test_capture_and_prune_targets(gc):
    rows = [
        {
            "provider": "forward",
            "path": "-",
            "B": 256,
            "dtype": "bfloat16",
            "device": "cuda",
            "ratio": 1.0,
            "median_ms": 10.0,
            "extra_bytes": 0,
            "budget_extra_bytes": 100,
        },
        {
            "provider": "fused",
            "path": "fused-triton",
            "B": 256,
            "dtype": "bfloat16",
            "device": "cuda",
            "ratio": 1.1,
            "median_ms": 11.0,
            "extra_bytes": 120,
            "budget_extra_bytes": 100,
        },
    ]
    prune = [
        {
            "model": "m",
            "autocast": "-",
            "scorer": "random",
            "keep_ratio": 0.5,
            "batch": 256,
            "device": "cuda",
            "images_per_s": 10.0,
            "speedup": 1.9,
        }
    ]
    got = gc.report.targets({"bench-capture": {"rows": rows}, "bench-prune-deit": {"rows": prune}})
    assert [t["met"] for t in got] == [True, False, None]
    assert gc.report.targets({"bench-capture": {"rows": [{**r, "device": "cpu"} for r in rows]}}) == []


def test_a_measurement_that_raises_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    bg = _load("bench_gather")

    def boom(t, s, k):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(
        bg,
        "providers",
        lambda device: {"reference": lambda t, s, k: t[:, :k], "bad": boom, "floor": lambda t, s, k: t.sum()},
    )
    path = tmp_path / "g.json"
    assert (
        bg.main(
            [
                "--smoke",
                "--batches",
                "1",
                "--keep",
                "0.5",
                "--reps",
                "1",
                "--warmup",
                "0",
                "--json",
                str(path),
            ]
        )
        == 1
    )
    data = json.loads(path.read_text())
    assert [r["provider"] for r in data["rows"]] == ["reference", "floor"] and data["complete"]
    assert data["errors"] == [{"where": "tiny B=1 keep 0.5 bad", "error": "RuntimeError: kernel failed"}]
