"""The distillation training loop: two phases (frozen backbone + fresh map head, then everything), per-epoch
validation, CSV/TensorBoard logs and a resumable checkpoint each epoch.

Output order (rank 0), so that a run killed at any moment can be started again: nothing is written before
the first checkpoint (no ``log.csv``, no ``tensorboard/``: a run killed in its first epoch leaves no
earlier-run files, and a fresh start is not refused); each epoch writes ``last.pt`` first (atomically, with
the log rows in it) and then rewrites ``log.csv`` from those rows (atomically), so the log never holds a row
its checkpoint does not describe, and a resumed run rewrites ``log.csv`` from the checkpoint (no duplicate
epoch rows). Temp files of an interrupted atomic write (``.last.pt.<random>``, ...) are removed at the next
start.
"""

from __future__ import annotations

import csv
import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import atomic_write, save_training_state
from ..metrics import MapMetrics
from ..students import RolloutStudent, logits_to_maps
from ..training import adamw, autocast_for, lr_lambda
from .config import LOSSES, DistillConfig
from .data import view_params
from .ddp import DistEnv
from .targets import EVAL_BATCH, TeacherTargets

__all__ = ["Seen", "TrainingRun", "distill_loss", "evaluate", "train"]

log = logging.getLogger("rollout_fast.distill")

LOG_COLUMNS = ["epoch", "phase", "train_loss", "val_kld", "val_cc", "val_recall@0.5", "lr", "seconds"]
# what a run writes in its folder: their atomic-write temp files ('.NAME.<random>') are stale at a start
RUN_FILES = ("last.pt", "log.csv", "student.safetensors", "student.json", "metrics.json")


def distill_loss(logits: torch.Tensor, target: torch.Tensor, loss: str = "kld") -> torch.Tensor:
    """Distillation loss, averaged over the batch: a 0-dim float32 tensor.

    Args:
        logits: (B, gh, gw) student scores.
        target: (B, gh, gw) non-negative teacher rollout maps (any scale).
        loss: 'kld': ``sum_i Q_i (log Q_i - log_softmax(logits)_i)`` with ``Q = target / sum(target)``;
            'bce': BCE-with-logits against ``target / max(target)``; 'mse': MSE of ``sigmoid(logits)``
            against ``target / max(target)``.

    Raises:
        ValueError: unknown ``loss`` or shapes differ.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if logits.shape != target.shape:
        raise ValueError(f"logits and target: shapes differ, {tuple(logits.shape)} vs "
                         f"{tuple(target.shape)} (student grid vs teacher grid)")
    B = logits.shape[0]
    z = logits.float().reshape(B, -1)
    t = target.float().reshape(B, -1).clamp_min(0)
    if loss == "kld":
        q = t / t.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return (torch.xlogy(q, q) - q * z.log_softmax(dim=1)).sum(dim=1).mean()
    t = t / t.amax(dim=1, keepdim=True).clamp_min(1e-12)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(z, t)
    return F.mse_loss(z.sigmoid(), t)


@torch.no_grad()
def evaluate(student: RolloutStudent, norm, images, maps, params, progress: bool, desc: str) -> dict:
    """:class:`rollout_fast.metrics.MapMetrics` of the student's maps of uint8 ``images`` augmented by
    ``params`` against the teacher's ``maps`` (student left in eval mode)."""
    from tqdm.auto import tqdm

    student.eval()
    m = MapMetrics()
    dx, dy, fl = params
    for s in tqdm(range(0, len(images), EVAL_BATCH), desc=desc, leave=False, disable=not progress):
        sl = slice(s, s + EVAL_BATCH)
        logits = student(norm(images[sl], dx[sl], dy[sl], fl[sl]))
        m.update(logits_to_maps(logits, student.activation).cpu(), maps[sl])
    return m.compute()


@dataclass
class Seen:
    """On-the-fly targets of the first epoch (their sum, count and a sample of up to 4,096): the mean-map
    and centre-prior baselines when targets are not cached. Saved in the checkpoint."""

    total: torch.Tensor
    count: int = 0
    samples: list = field(default_factory=list)

    def add(self, target: torch.Tensor) -> None:
        self.total += target.double().sum(0).cpu()
        self.count += len(target)
        if sum(len(t) for t in self.samples) < 4096:
            self.samples.append(target.cpu())

    def sample(self, empty: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.samples)[:4096] if self.samples else empty

    def state(self) -> dict:
        grid = tuple(self.total.shape)
        return {"seen_sum": self.total, "seen_count": self.count,
                "seen_sample": self.sample(torch.zeros(0, *grid))}

    @classmethod
    def from_state(cls, state: dict) -> Seen:
        return cls(state["seen_sum"], state["seen_count"],
                   [state["seen_sample"]] if state["seen_sample"].numel() else [])


@dataclass
class TrainingRun:
    """Everything one training run reads: the config, processes, student, teacher targets, uint8 training
    images (and their cached target views), the validation images and maps, the output folder."""

    cfg: DistillConfig
    env: DistEnv
    student: RolloutStudent
    targets: TeacherTargets
    train_x: torch.Tensor
    train_views: list
    val: tuple  # (images, maps, (dx, dy, flip))
    out: Path
    progress: bool = True
    seen: Seen = None
    tb: object = None  # TensorBoard writer: None until the first checkpoint, False when not installed
    log_rows: list = field(default_factory=list)  # log.csv's rows (no header), as saved in the checkpoint

    @property
    def total_epochs(self) -> int:
        return self.cfg.head_epochs + self.cfg.epochs


def train(run: TrainingRun, state: dict | None = None) -> Seen:
    """Train ``run.student`` in place through both phases, from the start or from a checkpoint ``state``;
    returns the first epoch's on-the-fly targets (:class:`Seen`)."""
    from torch.utils.data import DistributedSampler

    cfg, env, student = run.cfg, run.env, run.student
    start_epoch = 0
    run.seen = Seen(torch.zeros(run.targets.grid, dtype=torch.float64))
    if state is not None:
        student.load_state_dict(state["model"])
        start_epoch = state["epoch"]
        torch.set_rng_state(state["rng_cpu"])
        run.seen = Seen.from_state(state)
    per_rank = cfg.batch_size // env.world
    sampler = DistributedSampler(range(len(run.train_x)), num_replicas=env.world, rank=env.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    steps = len(sampler) // per_rank
    _open_logs(run, state)
    phases = [("head", cfg.head_epochs, cfg.lr), ("all", cfg.epochs, cfg.lr * cfg.finetune_lr_scale)]
    epoch0 = 0
    for phase_idx, (phase, n_epochs, lr) in enumerate(phases):
        phase_end = epoch0 + n_epochs
        if n_epochs > 0 and start_epoch < phase_end:
            opt, sched = _optimizer(student, phase, n_epochs, steps, lr, cfg)
            if state is not None and state.get("phase") == phase_idx and start_epoch > epoch0:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
            model = env.wrap(student)
            for epoch in range(max(start_epoch, epoch0), phase_end):
                sampler.set_epoch(epoch)
                _epoch(run, model, opt, sched, sampler, steps, epoch, phase, phase_idx)
            if model is not student:  # drop this phase's DDP reducer (and its hooks) before the next phase
                del model
                gc.collect()
        epoch0 = phase_end
    if run.tb:
        run.tb.close()
    return run.seen


def _open_logs(run: TrainingRun, state: dict | None) -> None:
    """Rank 0: remove temp files of interrupted writes; when resuming, take the log rows the checkpoint
    describes and rewrite ``log.csv`` with them (rows logged after it are dropped). A fresh run writes
    nothing here: ``log.csv`` first appears after the first checkpoint."""
    if run.env.rank != 0:
        return
    for name in RUN_FILES:  # checkpoint.atomic_write's temp files: '.NAME.<random>'
        for tmp in run.out.glob(f".{name}.*"):
            tmp.unlink(missing_ok=True)
    run.log_rows = [] if state is None else _resumed_rows(run.out / "log.csv", state)
    if state is not None:
        _write_log(run.out / "log.csv", run.log_rows)


def _resumed_rows(path: Path, state: dict) -> list[list]:
    """The log rows of checkpoint ``state``: saved in it, or (a checkpoint written before they were) the rows
    of ``path`` up to its epoch."""
    if "log" in state:
        return [list(r) for r in state["log"]]
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [r for r in rows if r and r[0].isdigit() and int(r[0]) <= state["epoch"]]


def _write_log(path: Path, rows: list[list]) -> None:
    """Write ``log.csv`` whole (header + one row per finished epoch), atomically."""
    def _w(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([LOG_COLUMNS, *rows])
    atomic_write(path, _w)


def _open_tensorboard(run: TrainingRun) -> None:
    """TensorBoard under ``out/tensorboard`` when installed (opened after the first checkpoint)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        run.tb = SummaryWriter(str(run.out / "tensorboard"))
    except Exception:  # noqa: BLE001  (tensorboard not installed: the CSV log is the record)
        run.tb = False


def _optimizer(student: RolloutStudent, phase: str, n_epochs: int, steps: int, lr: float, cfg: DistillConfig):
    """AdamW + warm-up/cosine schedule of one phase of ``n_epochs`` x ``steps``; 'head' trains only the map
    head."""
    head = {id(p) for p in student.head_parameters()}
    for p in student.parameters():
        p.requires_grad_(phase == "all" or id(p) in head)
    opt = adamw(((n, p) for n, p in student.named_parameters() if p.requires_grad), lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(n_epochs * steps, int(cfg.warmup_epochs * steps)))
    return opt, sched


def _epoch(run: TrainingRun, model, opt, sched, sampler, steps: int, epoch: int, phase: str,
           phase_idx: int) -> None:
    """One epoch on this process's shard, then (rank 0) validation, logs and the checkpoint."""
    from tqdm.auto import tqdm

    cfg, env, student, targets = run.cfg, run.env, run.student, run.targets
    t0 = time.time()
    student.train()
    if phase == "head":
        student.backbone_modules().eval()
    idx_all = torch.tensor(list(iter(sampler)), dtype=torch.long)
    if cfg.cache_targets:
        (dxa, dya, fla), maps_a = run.train_views[epoch % cfg.views]
    else:
        dxa, dya, fla = view_params(cfg.seed, epoch + 1, len(run.train_x), cfg.max_shift, cfg.flip)
    per_rank = cfg.batch_size // env.world
    tot_loss = tot = 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{run.total_epochs} ({phase})",
               disable=not run.progress or env.rank != 0)
    for s in bar:
        idx = idx_all[s * per_rank:(s + 1) * per_rank]
        x = targets.norm(run.train_x[idx], dxa[idx], dya[idx], fla[idx])
        if cfg.cache_targets:
            target = maps_a[idx].to(env.device)
        else:
            target = targets(x)
            if epoch == 0:
                run.seen.add(target)
        with autocast_for(env.device, cfg.amp):
            logits = model(x)
        loss = distill_loss(logits.float(), target, cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tot_loss += loss.item() * len(idx)
        tot += len(idx)
        if s % 10 == 0:
            bar.set_postfix(loss=f"{tot_loss / tot:.4f}")
    tot_loss, tot = env.all_sum([tot_loss, tot])
    if env.rank == 0:
        _end_epoch(run, opt, sched, epoch, phase, phase_idx, tot_loss / tot, t0)
    env.barrier()


def _end_epoch(run: TrainingRun, opt, sched, epoch: int, phase: str, phase_idx: int, loss: float,
               t0: float) -> None:
    """Rank 0 after an epoch that began at ``t0``: validate, write the checkpoint atomically (with the log
    rows), then the logs it describes, and report."""
    images, maps, params = run.val
    val = evaluate(run.student, run.targets.norm, images, maps, params, run.progress, "validate")
    seconds = time.time() - t0
    row = [epoch + 1, phase, f"{loss:.5f}", f"{val['kld']:.4f}", f"{val['cc']:.4f}", f"{val['recall@0.5']:.4f}",
           f"{sched.get_last_lr()[0]:.6g}", f"{seconds:.1f}"]
    save_training_state(run.out / "last.pt", {
        "model": run.student.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "epoch": epoch + 1, "phase": phase_idx,
        "config": asdict(run.cfg), "rng_cpu": torch.get_rng_state(), **run.seen.state(),
        "log": [*run.log_rows, row]})
    run.log_rows.append(row)
    _write_log(run.out / "log.csv", run.log_rows)
    if run.tb is None:
        _open_tensorboard(run)
    if run.tb:
        run.tb.add_scalar("train/loss", loss, epoch + 1)
        for k in ("kld", "cc", "recall@0.5", "spearman"):
            run.tb.add_scalar(f"val/{k}", val[k], epoch + 1)
    if run.progress:
        log.info("epoch %d/%d (%s): loss %.4f, val KLD %.4f CC %.4f recall@0.5 %.4f (%.0f s)", epoch + 1,
                 run.total_epochs, phase, loss, val["kld"], val["cc"], val["recall@0.5"], seconds)
