"""The rollout task of the distillation loop: a :class:`rollout_fast.students.RolloutStudent` learns a teacher
ViT's rollout maps on its patch grid, from uint8 images augmented on the device (shift + flip), with the
teacher's maps computed per batch or read from cached views; validated with :class:`rollout_fast.metrics.MapMetrics`
against the teacher's maps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..metrics import MapMetrics
from ..students import RolloutStudent, logits_to_maps
from .config import DistillConfig
from .data import view_params
from .ddp import DistEnv
from .loop import Task, distill_loss
from .targets import EVAL_BATCH, TeacherTargets

__all__ = ["RolloutTask", "Seen", "evaluate"]


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


class RolloutTask(Task):
    """uint8 training images ``train_x`` (N, 3, H, W) and, with ``cfg.cache_targets``, their cached teacher
    maps ``train_views`` (a list of ``((dx, dy, flip), maps)``, one per view, used in turn by epoch); else
    each epoch draws its own augmentation (:func:`.data.view_params` of epoch + 1) and the teacher maps the
    batch. ``val`` = (images, maps, (dx, dy, flip)) of the per-epoch validation. ``seen`` collects the
    first epoch's on-the-fly targets (:class:`Seen`, for the final baselines)."""

    val_columns = (("val_kld", "kld"), ("val_cc", "cc"), ("val_recall@0.5", "recall@0.5"))
    run_files = ("student.safetensors", "student.json")

    def __init__(self, cfg: DistillConfig, env: DistEnv, targets: TeacherTargets, train_x: torch.Tensor,
                 train_views: list, val: tuple):
        self.cfg, self.env, self.targets = cfg, env, targets
        self.train_x, self.train_views, self.val = train_x, train_views, val
        self.seen = Seen(torch.zeros(targets.grid, dtype=torch.float64))
        self._params = self._maps = None

    def __len__(self) -> int:
        return len(self.train_x)

    def start_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        if cfg.cache_targets:
            self._params, self._maps = self.train_views[epoch % cfg.views]
        else:
            self._params = view_params(cfg.seed, epoch + 1, len(self.train_x), cfg.max_shift, cfg.flip)
            self._maps = None

    def batch(self, idx: torch.Tensor, epoch: int) -> tuple:
        dxa, dya, fla = self._params
        x = self.targets.norm(self.train_x[idx], dxa[idx], dya[idx], fla[idx])
        if self._maps is not None:
            return x, self._maps[idx].to(self.env.device)
        target = self.targets(x)
        if epoch == 0:
            self.seen.add(target)
        return x, target

    def loss(self, output, target) -> torch.Tensor:
        return distill_loss(output.float(), target, self.cfg.loss)

    def validate(self, student: RolloutStudent, progress: bool) -> dict:
        images, maps, params = self.val
        return evaluate(student, self.targets.norm, images, maps, params, progress, "validate")

    def state(self) -> dict:
        return self.seen.state()

    def load_state(self, state: dict) -> None:
        self.seen = Seen.from_state(state)
