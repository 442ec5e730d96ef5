"""Method specs of :func:`rollout_fast.prune.study.compare_methods`: ``NAME[:KEY=V1,V2,...]...`` parsed into a
:class:`MethodSpec` (a pre-block scorer, an in-network method, or ``SCORER+METHOD``) and its
:class:`OperatingPoint` s (every combination of the values); see :mod:`rollout_fast.prune.study` for the syntax."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from .inner import METHODS, method_names, method_settings
from .keep import check_keep_ratio
from .scorers import scorer_names

__all__ = ["PRESELECT_POINTS", "MethodSpec", "OperatingPoint", "parse_method"]

PRESELECT_POINTS = (0.75, 0.5, 0.4, 0.25)  # keep ratios a pre-block scorer is evaluated at unless told
_SCORER_KEYS = ("keep_ratio", "seed", "stratify")
_ALIASES = {"keep": "keep_ratio"}


@dataclass(frozen=True)
class OperatingPoint:
    """One setting of a method: ``label`` ('keep=0.5 r=4', as in the tables), the scorer's settings
    (``keep_ratio``, ``seed``, ``stratify``: stratified top-k) and the in-network method's (its own argument names)."""

    label: str
    scorer: dict
    reducer: dict


@dataclass(frozen=True)
class MethodSpec:
    """A method and its operating points (:func:`parse_method`). ``scorer`` / ``reducer``: the pre-block
    scorer and the in-network method names (either may be None; both for ``SCORER+METHOD``)."""

    text: str
    name: str
    scorer: str | None
    reducer: str | None
    points: tuple[OperatingPoint, ...]


def parse_method(text: str) -> MethodSpec:
    """A method spec ``NAME[:KEY=V1,V2,...]...`` (see the module docstring) as a :class:`MethodSpec`.

    Raises:
        ValueError: an unknown method name, an unknown or repeated setting, a malformed ``KEY=VALUES``, a keep
            ratio outside (0, 1] or a negative / non-integer seed; the message starts with ``text``. Settings
            the model decides (ToMe's ``r`` against the token count) are checked by :func:`build_methods`.
    """
    text = str(text).strip()
    try:
        name, *parts = [p.strip() for p in text.split(":")]
        scorer, reducer = _method_parts(name)
        given: dict[tuple[str, str], list] = {}
        for part in parts:
            raw, eq, values = part.partition("=")
            if not eq or not raw.strip():
                raise ValueError(f"expected KEY=VALUE[,VALUE...] after ':', got {part!r}")
            kind, key = _setting_key(raw.strip(), scorer, reducer)
            if (kind, key) in given:
                raise ValueError(f"{raw.strip()}: given twice")
            given[(kind, key)] = _check_values(kind, key, _values(values, raw.strip()))
        if scorer is not None and not _scored(reducer):
            given.setdefault(("scorer", "keep_ratio"), list(PRESELECT_POINTS))
        if reducer is not None:
            for key, values in METHODS[reducer].operating_points.items():
                given.setdefault(("reducer", key), list(values))
    except ValueError as e:
        raise ValueError(f"{text}: {e}") from None
    points = []
    for combo in itertools.product(*given.values()):
        settings = {"scorer": {}, "reducer": {}}
        for (kind, key), v in zip(given, combo):
            settings[kind][key] = v
        label = " ".join(_label(kind, key, v, scorer, reducer) for (kind, key), v in zip(given, combo))
        points.append(OperatingPoint(label, settings["scorer"], settings["reducer"]))
    return MethodSpec(text, name, scorer, reducer, tuple(points))


def _method_parts(name: str) -> tuple[str | None, str | None]:
    scorers, methods = scorer_names(), method_names()
    if name in scorers:
        return name, None
    if name in methods:
        return None, name
    a, plus, b = name.partition("+")
    if plus and a in scorers and b in methods:
        return a, b
    raise ValueError(f"unknown method {name!r}; expected a scorer ({', '.join(scorers)}), an in-network method "
                     f"({', '.join(methods)}) or SCORER+METHOD (e.g. student+tome)")


def _scored(reducer: str | None) -> bool:
    """Whether in-network method ``reducer`` ranks tokens by the scorer's scores (``smerge``): its scorer then
    drops nothing itself (keep 1.0) and ``keep`` is the method's."""
    return reducer is not None and METHODS[reducer].uses_scores


def _keys(kind: str, name: str, reducer: str | None = None) -> tuple[str, ...]:
    if kind == "scorer":
        return ("seed",) if _scored(reducer) else _SCORER_KEYS
    return method_settings(name)


def _setting_key(raw: str, scorer: str | None, reducer: str | None) -> tuple[str, str]:
    """``(kind, canonical key)`` of setting ``raw`` ('keep', 'r', 'evit.keep'): 'scorer' or 'reducer'."""
    prefix, dot, key = raw.rpartition(".")
    key = _ALIASES.get(key, key)
    parts = [(k, n) for k, n in (("scorer", scorer), ("reducer", reducer)) if n is not None]
    if dot:
        parts = [(k, n) for k, n in parts if n == prefix]
        if not parts:
            raise ValueError(f"{raw}: {prefix!r} is not part of this method")
    for kind, name in parts:
        if key in _keys(kind, name, reducer):
            return kind, key
    known = [k for kind, name in parts for k in _keys(kind, name, reducer)]
    note = " (keep = keep_ratio)" if "keep_ratio" in known else ""
    raise ValueError(f"unknown setting {raw!r}; expected one of {known}{note}")


def _values(text: str, raw: str) -> list:
    """Comma-separated JSON values (commas inside [...] do not split); a word that is not JSON stays a string."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    if any(not i.strip() for i in items):
        raise ValueError(f"{raw}: expected comma-separated values, got {text!r}")
    out = []
    for item in items:
        try:
            out.append(json.loads(item))
        except json.JSONDecodeError:
            out.append(item.strip())
    return out


def _check_values(kind: str, key: str, values: list) -> list:
    for v in values:
        if key == "keep_ratio":
            for r in v if isinstance(v, list) and kind == "reducer" else [v]:
                check_keep_ratio(r)
        elif kind == "scorer" and key == "seed" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"seed: expected a non-negative int, got {v!r}")
        elif kind == "scorer" and key == "stratify" and not isinstance(v, bool):
            raise ValueError(f"stratify: expected true or false, got {v!r}")
    return values


def _label(kind: str, key: str, value, scorer, reducer) -> str:
    shown = "keep" if key == "keep_ratio" else key
    if kind == "reducer" and scorer is not None and key in _SCORER_KEYS and not _scored(reducer):
        shown = f"{reducer}.{shown}"
    return f"{shown}={json.dumps(value, separators=(',', ':'))}"
