"""Soak and fault run (issue 18, "Load and faults, measured").

    python benchmarks/soak.py [--data ../shared/data/cifar10] [--limit 2000] [--kills 10] [--out runs/soak]

(a) ``--limit`` real CIFAR-10 test images through :func:`rollout_fast.jobs.rollout_images` with the embedded
    teacher ``cifar10-vit`` in one process, one batch per call (``--batch`` images, overlays written), RSS
    (/proc/self/status VmRSS) and open file handles (/proc/self/fd) recorded after each batch.
(b) the same images (``--rounds`` passes) through one shared :class:`rollout_fast.AttentionRollout` from
    ``--threads`` threads (batch i goes to thread i mod T, same batch boundaries as (a)); every map compared with (a)'s
    in the thread that made it, which keeps only the comparison (as a service answering requests keeps nothing:
    ``--keep-maps`` holds every map to the end instead, which the allocator's per-thread arenas turn into RSS
    growth, README Performance); RSS and handles likewise; forward hooks / pre-hooks on every module counted
    before and after.
(c) a tiny ``train-teacher`` run (1-block ViT, ``--per-class`` real CIFAR training images per class) launched
    as a subprocess, SIGKILLed ``--kills`` times at seeded random moments (some of them while a
    ``last.pt`` write is in progress: killed when its temp file appears) and resumed (``--resume``) each time
    until it finishes; its final ``last.pt`` (model, optimizer, scheduler, RNG states) and
    ``teacher.safetensors`` (bytes) are compared with an uninterrupted run's. Once per ``--workers`` value.

Flat: after ``--warmup-images`` images ((b): ``--warmup-rounds`` rounds), the mean RSS of every window (``--window-images``
images; (b): a round) stays within ``--rss-tol-mb`` of the first post-warm-up window's, and the handle count never
exceeds its post-warm-up value. Writes ``OUT/soak.json`` and prints a table;
exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TINY_ARCH = ["--img-size", "32", "--patch-size", "4", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
             "--arch", 'embed_layer={"name": "conv_stem", "convs_per_stage": 1}']


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_handles() -> int:
    return len(os.listdir("/proc/self/fd"))


def sample(done: int) -> dict:
    return {"images": done, "rss_mb": round(rss_mb(), 2), "fds": open_handles()}


def flatness(samples: list[dict], warmup_images: int, window_images: int, tol_mb: float) -> dict:
    """RSS and handles after warm-up, judged on windows of ``window_images`` images ((a): 500 images, (b): one
    round): ``flat`` when every post-warm-up window's mean RSS lies within ``tol_mb`` of the first one's (a trend,
    not the allocator's swings between samples: glibc keeps freed memory in its per-thread arenas and returns it
    unevenly) and the handle count never exceeds its post-warm-up value. Also start/end/max, the largest single
    sample above the first post-warm-up one, and the slope of a line fitted after warm-up (MB per 1000 images)."""
    rss = np.array([s["rss_mb"] for s in samples])
    fds = np.array([s["fds"] for s in samples])
    imgs = np.array([s["images"] for s in samples], dtype=float)
    w = min(int(np.searchsorted(imgs, warmup_images)), len(samples) - 2)
    slope = float(np.polyfit(imgs[w:], rss[w:], 1)[0] * 1000) if len(samples) - w >= 2 else 0.0
    edges = np.arange(imgs[w], imgs[-1], window_images)
    means = [float(rss[(imgs > lo) & (imgs <= lo + window_images)].mean()) for lo in edges
             if ((imgs > lo) & (imgs <= lo + window_images)).any()]
    if len(means) < 2:
        raise SystemExit(f"soak: fewer than 2 windows of {window_images} images after warm-up: run more images "
                         "or rounds")
    trend = max(means) - means[0]
    return {"rss_start_mb": float(rss[0]), "rss_after_warmup_mb": float(rss[w]), "rss_end_mb": float(rss[-1]),
            "rss_max_mb": float(rss.max()), "rss_peak_above_warmup_mb": round(float(rss[w:].max() - rss[w]), 2),
            "rss_slope_mb_per_1000_images": round(slope, 3), "window_images": window_images,
            "rss_window_means_mb": [round(m, 1) for m in means], "rss_trend_mb": round(trend, 2),
            "fds_start": int(fds[0]), "fds_after_warmup": int(fds[w]), "fds_end": int(fds[-1]),
            "fds_max": int(fds.max()), "warmup_images": int(imgs[w]), "rss_tolerance_mb": tol_mb,
            "flat": bool(trend <= tol_mb and fds[w:].max() <= fds[w])}


def live_tensors() -> dict:
    """Tensors reachable from Python after a garbage collection: count and MB (a leak of results or hook state
    shows here exactly, where RSS would hide it in the allocator's noise)."""
    import gc

    import torch

    gc.collect()
    ts = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return {"count": len(ts), "mb": round(sum(t.untyped_storage().nbytes() for t in ts) / 2**20, 2)}


def hook_counts(model) -> dict:
    mods = list(model.modules())
    return {"forward_hooks": sum(len(m._forward_hooks) for m in mods),
            "forward_pre_hooks": sum(len(m._forward_pre_hooks) for m in mods),
            "backward_hooks": sum(len(m._backward_hooks) for m in mods),
            "training_flags": sum(bool(m.training) for m in mods)}


def test_files(data: Path, limit: int) -> list[Path]:
    """The first ``limit`` test images, taken round-robin over the classes (sorted)."""
    per_class = [sorted(d.iterdir()) for d in sorted((data / "test").iterdir()) if d.is_dir()]
    files = [f for group in zip(*per_class) for f in group]
    if len(files) < limit:
        raise SystemExit(f"--data: only {len(files)} test images in {data / 'test'}, --limit {limit}")
    return files[:limit]


def soak_single(files, out: Path, model, data_config, batch: int, overlays: bool = True
                ) -> tuple[np.ndarray, list[dict], float]:
    """(a): one rollout_images call per batch into one folder (--overwrite); maps, samples, seconds."""
    from rollout_fast.jobs import rollout_images

    maps, samples = [], [sample(0)]
    t0 = time.perf_counter()
    for i in range(0, len(files), batch):
        res = rollout_images(files[i:i + batch], out, model, data_config, batch_size=batch, progress=False,
                             overlays=overlays, overwrite=True)
        if res.skipped:
            raise SystemExit(f"(a): unreadable images {res.skipped}")
        with np.load(res.npz) as npz:
            maps.append(npz["maps"])
        samples.append(sample(i + len(res.files)))
    return np.concatenate(maps), samples, time.perf_counter() - t0


def soak_threads(files, model, data_config, batch: int, threads: int, rounds: int, ref: np.ndarray,
                 keep_maps: bool = False) -> tuple[np.ndarray, list[dict], float, list[dict]]:
    """(b): one shared AttentionRollout, batch i on thread i mod ``threads``, ``rounds`` times over the files
    (fresh threads each round); each map compared with ``ref`` ((a)'s maps, (N, gh, gw)) in its thread.
    Returns the per-image max |map - ref| (rounds, N), the samples, the seconds and the live tensors after each
    round (:func:`live_tensors`); with ``keep_maps`` every map is also held until the end (the comparison is then
    made after the last round)."""
    import torch
    from timm.data import create_transform

    from rollout_fast import AttentionRollout
    from rollout_fast.data import load_image

    explainer = AttentionRollout(model)
    transform = create_transform(**data_config)
    starts = list(range(0, len(files), batch)) * rounds
    diffs = np.full((rounds, len(files)), np.inf)
    kept: list = [None] * len(starts)
    samples, lock, errors = [sample(0)], threading.Lock(), []
    done = [0]
    per_round = len(starts) // rounds

    def work(first: int, stop: int) -> None:
        try:
            for j in range(first, stop, threads):
                s0 = starts[j]
                x = torch.stack([transform(load_image(f)) for f in files[s0:s0 + batch]])
                m = explainer(x).numpy()
                if keep_maps:
                    kept[j] = m
                else:
                    diffs[j // per_round, s0:s0 + len(m)] = np.abs(m - ref[s0:s0 + len(m)]).reshape(len(m), -1).max(1)
                with lock:
                    done[0] += len(x)
                    samples.append(sample(done[0]))
        except Exception as e:  # noqa: BLE001 (re-raised by the main thread)
            errors.append(e)

    t0, live = time.perf_counter(), []
    for r in range(rounds):
        pool = [threading.Thread(target=work, args=(r * per_round + t, per_round * (r + 1)))
                for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        if errors:
            raise errors[0]
        live.append(live_tensors())
    seconds = time.perf_counter() - t0
    if keep_maps:
        for j, m in enumerate(kept):
            s0 = starts[j]
            diffs[j // per_round, s0:s0 + len(m)] = np.abs(m - ref[s0:s0 + len(m)]).reshape(len(m), -1).max(1)
    return diffs, samples, seconds, live


def run_rollout_soak(args, out: Path) -> dict:
    import torch

    from rollout_fast import load_teacher

    torch.set_num_threads(args.torch_threads)
    files = test_files(args.data, args.limit)
    model, data_config = load_teacher("cifar10-vit")
    hooks_before = hook_counts(model)
    ref, samples_a, sec_a = soak_single(files, out / "single", model, data_config, args.batch,
                                          not args.no_overlays)
    hooks_mid = hook_counts(model)
    diff, samples_b, sec_b, live_b = soak_threads(files, model, data_config, args.batch, args.threads, args.rounds, ref,
                                          args.keep_maps)
    hooks_after = hook_counts(model)
    diff = diff.reshape(-1)
    return {
        "images": len(files), "batch": args.batch, "threads": args.threads,
        "single": {**flatness(samples_a, args.warmup_images, args.window_images, args.rss_tol_mb),
                   "seconds": round(sec_a, 2),
                   "samples": samples_a},
        "threaded": {**flatness(samples_b, args.warmup_rounds * len(files), len(files), args.rss_tol_mb),
                     "rounds": args.rounds, "seconds": round(sec_b, 2), "samples": samples_b,
                     "live_tensors_per_round": live_b,
                     "live_tensors_flat": all(x == live_b[args.warmup_rounds - 1] for x in live_b[args.warmup_rounds:])},
        "maps_shape": list(ref.shape), "maps_max_abs_diff": float(diff.max()),
        "maps_compared": len(diff), "maps_unequal": int((diff > 0).sum()), "maps_kept": args.keep_maps,
        "maps_equal": bool((diff == 0).all()),
        "hooks_before": hooks_before, "hooks_after_single": hooks_mid, "hooks_after_threads": hooks_after,
        "hooks_unchanged": hooks_before == hooks_mid == hooks_after,
    }


def make_fault_data(src: Path, dst: Path, per_class: int, test_per_class: int) -> Path:
    for split, n in (("train", per_class), ("test", test_per_class)):
        for d in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (dst / split / d.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(d.iterdir())[:n]:
                shutil.copyfile(f, dst / split / d.name / f.name)
    return dst


def train_cmd(data: Path, out: Path, args, workers: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "rollout_fast.cli", "train-teacher", "--data", str(data), "--out", str(out),
            "--epochs", str(args.epochs), "--batch-size", str(args.train_batch), "--workers", str(workers),
            "--device", "cpu", "--no-progress", "--seed", "0", *TINY_ARCH, *(["--resume"] if resume else [])]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a launch and its DataLoader workers)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(p.name))
    return pids


def checkpoint_epoch(run: Path):
    from rollout_fast.checkpoint import load_training_state

    try:
        return int(load_training_state(run / "last.pt")["epoch"])
    except (FileNotFoundError, ValueError):
        return None


def launch(cmd, log: Path, kill_after: float | None, in_write: Path | None = None, nth_write: int = 1) -> dict:
    """Run ``cmd``; SIGKILL its main process after ``kill_after`` s or (``in_write``: the run folder) as soon
    as the ``nth_write``-th ``.last.pt.*`` temp file (a checkpoint write in progress) appears there. Its
    DataLoader workers are left to notice on their own (they check their parent every 5 s); any alive
    6 s later are counted, then killed (the launch's session)."""
    with open(log, "ab") as err:
        p = subprocess.Popen(cmd, stdout=err, stderr=err, env=_env(), cwd=REPO, start_new_session=True)
    t0, killed, seen, writes = time.monotonic(), False, None, []
    stale = {f.name for f in in_write.glob(".last.pt.*")} if in_write is not None else set()  # an older kill's
    while p.poll() is None and kill_after is not None:
        if in_write is not None:
            writes += [f.name for f in in_write.glob(".last.pt.*") if f.name not in stale and f.name not in writes]
            seen = writes[nth_write - 1] if len(writes) >= nth_write else None
        if seen or time.monotonic() - t0 >= kill_after:
            os.kill(p.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.0005 if in_write is not None else 0.005)
    rc = p.wait()
    at = time.monotonic() - t0
    t1, left = time.monotonic(), session_pids(p.pid)
    while left and time.monotonic() < t1 + 6:
        time.sleep(0.05)
        left = session_pids(p.pid)
    workers_exit_s = round(time.monotonic() - t1, 2)
    if left:
        os.killpg(p.pid, signal.SIGKILL)
    return {"killed": killed, "at_s": round(at, 3), "rc": rc, "in_checkpoint_write": seen,
            "workers_gone_after_s": workers_exit_s, "orphans_after_6s": len(left)}


def compare_runs(a: Path, b: Path) -> dict:
    import torch

    from rollout_fast.checkpoint import load_training_state

    sa, sb = load_training_state(a / "last.pt"), load_training_state(b / "last.pt")

    def flat(x, prefix=""):
        if isinstance(x, dict):
            return {k2: v2 for k, v in x.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        if isinstance(x, (list, tuple)):
            return {k2: v2 for i, v in enumerate(x) for k2, v2 in flat(v, f"{prefix}{i}.").items()}
        return {prefix: x}

    diffs = {}
    for part in ("model", "optimizer", "scheduler", "rng_cpu", "rng_loader", "epoch"):
        fa, fb = flat(sa[part]), flat(sb[part])
        bad = [k for k in fa if k not in fb or not (torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor)
                                                    else fa[k] == fb[k])]
        diffs[part] = sorted(bad + [k for k in fb if k not in fa])
    weights_equal = (a / "teacher.safetensors").read_bytes() == (b / "teacher.safetensors").read_bytes()
    return {"last_pt_unequal_entries": {k: v[:5] for k, v in diffs.items() if v},
            "last_pt_identical": not any(diffs.values()), "teacher_safetensors_identical": weights_equal,
            "test_top1": [json.loads((r / "teacher.json").read_text())["test_top1"] for r in (a, b)]}


def fault_run(args, data: Path, root: Path, workers: int) -> dict:
    """(c) for one ``workers`` value: an uninterrupted run, then the killed-and-resumed one, compared."""
    root.mkdir(parents=True)
    t0 = time.monotonic()
    ref = launch(train_cmd(data, root / "uninterrupted", args, workers, False), root / "uninterrupted.log",
                 None, None)
    t_ref = time.monotonic() - t0
    if ref["rc"] != 0:
        raise SystemExit(f"(c): the uninterrupted run failed, see {root / 'uninterrupted.log'}")
    rows = (root / "uninterrupted" / "log.csv").read_text().splitlines()[1:]
    train_s = max(sum(float(r.split(",")[-1]) for r in rows), 0.5)
    startup = max(t_ref - train_s, 0.5)  # start-up, final evaluation and writes
    rng = random.Random(args.seed * 1000 + workers)
    in_write = set(rng.sample(range(args.kills), max(1, args.kills * 3 // 10)))
    run, kills, launches = root / "killed", [], 0
    while True:
        epoch = checkpoint_epoch(run)
        cmd = train_cmd(data, run, args, workers, epoch is not None)
        left = args.epochs - (epoch or 0)
        if len(kills) < args.kills:  # a random moment of this launch's expected duration
            mode = "in-write" if len(kills) in in_write else "timed"
            delay = rng.uniform(0.05, 0.6) * (startup + train_s * left / args.epochs)
            nth = rng.randint(1, max(1, left - 1))
            fallback = 0.95 * (startup + train_s * left / args.epochs)  # the write was missed
            r = launch(cmd, root / "killed.log", delay if mode == "timed" else fallback,
                       run if mode == "in-write" else None, nth)
        else:
            mode, delay = "final", None
            r = launch(cmd, root / "killed.log", None, None)
        launches += 1
        entry = {"launch": launches, "mode": mode, "resumed_from_epoch": epoch, **r,
                 "epoch_after": checkpoint_epoch(run),
                 "temp_files_left": sorted(f.name for f in run.glob(".*")) if run.is_dir() else []}
        if not r["killed"]:  # finished (the final launch, or one that outran its kill)
            if r["rc"] != 0:
                raise SystemExit(f"(c): launch {launches} failed (rc {r['rc']}), see {root / 'killed.log'}")
            final = entry
            break
        kills.append(entry)
    return {"workers": workers, "epochs": args.epochs, "uninterrupted_s": round(t_ref, 2),
            "uninterrupted_training_s": round(train_s, 2),
            "kills": len([k for k in kills if k["killed"]]), "kill_log": kills, "final_launch": final,
            **compare_runs(root / "uninterrupted", run)}


def print_table(res: dict) -> None:
    rows = []
    if "rollout" in res:
        r = res["rollout"]
        for name in ("single", "threaded"):
            s = r[name]
            rss = [f"{s[k]:.1f}" for k in ("rss_start_mb", "rss_after_warmup_mb", "rss_end_mb", "rss_max_mb")]
            rows.append((f"(a/b) {name}: RSS MB start/warm/end/max", " / ".join(rss)))
            means = ", ".join(f"{m:.0f}" for m in s["rss_window_means_mb"])
            rows.append((f"(a/b) {name}: RSS mean per {s['window_images']} images", f"{means} MB"))
            growth = (f"{s['rss_trend_mb']:.1f} MB (tol {s['rss_tolerance_mb']} MB), "
                      f"{s['rss_slope_mb_per_1000_images']:.2f} MB/1000 img, peak +{s['rss_peak_above_warmup_mb']:.0f} MB")
            rows.append((f"(a/b) {name}: RSS trend after warm-up, slope, peak", growth))
            fds = [str(s[k]) for k in ("fds_start", "fds_after_warmup", "fds_end", "fds_max")]
            rows.append((f"(a/b) {name}: fds start/warm/end/max", " / ".join(fds)))
            rows.append((f"(a/b) {name}: flat, seconds", f"{s['flat']}, {s['seconds']}"))
        equal = (f"{r['maps_equal']} (max |diff| {r['maps_max_abs_diff']:.3g}, {r['maps_unequal']} of "
                 f"{r['maps_compared']} differ)")
        rows.append(("(b) maps equal to single-threaded", equal))
        rows.append(("(b) live tensors after each round", ", ".join(
            f"{x['count']} ({x['mb']:.1f} MB)" for x in r["threaded"]["live_tensors_per_round"])))
        rows.append(("(b) hooks before / after (fwd, pre)", " / ".join(
            f"{h['forward_hooks']},{h['forward_pre_hooks']}" for h in (r["hooks_before"], r["hooks_after_threads"]))))
    for f in res.get("faults", []):
        w = f["workers"]
        rows.append((f"(c) workers={w}: kills (timed s / in-write)", ", ".join(
            f"{k['at_s']:.2f}{'W' if k['mode'] == 'in-write' else ''}->e{k['epoch_after']}" for k in f["kill_log"])))
        rows.append((f"(c) workers={w}: last.pt / safetensors identical",
                     f"{f['last_pt_identical']} / {f['teacher_safetensors_identical']}"))
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--no-overlays", action="store_true", help="(a) without the overlay PNGs (faster)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--warmup-images", type=int, default=500,
                   help="(a) images before the flatness check starts ((b) with --rounds > 1: its first round)")
    p.add_argument("--window-images", type=int, default=500, help="(a) images per window of the flatness check")
    p.add_argument("--rounds", type=int, default=6, help="(b) passes over the images")
    p.add_argument("--warmup-rounds", type=int, default=2,
                   help="(b) rounds before the flatness check starts (each thread's allocator arena fills first)")
    p.add_argument("--rss-tol-mb", type=float, default=32.0)
    p.add_argument("--keep-maps", action="store_true",
                   help="(b) hold every map until the end instead of comparing it in its thread at once")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", choices=["rollout", "faults"], action="append", default=[])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "soak")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if not 1 <= args.warmup_rounds < args.rounds - 1:
        p.error(f"--warmup-rounds: expected 1 <= N < --rounds - 1 (two rounds to compare after warm-up), got "
                f"{args.warmup_rounds} with --rounds {args.rounds}")
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            print(f"--out: {str(args.out)!r} is not empty; pass --overwrite to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if "rollout" not in args.skip:
        res["rollout"] = run_rollout_soak(args, args.out / "rollout")
    if "faults" not in args.skip:
        data = make_fault_data(args.data, args.out / "fault_data", args.per_class, max(1, args.per_class // 4))
        res["faults"] = [fault_run(args, data, args.out / f"faults_workers{w}", w) for w in args.workers]
    (args.out / "soak.json").write_text(json.dumps(res, indent=1))
    print_table(res)
    ok = all(f["last_pt_identical"] and f["teacher_safetensors_identical"] and f["kills"] == args.kills
             for f in res.get("faults", []))
    if "rollout" in res:
        r = res["rollout"]
        ok = (ok and r["maps_equal"] and r["hooks_unchanged"] and r["single"]["flat"] and r["threaded"]["flat"]
              and r["threaded"]["live_tensors_flat"])
    print(f"all checks passed: {ok}; figures in {args.out / 'soak.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
