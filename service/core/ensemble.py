"""The shift ensemble: a serving-policy modifier that averages whole-pixel shifted copies of the policy's view.

Flips under a 1-px move happen almost only where the model is unsure. An :class:`Ensemble` names
copy offsets in whole *output* pixels (each copy is the policy's box moved by
:func:`service.core.boxes.shift_box` and rendered by the one preprocessing path,
:meth:`service.core.preprocess.Preprocessor.copies`) and a margin threshold:

- *adaptive* (``threshold < 1``): the bare view is run first; only when its top-1 margin
  ``p1 - p2`` is under the threshold are the other copies run, and the answer is the mean of the
  copies' softmax rows (the bare view counts as a copy when ``(0, 0)`` is an offset);
- *always* (``threshold == 1``): every answer is the mean of all copies.

The answer of an ensemble is a probability vector, not logits; :func:`as_logits` turns it into
``log(p)`` where an interface must carry logits (``softmax(log p) == p``).

Honesty: a robustness protocol that moves the view by a step ``s`` compares neighbouring views.
When two copies differ by ``s``, neighbours share a copy; in adaptive mode, when ``s`` or ``-s``
is itself an offset, one neighbour's bare view is a copy of the other. Either flatters the
measured flip rate, so :meth:`Ensemble.lines_up` names the problem and the scorer refuses such a
setting (:mod:`robustness.protocols`).

Example:
    >>> ens = Ensemble.parse("knight5@0.15")
    >>> ens.offsets[1], ens.extra, ens.adaptive
    ((2, 1), 4, True)
    >>> ens.lines_up((1, 1)) is None
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from service.core.errors import InvalidInput

__all__ = ["PRESETS", "MAX_OFFSET", "Ensemble", "margin", "as_logits"]

PRESETS: dict[str, tuple[tuple[int, int], ...]] = {
    # the knight-move lattice x + 3y = 0 (mod 5): no 1-px move in any direction lies on it, and its
    # copies mix both subsampling phases per axis (measured the steadiest honest set per copy)
    "knight5": ((0, 0), (2, 1), (-1, 2), (-2, -1), (1, -2)),
    # the sets: (+-1, +-1) (its (1, 1) copy IS the pan protocol's diagonal step) and
    # (0,0),(0,2),(2,0),(2,2) (honest, but its mean offset is (1, 1): the served view moves)
    "diagonal4": ((1, 1), (1, -1), (-1, 1), (-1, -1)),
    "square4": ((0, 0), (0, 2), (2, 0), (2, 2)),
}
MAX_OFFSET = 8  # output pixels; the centre box has 16 px of photo on each side at crop_pct 0.875


@dataclass(frozen=True)
class Ensemble:
    """Copy offsets (whole output pixels, distinct) and the adaptive margin threshold (1.0: always).

    Build one with :meth:`parse` (``"knight5@0.15"``, ``"0,0;2,1;-1,2@0.1"``, or a mapping with
    ``offsets`` and ``threshold``); the constructor validates too.
    """

    offsets: tuple[tuple[int, int], ...]
    threshold: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or not 0 < self.threshold <= 1:
            raise InvalidInput(f"ensemble threshold must be a margin in (0, 1] (1: always), got {self.threshold!r}")
        offsets = tuple(_offset(o) for o in self.offsets)
        if len(offsets) < 2:
            raise InvalidInput(f"an ensemble needs at least 2 copies, got {len(offsets)}")
        if len(set(offsets)) != len(offsets):
            raise InvalidInput(f"ensemble offsets must be distinct, got {[list(o) for o in offsets]}")
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "threshold", float(self.threshold))

    # ----------------------------------------------------------------- building
    @classmethod
    def parse(cls, spec: "str | Mapping[str, Any] | Ensemble") -> "Ensemble":
        """``PRESET[@T]``, ``x,y;x,y;...[@T]`` or ``{"offsets": [[x, y], ...], "threshold": T}``.

        Without ``@T`` the copies are averaged for every answer (threshold 1).
        """
        if isinstance(spec, Ensemble):
            return spec
        if isinstance(spec, Mapping):
            # to_dict()'s informational fields (and robustness.json's measured ``compute``) are ignored
            unknown = sorted(set(spec) - {"offsets", "threshold", "name", "extra", "adaptive", "compute"})
            if unknown:
                raise InvalidInput(f"unknown ensemble field(s) {unknown}: use offsets, threshold")
            offsets = spec.get("offsets")
            if not isinstance(offsets, Sequence) or isinstance(offsets, (str, bytes)):
                raise InvalidInput(f"ensemble offsets must be a list of [dx, dy] pairs, got {offsets!r}")
            return cls(tuple(offsets), spec.get("threshold", 1.0))
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidInput(f"ensemble must be PRESET[@THRESHOLD] or x,y;x,y;...[@THRESHOLD], got {spec!r}")
        body, sep, thr = spec.strip().partition("@")
        try:
            threshold = float(thr) if sep else 1.0
        except ValueError:
            raise InvalidInput(f"ensemble {spec!r}: threshold {thr!r} is not a number") from None
        body = body.strip()
        if body in PRESETS:
            return cls(PRESETS[body], threshold)
        if not body or body[0].isalpha():
            raise InvalidInput(f"unknown ensemble preset {body!r}: use one of {sorted(PRESETS)} or x,y;x,y;...")
        pairs = []
        for part in body.split(";"):
            xy = part.split(",")
            if len(xy) != 2:
                raise InvalidInput(f"ensemble {spec!r}: offset {part!r} is not x,y")
            try:
                pairs.append((_whole(xy[0]), _whole(xy[1])))
            except ValueError:
                raise InvalidInput(f"ensemble {spec!r}: offset {part!r} is not two whole pixel counts") from None
        return cls(tuple(pairs), threshold)

    # ----------------------------------------------------------------- properties
    @property
    def adaptive(self) -> bool:
        return self.threshold < 1.0

    @property
    def includes_bare(self) -> bool:
        return (0, 0) in self.offsets

    @property
    def extra_offsets(self) -> tuple[tuple[int, int], ...]:
        """The copies other than the bare view, in order (what is run after the bare view)."""
        return tuple(o for o in self.offsets if o != (0, 0))

    @property
    def extra(self) -> int:
        """Inferences beyond the bare view when the ensemble answers."""
        return len(self.extra_offsets)

    @property
    def preset(self) -> str | None:
        """The preset with exactly these offsets, if any."""
        return next((name for name, offs in PRESETS.items() if offs == self.offsets), None)

    @property
    def name(self) -> str:
        body = self.preset or ";".join(f"{x},{y}" for x, y in self.offsets)
        return body if not self.adaptive else f"{body}@{self.threshold:g}"

    def cost(self, used: bool) -> int:
        """Model evaluations for one answer: what the service runs (always mode runs only the copies)."""
        if not self.adaptive:
            return len(self.offsets)
        return 1 + (self.extra if used else 0)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "offsets": [list(o) for o in self.offsets], "threshold": self.threshold,
                "adaptive": self.adaptive, "extra": self.extra}

    # ----------------------------------------------------------------- answering
    def used(self, bare_probs: np.ndarray) -> bool:
        """Whether this answer averages the copies: always, or when the bare margin is under the threshold."""
        return not self.adaptive or float(margin(bare_probs)) < self.threshold

    def combine(self, bare_probs: np.ndarray, extra_probs: Sequence[np.ndarray]) -> np.ndarray:
        """The mean softmax of the copies, in offset order (``bare_probs`` stands for the (0, 0) copy)."""
        if len(extra_probs) != self.extra:
            raise ValueError(f"{self.name} has {self.extra} extra copies, got {len(extra_probs)} rows")
        rows = iter(extra_probs)
        stacked = np.stack([bare_probs if o == (0, 0) else next(rows) for o in self.offsets])
        return stacked.mean(axis=0)

    # ----------------------------------------------------------------- honesty
    def lines_up(self, step: tuple[int, int]) -> str | None:
        """Why this ensemble would flatter a protocol comparing views ``step`` output pixels apart, or None."""
        sx, sy = step
        for a in self.offsets:
            for b in self.offsets:
                if (a[0] - b[0], a[1] - b[1]) == (sx, sy):
                    return (f"copies {list(a)} and {list(b)} differ by the step {list(step)}: "
                            "neighbouring views would share a copy")
        if self.adaptive:
            for o in ((sx, sy), (-sx, -sy)):
                if o in self.offsets:
                    return (f"copy {list(o)} is the step {list(step)} itself: in adaptive mode one neighbour's "
                            "bare answer would be a copy of the other's ensemble")
        return None


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability along the last axis."""
    p = np.asarray(probs)
    if p.shape[-1] < 2:
        return np.ones(p.shape[:-1])
    part = np.partition(p, -2, axis=-1)
    return part[..., -1] - part[..., -2]


def as_logits(probs: np.ndarray) -> np.ndarray:
    """``log(p)`` as float32, floored at float32's smallest normal (finite, so JSON can carry it)."""
    tiny = np.finfo(np.float32).tiny
    return np.log(np.maximum(np.asarray(probs, dtype=np.float32), tiny)).astype(np.float32)


def _whole(text: str) -> int:
    value = float(text.strip())
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def _offset(o: Any) -> tuple[int, int]:
    if isinstance(o, (str, bytes)) or not isinstance(o, Sequence) or len(o) != 2:
        raise InvalidInput(f"ensemble offset {o!r} is not a pair [dx, dy] of whole output pixels")
    out = []
    for v in o:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer)) or not float(v).is_integer():
            raise InvalidInput(f"ensemble offset {list(o)!r} must be whole output pixels")
        out.append(int(v))
    if max(abs(out[0]), abs(out[1])) > MAX_OFFSET:
        raise InvalidInput(f"ensemble offset {out} is over {MAX_OFFSET} output pixels")
    return out[0], out[1]
