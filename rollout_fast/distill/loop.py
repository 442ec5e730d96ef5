"""The one distillation training loop: two phases (frozen backbone + fresh head, then everything), per-epoch
validation, CSV/TensorBoard logs and a resumable checkpoint each epoch.

What is trained on, the loss and the validation come from a :class:`Task`: :class:`.rollout_task.RolloutTask`
(a student predicting a teacher ViT's rollout maps on its patch grid, :func:`rollout_fast.distill.distill`) and
:class:`.saliency.SaliencyTask` (a saliency encoder-decoder trained on human fixation densities, optionally with
a second head matched to a saliency teacher's dense pixel maps, :func:`rollout_fast.distill.distill_saliency`).
The loop itself (sampling, optimiser and schedule, autocast, DDP, checkpoints, logs) is shared.

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
from torch import nn

from ..checkpoint import atomic_write, save_training_state
from ..training import adamw, autocast_for, lr_lambda
from .config import LOSSES
from .ddp import DistEnv

__all__ = ["LOG_COLUMNS", "SCHEDULES", "Task", "TrainingRun", "distill_loss", "log_columns", "train"]

log = logging.getLogger("rollout_fast.distill")

SCHEDULES = ("cosine", "constant")
LOG_HEAD, LOG_TAIL = ["epoch", "phase", "train_loss"], ["lr", "seconds"]
# the rollout task's log.csv columns (other tasks put their own validation columns between head and tail)
LOG_COLUMNS = [*LOG_HEAD, "val_kld", "val_cc", "val_recall@0.5", *LOG_TAIL]
LOOP_FILES = ("last.pt", "log.csv", "metrics.json")  # what every run writes in its folder


def distill_loss(logits: torch.Tensor, target: torch.Tensor, loss: str = "kld") -> torch.Tensor:
    """Distillation loss, averaged over the batch: a 0-dim float32 tensor.

    Args:
        logits: (B, gh, gw) student scores (for 'kld' any logits; log-probabilities give the same loss, since
            ``log_softmax`` of a log-probability map is that map).
        target: (B, gh, gw) non-negative teacher maps (any scale; a fixation density for saliency).
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


class Task:
    """What the loop trains on: the training items, their batches, the loss and the validation.

    Subclasses set :attr:`val_columns` ((log.csv column, key of :meth:`validate`'s dict) pairs),
    :attr:`run_files` (the files a run writes besides :data:`LOOP_FILES`, whose interrupted temp files are
    removed at a start), and implement the methods below. The student must have ``head_parameters()`` and
    ``backbone_modules()`` (the 'head' phase trains the first with the second frozen in eval mode).
    """

    val_columns: tuple = ()
    run_files: tuple = ()

    def __len__(self) -> int:
        """The number of training items (the sampler draws from ``range(len(task))``)."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Prepare epoch ``epoch`` (0-based), e.g. its augmentation; called on every process."""

    def batch(self, idx: torch.Tensor, epoch: int) -> tuple:
        """``(inputs, target)`` of training items ``idx`` (int64 (b,)) on the run's device."""
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs):
        """The model's training output (called under autocast); ``model`` may be DDP-wrapped."""
        return model(inputs)

    def loss(self, output, target) -> torch.Tensor:
        """The 0-dim float32 training loss of a batch."""
        raise NotImplementedError

    def validate(self, student: nn.Module, progress: bool) -> dict:
        """Rank 0 after each epoch: a dict holding (at least) the keys of :attr:`val_columns`."""
        raise NotImplementedError

    def state(self) -> dict:
        """Extra entries of the checkpoint (tensors, numbers, strings)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` saved, from a checkpoint being resumed."""


def log_columns(task: Task) -> list[str]:
    """The header of ``log.csv`` for ``task``."""
    return [*LOG_HEAD, *(c for c, _ in task.val_columns), *LOG_TAIL]


@dataclass
class TrainingRun:
    """Everything one training run reads: the config (``batch_size``, ``seed``, ``head_epochs``, ``epochs``,
    ``lr``, ``finetune_lr_scale``, ``weight_decay``, ``warmup_epochs``, ``amp``, optionally ``schedule``:
    'cosine' (default) or 'constant'), the processes, the student, the :class:`Task` and the output folder."""

    cfg: object
    env: DistEnv
    student: nn.Module
    task: Task
    out: Path
    progress: bool = True
    tb: object = None  # TensorBoard writer: None until the first checkpoint, False when not installed
    log_rows: list = field(default_factory=list)  # log.csv's rows (no header), as saved in the checkpoint

    @property
    def total_epochs(self) -> int:
        return self.cfg.head_epochs + self.cfg.epochs


def train(run: TrainingRun, state: dict | None = None) -> None:
    """Train ``run.student`` in place through both phases, from the start or from a checkpoint ``state``."""
    from torch.utils.data import DistributedSampler

    cfg, env, student = run.cfg, run.env, run.student
    start_epoch = 0
    if state is not None:
        student.load_state_dict(state["model"])
        start_epoch = state["epoch"]
        torch.set_rng_state(state["rng_cpu"])
        run.task.load_state(state)
    per_rank = cfg.batch_size // env.world
    sampler = DistributedSampler(range(len(run.task)), num_replicas=env.world, rank=env.rank, shuffle=True,
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


def _open_logs(run: TrainingRun, state: dict | None) -> None:
    """Rank 0: remove temp files of interrupted writes; when resuming, take the log rows the checkpoint
    describes and rewrite ``log.csv`` with them (rows logged after it are dropped). A fresh run writes
    nothing here: ``log.csv`` first appears after the first checkpoint."""
    if run.env.rank != 0:
        return
    for name in (*LOOP_FILES, *run.task.run_files):  # checkpoint.atomic_write's temp files: '.NAME.<random>'
        for tmp in run.out.glob(f".{name}.*"):
            tmp.unlink(missing_ok=True)
    run.log_rows = [] if state is None else _resumed_rows(run.out / "log.csv", state)
    if state is not None:
        _write_log(run.out / "log.csv", run.log_rows, log_columns(run.task))


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


def _write_log(path: Path, rows: list[list], columns: list[str]) -> None:
    """Write ``log.csv`` whole (header + one row per finished epoch), atomically."""
    def _w(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([columns, *rows])
    atomic_write(path, _w)


def _open_tensorboard(run: TrainingRun) -> None:
    """TensorBoard under ``out/tensorboard`` when installed (opened after the first checkpoint)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        run.tb = SummaryWriter(str(run.out / "tensorboard"))
    except Exception:  # noqa: BLE001  (tensorboard not installed: the CSV log is the record)
        run.tb = False


def _optimizer(student: nn.Module, phase: str, n_epochs: int, steps: int, lr: float, cfg):
    """AdamW (Adam when ``weight_decay`` is 0) + the schedule of one phase of ``n_epochs`` x ``steps``:
    linear warm-up, then cosine decay (``cfg.schedule`` 'cosine', the default) or a constant rate
    ('constant'); 'head' trains only the student's head."""
    head = {id(p) for p in student.head_parameters()}
    for p in student.parameters():
        p.requires_grad_(phase == "all" or id(p) in head)
    opt = adamw(((n, p) for n, p in student.named_parameters() if p.requires_grad), lr, cfg.weight_decay)
    warmup = int(cfg.warmup_epochs * steps)
    if getattr(cfg, "schedule", "cosine") == "constant":
        f = _constant_lr(warmup)
    else:
        f = lr_lambda(n_epochs * steps, warmup)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)


def _constant_lr(warmup_steps: int):
    """Multiplier of the base rate: linear warm-up over ``warmup_steps``, then 1 (the seeds' constant Adam rate)."""
    def f(step: int) -> float:
        return (step + 1) / warmup_steps if step < warmup_steps else 1.0
    return f


def _epoch(run: TrainingRun, model, opt, sched, sampler, steps: int, epoch: int, phase: str,
           phase_idx: int) -> None:
    """One epoch on this process's shard, then (rank 0) validation, logs and the checkpoint."""
    from tqdm.auto import tqdm

    cfg, env, student, task = run.cfg, run.env, run.student, run.task
    t0 = time.time()
    student.train()
    if phase == "head":
        student.backbone_modules().eval()
    idx_all = torch.tensor(list(iter(sampler)), dtype=torch.long)
    task.start_epoch(epoch)
    per_rank = cfg.batch_size // env.world
    tot_loss = tot = 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{run.total_epochs} ({phase})",
               disable=not run.progress or env.rank != 0)
    for s in bar:
        idx = idx_all[s * per_rank:(s + 1) * per_rank]
        inputs, target = task.batch(idx, epoch)
        with autocast_for(env.device, cfg.amp):
            output = task.forward(model, inputs)
        loss = task.loss(output, target)
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
    val = run.task.validate(run.student, run.progress)
    seconds = time.time() - t0
    row = [epoch + 1, phase, f"{loss:.5f}", *(f"{val[k]:.4f}" for _, k in run.task.val_columns),
           f"{sched.get_last_lr()[0]:.6g}", f"{seconds:.1f}"]
    save_training_state(run.out / "last.pt", {
        "model": run.student.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "epoch": epoch + 1, "phase": phase_idx,
        "config": asdict(run.cfg), "rng_cpu": torch.get_rng_state(), **run.task.state(),
        "log": [*run.log_rows, row]})
    run.log_rows.append(row)
    _write_log(run.out / "log.csv", run.log_rows, log_columns(run.task))
    if run.tb is None:
        _open_tensorboard(run)
    if run.tb:
        run.tb.add_scalar("train/loss", loss, epoch + 1)
        for k, v in val.items():
            if isinstance(v, float):
                run.tb.add_scalar(f"val/{k}", v, epoch + 1)
    if run.progress:
        shown = ", ".join(f"{k} {val[k]:.4f}" for _, k in run.task.val_columns)
        log.info("epoch %d/%d (%s): loss %.4f, val %s (%.0f s)", epoch + 1, run.total_epochs, phase, loss,
                 shown, seconds)
