"""Scoring maps against human fixations: :func:`evaluate_saliency` (``rollout-fast saliency-eval``) and the
per-epoch validation of saliency training (:func:`validation_metrics`).

Protocol (stated in every table): each map is upsampled bilinearly (``align_corners=False``) to the
photograph's own size and clamped at 0 (:func:`~rollout_fast.saliency.sources.upsample_maps`), then scored
there with :mod:`rollout_fast.saliency.metrics` (Bylinskii et al. 2019): NSS, AUC-Judd and shuffled AUC at the
fixations (sAUC negatives: the fixations of every *other* image of the split, mapped to this image's size by
relative position), CC, KLD (MSI-Net's eps 1e-7) and SIM against the fixation density (a Gaussian of one degree,
:data:`~rollout_fast.saliency.data.OSIE_SIGMA_PX` on OSIE), and information gain over the centre prior fitted to
the train split, in bits per fixation. Means over images.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..metrics import cc, kld, sim
from .data import FixationDataset, Fixations, fixation_counts
from .metrics import nss, saliency_metrics
from .sources import MapSpec, build_sources, upsample_maps

__all__ = ["METRICS", "OUTPUTS", "PROTOCOL", "EvalResult", "check_map_size", "evaluate_saliency",
           "validation_metrics", "write_results"]

METRICS = ("nss", "cc", "auc_judd", "sauc", "kld", "sim", "ig")
_HEAD = {"nss": "NSS ↑", "cc": "CC ↑", "auc_judd": "AUC-Judd ↑", "sauc": "sAUC ↑", "kld": "KLD ↓", "sim": "SIM ↑",
         "ig": "IG (bits) ↑"}
OUTPUTS = ("table.md", "metrics.csv", "per_image.csv", "figure.png", "settings.json")
PROTOCOL = ("maps upsampled bilinearly (align_corners=False) to each photograph's size and clamped at 0, then "
            "scored there (Bylinskii et al. 2019 metrics; sAUC negatives: the other images' fixations of the split; "
            "KLD eps 1e-7; IG in bits per fixation over the train centre prior)")


def check_map_size(m: torch.Tensor, record: Fixations, label: str) -> None:
    """Raise ValueError naming ``label`` and the image when ``m`` is not an (H, W) map of the image's size."""
    if m.dim() != 2 or tuple(m.shape) != tuple(record.size):
        raise ValueError(f"maps: {label!r} gave a map of shape {tuple(m.shape)} for image '{record.name}', which is "
                         f"{record.size[1]} x {record.size[0]} (H, W = {record.size}); upsample it to the image")


@torch.no_grad()
def validation_metrics(probs: torch.Tensor, records: Sequence[Fixations], densities: Sequence[torch.Tensor]
                       ) -> dict[str, float]:
    """Mean KLD, CC, NSS and SIM of predicted maps over images, at each image's own resolution.

    Args:
        probs: (B, h, w) non-negative maps (e.g. a :class:`~rollout_fast.saliency.models.SaliencyNet`'s
            probabilities at its input size), upsampled bilinearly to each image.
        records: the B images' fixations (NSS at the points). densities: their (H, W) fixation densities.

    Returns:
        ``{"kld", "cc", "nss", "sim"}`` means (float) and ``"images"``.

    Raises:
        ValueError: lengths differ, or a density of another size than its image (naming it).
    """
    if not len(probs) == len(records) == len(densities):
        raise ValueError(f"validation: {len(probs)} maps, {len(records)} records, {len(densities)} densities")
    vals = {k: [] for k in ("kld", "cc", "nss", "sim")}
    for p, r, d in zip(probs, records, densities):
        m = upsample_maps(p[None].cpu(), r.size)
        check_map_size(d, r, "density")
        vals["kld"].append(float(kld(m, d[None])[0]))
        vals["cc"].append(float(cc(m, d[None])[0]))
        vals["sim"].append(float(sim(m, d[None])[0]))
        vals["nss"].append(float(nss(m, [r.points])[0]))
    return {**{k: float(np.mean(v)) for k, v in vals.items()}, "images": len(records)}


class _Negatives:
    """Fixation counts of every image of the split at a given size (points moved by relative position), minus
    the scored image's own: the shuffled-AUC negatives."""

    def __init__(self, records: Sequence[Fixations]):
        self.records = records
        self._total: dict = {}

    def total(self, size) -> torch.Tensor:
        if size not in self._total:
            H, W = size
            pts = []
            for r in self.records:
                s = torch.tensor([W / r.size[1], H / r.size[0]], dtype=torch.float64)
                p = (r.points + 0.5) * s - 0.5
                pts.append(torch.minimum(p.clamp_min(-0.5), torch.tensor([W - 0.51, H - 0.51], dtype=torch.float64)))
            self._total[size] = fixation_counts([torch.cat(pts)], size)[0].double()
        return self._total[size]

    def __call__(self, record: Fixations) -> torch.Tensor:
        return (self.total(record.size) - record.counts().double()).clamp_min(0)


@dataclass
class EvalResult:
    """``rows``: one dict per map source (label, kind, note, the mean of each metric, images); ``per_image``:
    one dict per (source, image); ``samples``: the figure's images (name, display image, points, density, maps)."""

    rows: list[dict] = field(default_factory=list)
    per_image: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)


def _load(ds: FixationDataset, r: Fixations):
    from ..data import load_image

    im = load_image(ds.stimuli_dir / r.name)
    if (im.height, im.width) != tuple(r.size):
        raise ValueError(f"image '{r.name}': decoded as {im.width} x {im.height} but its fixations are on a "
                         f"{r.size[1]} x {r.size[0]} image")
    return im


def evaluate_saliency(root, names: Sequence[str], specs: Sequence[MapSpec], *, split_names: Sequence[str] | None = None,
                      train_names: Sequence[str] | None = None, sigma: float, device="cpu", batch_size: int = 8,
                      figure_images: int = 4, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      progress: bool = False, **dataset_kwargs) -> EvalResult:
    """Score every map source on the images ``names`` of a fixation dataset (protocol: :data:`PROTOCOL`).

    Args:
        root, ``dataset_kwargs``: as :class:`~rollout_fast.saliency.data.FixationDataset` (its checks apply:
            a fixation outside its image, an image without fixations, a .mat without the expected fields, an
            empty split each raise ValueError naming the item).
        names: the images scored. split_names: the whole split (sAUC negatives; default ``names``).
        train_names: the train split (centre prior, mean map, IG baseline); None: no IG.
        specs: :func:`~rollout_fast.saliency.sources.parse_map_specs`. sigma: the density's Gaussian (px).
        figure_images: how many of the first images the figure shows.

    Raises:
        ValueError, FileNotFoundError: bad data or map source (see above and
            :func:`~rollout_fast.saliency.sources.build_sources`); a source giving a map of the wrong size.
    """
    from tqdm.auto import tqdm

    ds = FixationDataset(root, list(names), sigma=sigma, **dataset_kwargs)
    split = ds.records if split_names is None else FixationDataset(root, list(split_names), **dataset_kwargs).records
    train = FixationDataset(root, list(train_names), **dataset_kwargs).records if train_names else None
    sources, centre = build_sources(specs, train, sigma=sigma, device=device, head_fusion=head_fusion,
                                    discard_ratio=discard_ratio, progress=progress)
    negatives, res = _Negatives(split), EvalResult()
    bar = tqdm(total=len(ds), desc=f"score {len(sources)} maps", unit="image", disable=not progress)
    for s in range(0, len(ds), batch_size):
        recs = ds.records[s:s + batch_size]
        images = [_load(ds, r) for r in recs]
        truth = [(r.counts(), r.density(sigma), negatives(r)) for r in recs]
        maps = {src.spec.label: src.maps(images, recs) for src in sources}
        for src in sources:
            for r, m, (counts, dens, neg) in zip(recs, maps[src.spec.label], truth):
                check_map_size(m, r, src.spec.label)
                v = saliency_metrics(m[None], dens[None], counts[None], nonfixations=neg[None],
                                     baseline=None if centre is None else centre(r.size))
                res.per_image.append({"map": src.spec.label, "image": r.name,
                                      **{k: float(v[k][0]) for k in METRICS if k in v}})
        bar.update(len(recs))
        for i, r in enumerate(recs):
            if len(res.samples) < figure_images:
                res.samples.append(_sample(images[i], r, truth[i][1], {k: v[i] for k, v in maps.items()}))
    for src in sources:
        vals = [p for p in res.per_image if p["map"] == src.spec.label]
        res.rows.append({"map": src.spec.label, "kind": src.spec.kind, "note": src.note,
                         **{k: float(np.mean([p[k] for p in vals])) for k in METRICS if k in vals[0]},
                         "images": len(vals)})
    bar.close()
    return res


def _sample(image, record: Fixations, density: torch.Tensor, maps: dict, width: int = 240) -> dict:
    """A figure panel set at display size (``width`` px wide)."""
    H, W = record.size
    h = max(1, round(H * width / W))

    def small(m):
        return upsample_maps(m[None].float(), (h, width))[0].numpy()
    return {"name": record.name, "image": np.asarray(image.resize((width, h))),
            "points": (record.points.numpy() + 0.5) * (width / W) - 0.5, "density": small(density),
            "maps": {k: small(m) for k, m in maps.items()}}


def _fmt(v: float) -> str:
    s = f"{v:.3f}"
    return "0.000" if s == "-0.000" else s


def markdown_table(rows: Sequence[dict]) -> str:
    """The results as a markdown table (metrics present in every row), notes and the protocol below it."""
    cols = [k for k in METRICS if all(k in r for r in rows)]
    lines = ["| map | " + " | ".join(_HEAD[k] for k in cols) + " | images |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for r in rows:
        lines.append(f"| {r['map']} | " + " | ".join(_fmt(r[k]) for k in cols) + f" | {r['images']} |")
    lines += ["", *(f"- {r['map']}: {r['note']}" for r in rows), "", f"Protocol: {PROTOCOL}."]
    return "\n".join(lines) + "\n"


def _csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    from ..checkpoint import atomic_write

    def w(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            wr.writeheader()
            wr.writerows(rows)
    atomic_write(path, w)


def save_figure(samples: Sequence[dict], path: Path) -> Path:
    """image | fixations (points on the dimmed image, over the density) | each map (colours from 0 to its max)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = list(samples[0]["maps"]) if samples else []
    cols = 2 + len(labels)
    fig, axes = plt.subplots(max(1, len(samples)), cols, figsize=(2.2 * cols, 1.8 * max(1, len(samples))),
                             dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, s in enumerate(samples):
        axes[i, 0].imshow(s["image"])
        axes[i, 0].text(0, -0.03, s["name"], transform=axes[i, 0].transAxes, fontsize=7, va="top")
        axes[i, 1].imshow(s["image"], alpha=0.35)
        axes[i, 1].imshow(s["density"], cmap="magma", alpha=0.6)
        axes[i, 1].scatter(s["points"][:, 0], s["points"][:, 1], s=2, c="cyan", linewidths=0)
        for j, k in enumerate(labels):
            m = s["maps"][k]
            axes[i, 2 + j].imshow(m, cmap="magma", vmin=0.0, vmax=max(float(m.max()), 1e-30))
    for j, title in enumerate(["image", "fixations", *labels]):
        axes[0, j].set_title(title, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_results(out: Path, result: EvalResult, settings: dict) -> dict[str, Path]:
    """Write ``table.md``, ``metrics.csv`` (one row per map), ``per_image.csv``, ``figure.png`` and
    ``settings.json`` (the command's settings and :data:`PROTOCOL`) into ``out``; returns their paths."""
    from ..checkpoint import atomic_write, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result.rows)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table))
    _csv(out / "metrics.csv", result.rows, ["map", "kind", *METRICS, "images", "note"])
    _csv(out / "per_image.csv", result.per_image, ["map", "image", *METRICS])
    save_figure(result.samples, out / "figure.png")
    write_json(out / "settings.json", {**settings, "protocol": PROTOCOL, "results": result.rows})
    return {name: out / name for name in OUTPUTS}
