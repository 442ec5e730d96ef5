"""Human eye-fixation data: the OSIE loader, fixation maps from points, the fixed train/val split and a
torchvision-style dataset for any fixation dataset laid out like OSIE (stimuli + a fixations .mat).

Coordinates. Everything returned here uses 0-based pixel coordinates ``(x, y)``: the centre of the
top-left pixel is ``(0, 0)``, so pixel ``(row, col) = (floor(y + 0.5), floor(x + 0.5))`` and a point
lies inside an ``H x W`` image when ``-0.5 <= x < W - 0.5`` and ``-0.5 <= y < H - 0.5``.
OSIE's ``fix_x``/``fix_y`` are MATLAB's 1-based pixel coordinates: the authors' own code
(``src/dataset/computeFixationMaps.m``) indexes ``map(round(fix_y), round(fix_x))`` after clamping to
``[1, w]`` x ``[1, h]``. The data do not decide it on their own (all 98,321 fixations lie in
``[1.2, 799.2] x [1.2, 599.2]``, valid either way), so the loader follows the authors' code and
subtracts 1 (``origin=1``); the difference is 1 px, 1/24 of the Gaussian's sigma.

Maps. :func:`fixation_counts` is the number of fixations on each pixel (the "fixation map" of the
benchmarks when made binary); :func:`fixation_density` is the sum of isotropic Gaussians of standard
deviation ``sigma`` centred on the (sub-pixel) fixation points, sampled at pixel centres and divided
by its sum (the continuous ground truth for KLD, CC and SIM).

Requires scipy (``pip install 'rollout_fast[saliency]'``) only to read the ``.mat`` file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "OSIE",
    "OSIE_DEGREES_PER_PX",
    "OSIE_SIGMA_PX",
    "OSIE_SIZE",
    "SPLIT_FILE",
    "FixationDataset",
    "Fixations",
    "fixation_counts",
    "fixation_density",
    "load_split",
    "make_split",
    "read_fixations_mat",
]

OSIE_SIZE = (600, 800)
"""OSIE stimulus size ``(H, W)`` in pixels."""

OSIE_SIGMA_PX = 24.0
"""Standard deviation (pixels) of the Gaussian that turns OSIE fixations into a density: one degree of
visual angle.

Derivation: the OSIE authors' released code (NUS-VIP/predicting-human-gaze-beyond-pixels,
``src/common/config.m``: ``params.eye.radius = 24``, used as ``fspecial('gaussian', 168, 24)`` by
``src/dataset/computeFixationMaps.m``) blurs fixations with sigma = 24 px, their one degree of visual
angle for the 800 x 600 stimuli in their viewing set-up (Xu et al., "Predicting human gaze beyond
pixels", Journal of Vision 14(1):28, 2014). The paper's own statement of screen size and viewing
distance could not be retrieved here, so the figure rests on the authors' code; it agrees with the
MIT saliency benchmark's convention for 800 x 600-class displays (1 degree ~ 24-30 px). Hence
``OSIE_DEGREES_PER_PX = 1 / 24``.
"""

OSIE_DEGREES_PER_PX = 1.0 / OSIE_SIGMA_PX
"""Degrees of visual angle per pixel on OSIE stimuli (see :data:`OSIE_SIGMA_PX`)."""

SPLIT_FILE = Path(__file__).with_name("osie_split.json")
"""The fixed OSIE split shipped with the package: ``{"dataset", "seed", "train": [...600 names],
"val": [...100 names]}``, made by :func:`make_split` (all 700 names, ``n_val=100``, ``seed=0``)."""


# --------------------------------------------------------------------------------------- the records

@dataclass(frozen=True)
class Fixations:
    """The fixations recorded on one image.

    Attributes:
        name: the stimulus file name, e.g. ``"1001.jpg"``.
        size: ``(H, W)`` of the stimulus in pixels.
        points: (N, 2) float64 ``(x, y)`` in 0-based pixel coordinates (module docstring), N >= 1.
        subjects: (N,) int64, the subject's index in the file (0-based).
        durations: (N,) float64 fixation durations in ms (NaN where the file has none).
    """

    name: str
    size: tuple[int, int]
    points: torch.Tensor
    subjects: torch.Tensor
    durations: torch.Tensor

    def counts(self) -> torch.Tensor:
        """(H, W) float32 fixation counts per pixel (see :func:`fixation_counts`)."""
        return fixation_counts([self.points], self.size)[0]

    def density(self, sigma: float = OSIE_SIGMA_PX) -> torch.Tensor:
        """(H, W) float32 fixation density summing to 1 (see :func:`fixation_density`)."""
        return fixation_density([self.points], self.size, sigma)[0]


def _require_scipy_io():
    try:
        import scipy.io
    except ImportError as e:  # pragma: no cover - exercised only without scipy
        raise ImportError("reading fixation .mat files needs scipy: pip install 'rollout_fast[saliency]'") from e
    return scipy.io


def _field(obj, name: str, where: str):
    names = getattr(obj, "_fieldnames", None)
    if names is None or name not in names:
        raise ValueError(f"{where}: missing field '{name}' (has {names or 'no fields'})")
    return getattr(obj, name)


def read_fixations_mat(path: str | Path, variable: str = "fixations") -> list[dict]:
    """Read an OSIE-layout fixation file as raw per-image records (coordinates as stored).

    The file holds a struct array ``variable`` with one element per image, fields ``img`` (the
    stimulus file name) and ``subjects`` (a struct array, one per subject, fields ``fix_x``,
    ``fix_y`` and optionally ``fix_duration``).

    Args:
        path: the ``.mat`` file (MATLAB v5-v7.2, what ``scipy.io.loadmat`` reads).
        variable: the struct array's name.

    Returns:
        One dict per image in file order: ``name`` (str), ``x``, ``y``, ``durations`` (float64 (N,)
        numpy arrays; durations NaN where absent) and ``subjects`` (int64 (N,)).

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable .mat, no ``variable``, an element
        without ``img``/``subjects``, a subject without ``fix_x``/``fix_y``, ``fix_x``/``fix_y`` (or
        ``fix_duration``) of different lengths, non-finite coordinates, or a repeated image name;
        each message names the file, the element and the image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fixations file not found: {path}")
    sio = _require_scipy_io()
    try:
        mat = sio.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises several types for non-.mat input
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({e})") from e
    if variable not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no variable '{variable}' (found {found})")
    out, seen = [], set()
    for i, entry in enumerate(np.atleast_1d(mat[variable])):
        where = f"{path}: {variable}[{i}]"
        name = str(_field(entry, "img", where))
        where = f"{where} ({name})"
        if name in seen:
            raise ValueError(f"{where}: image listed twice")
        seen.add(name)
        xs, ys, ds, ss = [], [], [], []
        for j, sub in enumerate(np.atleast_1d(_field(entry, "subjects", where))):
            w = f"{where} subject {j}"
            x = np.atleast_1d(np.asarray(_field(sub, "fix_x", w), dtype=np.float64)).ravel()
            y = np.atleast_1d(np.asarray(_field(sub, "fix_y", w), dtype=np.float64)).ravel()
            if x.shape != y.shape:
                raise ValueError(f"{w}: fix_x has {x.size} values but fix_y has {y.size}")
            if "fix_duration" in sub._fieldnames:
                d = np.atleast_1d(np.asarray(sub.fix_duration, dtype=np.float64)).ravel()
                if d.shape != x.shape:
                    raise ValueError(f"{w}: fix_duration has {d.size} values but fix_x has {x.size}")
            else:
                d = np.full(x.shape, np.nan)
            if not (np.isfinite(x).all() and np.isfinite(y).all()):
                raise ValueError(f"{w}: non-finite fixation coordinates")
            xs.append(x), ys.append(y), ds.append(d), ss.append(np.full(x.shape, j, dtype=np.int64))
        cat = (lambda a, dt: np.concatenate(a) if a else np.zeros(0, dt))
        out.append({"name": name, "x": cat(xs, np.float64), "y": cat(ys, np.float64),
                    "durations": cat(ds, np.float64), "subjects": cat(ss, np.int64)})
    return out


def _check_points(points: torch.Tensor, size: tuple[int, int], item: str) -> None:
    """Raise ValueError naming ``item`` if a point lies outside the H x W image or there are none."""
    H, W = size
    if points.shape[0] == 0:
        raise ValueError(f"{item}: no fixations")
    x, y = points[:, 0], points[:, 1]
    bad = (x < -0.5) | (x >= W - 0.5) | (y < -0.5) | (y >= H - 0.5)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise ValueError(f"{item}: fixation {k} at (x={float(x[k]):g}, y={float(y[k]):g}) (0-based) lies outside "
                         f"the {W} x {H} image ({int(bad.sum())} such points)")


# ------------------------------------------------------------------------------------------- maps

def _check_size(size) -> tuple[int, int]:
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size: expected (H, W) positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _points_list(points, name: str = "points") -> list[torch.Tensor]:
    if isinstance(points, torch.Tensor) or not isinstance(points, Sequence):
        raise TypeError(f"{name}: expected a list of (N, 2) (x, y) point tensors, got {type(points).__name__}")
    out = []
    for b, p in enumerate(points):
        p = torch.as_tensor(p, dtype=torch.float64)
        if p.dim() != 2 or p.shape[1] != 2:
            raise ValueError(f"{name}[{b}]: expected (N, 2) (x, y) points, got shape {tuple(p.shape)}")
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{name}[{b}]: non-finite coordinates")
        out.append(p)
    if not out:
        raise ValueError(f"{name}: empty list")
    return out


def fixation_counts(points: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Fixation counts per pixel from point lists.

    Args:
        points: B tensors (N_b, 2) of ``(x, y)`` 0-based pixel coordinates (module docstring);
            each point goes to pixel ``(floor(y + 0.5), floor(x + 0.5))``.
        size: ``(H, W)``.

    Returns:
        (B, H, W) float32 counts (> 1 where several fixations share a pixel); ``counts > 0`` is the
        binary fixation map of the MIT benchmark.

    Raises:
        TypeError, ValueError: not a list of (N, 2) tensors; an empty list, an image with no
            fixations or a point outside the image (naming ``points[b]`` and the point).
    """
    H, W = _check_size(size)
    pts = _points_list(points)
    out = torch.zeros(len(pts), H * W, dtype=torch.float32)
    for b, p in enumerate(pts):
        _check_points(p, (H, W), f"points[{b}]")
        col = torch.floor(p[:, 0] + 0.5).long()
        row = torch.floor(p[:, 1] + 0.5).long()
        out[b].index_add_(0, row * W + col, torch.ones(p.shape[0]))
    return out.view(len(pts), H, W)


def fixation_density(points: Sequence[torch.Tensor], size: tuple[int, int],
                     sigma: float = OSIE_SIGMA_PX) -> torch.Tensor:
    """Fixation density: a Gaussian of standard deviation ``sigma`` pixels on each fixation, summed.

    ``D(r, c) = sum_i exp(-((c - x_i)^2 + (r - y_i)^2) / (2 sigma^2))`` at pixel centres, from the
    exact sub-pixel points (no rounding, no truncation of the kernel; mass falling outside the image
    is dropped, as with the zero-padded ``imfilter`` of the OSIE authors' code), then divided by its
    sum. The Gaussian profiles are computed in float64, their product ``Gy^T Gx`` (separable) in float32:
    O(N H W) per image.

    Args:
        points: B tensors (N_b, 2) of ``(x, y)`` 0-based pixel coordinates.
        size: ``(H, W)``.
        sigma: standard deviation in pixels (default one degree on OSIE, :data:`OSIE_SIGMA_PX`).

    Returns:
        (B, H, W) float32, each map summing to 1.

    Raises:
        TypeError, ValueError: as :func:`fixation_counts`; ``sigma`` not a positive number.
    """
    H, W = _check_size(size)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma: expected a positive number of pixels, got {sigma!r}")
    pts = _points_list(points)
    rows = torch.arange(H, dtype=torch.float64)
    cols = torch.arange(W, dtype=torch.float64)
    out = torch.empty(len(pts), H, W, dtype=torch.float32)
    for b, p in enumerate(pts):
        _check_points(p, (H, W), f"points[{b}]")
        gx = torch.exp(-(cols[None, :] - p[:, 0:1]) ** 2 / (2.0 * sigma**2))  # (N, W)
        gy = torch.exp(-(rows[None, :] - p[:, 1:2]) ** 2 / (2.0 * sigma**2))  # (N, H)
        d = gy.T.float() @ gx.float()  # (H, W); the sum of N outer products
        out[b] = d / d.double().sum().float()
    return out


# ------------------------------------------------------------------------------------------ splits

def make_split(names: Sequence[str], n_val: int, seed: int = 0) -> dict[str, list[str]]:
    """A seeded random train/val split of image names.

    The names are sorted, permuted with ``numpy.random.default_rng(seed).permutation``, the first
    ``n_val`` go to val; both lists are returned sorted.

    Returns:
        ``{"train": [...], "val": [...]}``.

    Raises:
        ValueError: repeated names, ``n_val`` not in [1, len(names) - 1].
    """
    names = sorted(names)
    if len(set(names)) != len(names):
        raise ValueError("names: repeated image names")
    if isinstance(n_val, bool) or not isinstance(n_val, int) or not 0 < n_val < len(names):
        raise ValueError(f"n_val: expected an int in [1, {len(names) - 1}], got {n_val!r}")
    perm = np.random.default_rng(seed).permutation(len(names))
    val = sorted(names[i] for i in perm[:n_val])
    train = sorted(names[i] for i in perm[n_val:])
    return {"train": train, "val": val}


def load_split(split: str, path: str | Path = SPLIT_FILE) -> list[str]:
    """Image names of one split of a split file (default: the packaged OSIE split, 600 train / 100 val).

    Args:
        split: ``"train"``, ``"val"`` or ``"all"`` (train + val, sorted).
        path: a JSON file with ``"train"`` and ``"val"`` lists of names.

    Raises:
        FileNotFoundError: no such file. ValueError: unknown ``split``, a split missing from the file,
            or an empty split (naming the split and the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    data = json.loads(path.read_text())
    if split not in ("train", "val", "all"):
        raise ValueError(f"split: expected 'train', 'val' or 'all', got {split!r}")
    parts = ("train", "val") if split == "all" else (split,)
    names = []
    for p in parts:
        if not isinstance(data.get(p), list):
            raise ValueError(f"{path}: no '{p}' list of image names")  # noqa: TRY004 (file content)
        names += data[p]
    if not names:
        raise ValueError(f"split '{split}' in {path} is empty")
    return sorted(names)


# ----------------------------------------------------------------------------------------- datasets

class FixationDataset(torch.utils.data.Dataset):
    """A free-viewing fixation dataset laid out like OSIE: ``root/<stimuli>/*.jpg`` + ``root/<fixations>``.

    ``dataset[i]`` is ``(image, target)`` in torchvision style: ``image`` is the stimulus as a PIL RGB
    image passed through ``transform``; ``target`` is a dict passed through ``target_transform``:

    - ``"name"``: the stimulus file name;
    - ``"points"``: (N, 2) float32 ``(x, y)``, 0-based pixel coordinates of every fixation;
    - ``"fixations"``: (H, W) float32 fixation counts per pixel (:func:`fixation_counts`);
    - ``"density"``: (H, W) float32 fixation density summing to 1 (:func:`fixation_density`).

    The maps are at the stimulus's own resolution. Images of different sizes cannot be stacked by the
    default collate; :meth:`collate` stacks the maps and keeps ``points`` as a list.

    Args:
        root: dataset folder.
        names: the images to use (file names as in the .mat, e.g. from :func:`load_split`); None for
            every image in the file.
        stimuli: folder of the stimuli under ``root``.
        fixations: the .mat file under ``root`` (format: :func:`read_fixations_mat`).
        origin: the coordinate of the first pixel's centre in the file (1 for MATLAB, 0 for 0-based).
        sigma: the density's Gaussian standard deviation in pixels (one degree of visual angle for
            the dataset's set-up; OSIE: :data:`OSIE_SIGMA_PX`).
        transform, target_transform: callables applied to the image and to the target dict.

    Attributes:
        records: list of :class:`Fixations`, one per image, in ``names`` order (sorted if None).

    Raises:
        FileNotFoundError: ``root``, the .mat or a stimulus is missing (naming it). ValueError: an
            empty ``names``, a name not in the file, an image with no fixations or a fixation outside
            its image (naming the image, subject and point), or a malformed .mat
            (:func:`read_fixations_mat`).
    """

    def __init__(self, root: str | Path, names: Sequence[str] | None = None, *,
                 stimuli: str = "data/stimuli", fixations: str = "data/eye/fixations.mat",
                 origin: float = 1.0, sigma: float = OSIE_SIGMA_PX,
                 transform: Callable | None = None, target_transform: Callable | None = None):
        from PIL import Image

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: dataset folder not found: {self.root}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma: expected a positive number of pixels, got {sigma!r}")
        self.sigma = float(sigma)
        self.stimuli_dir = self.root / stimuli
        self.transform, self.target_transform = transform, target_transform
        raw = {r["name"]: r for r in read_fixations_mat(self.root / fixations)}
        if names is None:
            names = sorted(raw)
        else:
            names = list(names)
            if not names:
                raise ValueError(f"names: empty split (no images selected from {self.root})")
        self.records: list[Fixations] = []
        for name in names:
            if name not in raw:
                raise ValueError(f"names: image '{name}' is not in {self.root / fixations}")
            r = raw[name]
            path = self.stimuli_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"stimulus not found for image '{name}': {path}")
            with Image.open(path) as im:
                W, H = im.size
            pts = torch.from_numpy(np.stack([r["x"], r["y"]], axis=1)) - float(origin)
            if pts.shape[0] == 0:
                raise ValueError(f"image '{name}': no fixations in {self.root / fixations}")
            try:
                _check_points(pts, (H, W), f"image '{name}'")
            except ValueError:
                x, y = pts[:, 0], pts[:, 1]
                k = int(((x < -0.5) | (x >= W - 0.5) | (y < -0.5) | (y >= H - 0.5)).nonzero()[0, 0])
                raise ValueError(f"image '{name}': subject {int(r['subjects'][k])}'s fixation at "
                                 f"(fix_x={r['x'][k]:g}, fix_y={r['y'][k]:g}) lies outside the {W} x {H} "
                                 f"image (origin={origin:g})") from None
            self.records.append(Fixations(name, (H, W), pts, torch.from_numpy(r["subjects"]),
                                          torch.from_numpy(r["durations"])))

    @property
    def names(self) -> list[str]:
        """The image names, in index order."""
        return [r.name for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        from PIL import Image

        r = self.records[index]
        with Image.open(self.stimuli_dir / r.name) as im:
            image = im.convert("RGB")
        target = {"name": r.name, "points": r.points.float(), "fixations": r.counts(),
                  "density": r.density(self.sigma)}
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    @staticmethod
    def collate(batch):
        """Collate ``(image, target)`` pairs: images stacked if tensors (else a list), ``fixations`` and
        ``density`` stacked to (B, H, W), ``points`` and ``name`` kept as lists.

        Raises:
            ValueError: maps of different sizes in one batch (naming the two images).
        """
        images, targets = zip(*batch)
        first = targets[0]
        for t in targets[1:]:
            if t["density"].shape != first["density"].shape:
                raise ValueError(f"collate: '{t['name']}' is {tuple(t['density'].shape)} but '{first['name']}' "
                                 f"is {tuple(first['density'].shape)}; batch images of one size")
        imgs = torch.stack(images) if all(isinstance(i, torch.Tensor) for i in images) else list(images)
        return imgs, {"name": [t["name"] for t in targets], "points": [t["points"] for t in targets],
                      "fixations": torch.stack([t["fixations"] for t in targets]),
                      "density": torch.stack([t["density"] for t in targets])}


class OSIE(FixationDataset):
    """The OSIE dataset (Xu et al., JoV 2014): 700 images, 800 x 600, 15 subjects, 3 s free viewing.

    Args:
        root: the OSIE folder holding ``data/stimuli/*.jpg`` and ``data/eye/fixations.mat``
            (e.g. ``../shared/data/osie``).
        split: ``"train"`` (600 images), ``"val"`` (100) or ``"all"``, from the packaged split file
            (:data:`SPLIT_FILE`), or an explicit list of image names.
        **kwargs: as :class:`FixationDataset` (``sigma`` defaults to :data:`OSIE_SIGMA_PX`, ``origin``
            to 1).

    Raises:
        As :class:`FixationDataset` and :func:`load_split`.
    """

    def __init__(self, root: str | Path, split: str | Sequence[str] = "train", **kwargs):
        names = load_split(split) if isinstance(split, str) else list(split)
        if not names:
            raise ValueError("split: empty list of image names")
        super().__init__(root, names, **kwargs)
