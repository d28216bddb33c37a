"""The protocols: which views of one image to evaluate, and how to reduce their predictions.

Every view is a :class:`~service.core.boxes.Box` resampled by
:func:`service.core.boxes.render` (the one preprocessing implementation), either of the
decoded photo or of an embed canvas. Shifts are whole *output* pixels of the view
(``shift_box``); zooms use ``zoom_box``.

How each policy meets a transformed input ("the camera moved"):

- ``center``: the centre box shifted / zoomed (exactly the crop windows of Azulay & Weiss,
  ImageNet-P and Zhang 2019).
- ``object``: the localiser is run again on the *transformed frame* (the whole photo moved by
  the same output pixels, or zoomed about its centre), so the measurement covers the whole
  policy, localiser included, not just the model at a fixed framing.

Pan moves the view in three directions: diagonal pairs (Azulay & Weiss), the horizontal ImageNet-P
translate sequence, and vertical pairs (``PAN_STEPS``).

Shift ensembles (:mod:`service.core.ensemble`) are measured as *variants* of each policy through the
same path: every answer view of the pan and scale protocols (and the base view) is answered as the
service would answer it, the bare view first and, where its margin is under the threshold, the mean
softmax of its copies (the policy's box moved by whole output pixels). The copies are a *second
stage* of views (:attr:`ImagePlan.followups`): only the copies of unsure views are rendered and
evaluated, each distinct box once, and a copy that coincides with a protocol view reuses its row.
A setting whose copies line up with a pan step is refused (``Ensemble.lines_up``).

Zoom: ``z`` magnifies the content of the policy's view about its centre (``zoom_box``): z = 0.4
shows 2.5x the side (content beyond the photo is the model's mean colour, as in ImageNet-P's
zoom-out frames), z = 1 is the served view, z = 1.15 crops in. The ImageNet-P scale sequence is
0.40 -> 1.15 in 0.025 steps (31 frames); the +-5% pairs are (1.0, 0.95) and (1.0, 1.05).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from service.core.card import ModelCard
from service.core.ensemble import Ensemble
from service.core.localize import object_box
from service.core.boxes import Box, Renderer, center_box, render, shift_box, zoom_box

__all__ = ["PROTOCOLS", "POLICIES", "PAN_STEPS", "DEFAULT_ENSEMBLES", "ProtocolConfig", "ViewSpec", "ImagePlan",
           "plan_image", "remedy_name"]

PROTOCOLS = ("pan", "scale", "embed", "consistency", "resolution")
POLICIES = ("center", "object")
PAN_STEPS: dict[str, tuple[int, int]] = {"diagonal": (1, 1), "horizontal": (1, 0), "vertical": (0, 1)}
# the adaptive knight-move ensemble at three margins (README, "Make answers steadier")
DEFAULT_ENSEMBLES = ("knight5@0.1", "knight5@0.15", "knight5@0.2")


def remedy_name(policy: str, ensemble: Ensemble) -> str:
    """The name of a policy's ensemble variant in records and robustness.json: ``center+knight5@0.15``."""
    return f"{policy}+{ensemble.name}"


@dataclass(frozen=True)
class ProtocolConfig:
    """Protocol sizes (defaults keep 200 images x all protocols within a few minutes on 2 cores)."""

    protocols: tuple[str, ...] = PROTOCOLS
    policies: tuple[str, ...] = POLICIES
    pan_offsets: tuple[int, ...] = (-4, -3, -2, -1, 0, 1, 2, 3)  # A&W: pairs (o, o) vs (o+1, o+1)
    translate_frames: int = 9          # ImageNet-P uses 41 (-20..+20); frames centred on 0
    zoom_start: float = 0.40
    zoom_stop: float = 1.15
    zoom_step: float = 0.025
    embed_sizes: tuple[float, ...] = (0.4, 0.5, 0.7, 1.0)
    embed_positions: int = 2           # seeded random positions per size, each with a +1 px diagonal pair
    consistency_pairs: int = 1         # Zhang 2019 draws one pair per image per epoch
    consistency_range: int = 32        # offsets uniform in [0, 32) px
    resolution_factors: tuple[float, ...] = (0.875, 1.0, 1.15, 1.3, 1.5)
    ensembles: tuple[str, ...] = DEFAULT_ENSEMBLES  # ensemble variants of every policy (empty: none)

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ValueError(f"unknown protocols {bad}: use some of {', '.join(PROTOCOLS)}")
        bad = [p for p in self.policies if p not in POLICIES]
        if bad or not self.policies:
            raise ValueError(f"unknown policies {bad}: use some of {', '.join(POLICIES)}")
        if self.translate_frames < 2:
            raise ValueError(f"translate_frames must be >= 2, got {self.translate_frames}")
        if not 0 < self.zoom_start < self.zoom_stop or self.zoom_step <= 0:
            raise ValueError("zoom sequence needs 0 < start < stop and step > 0")
        if not (self.zoom_start <= 0.95 and self.zoom_stop >= 1.05):
            raise ValueError("the zoom sequence must include 0.95 and 1.05 (the +-5% pairs)")
        if self.embed_positions < 1 or self.consistency_pairs < 1:
            raise ValueError("embed_positions and consistency_pairs must be >= 1")
        if any(not 0 < s <= 1 for s in self.embed_sizes):
            raise ValueError(f"embed sizes must be in (0, 1], got {self.embed_sizes}")
        names = [e.name for e in self.ensemble_settings]  # parses and validates
        if len(set(names)) != len(names):
            raise ValueError(f"ensembles are listed twice: {names}")
        for ens in self.ensemble_settings:
            for direction, step in PAN_STEPS.items():
                why = ens.lines_up(step)
                if why:
                    raise ValueError(f"ensemble {ens.name} is refused: its offsets line up with the {direction} pan "
                                     f"step ({why}), so its flips would be measured flattered")

    @property
    def ensemble_settings(self) -> tuple[Ensemble, ...]:
        return tuple(Ensemble.parse(spec) for spec in self.ensembles)

    @property
    def zooms(self) -> tuple[float, ...]:
        n = int(round((self.zoom_stop - self.zoom_start) / self.zoom_step)) + 1
        return tuple(round(self.zoom_start + i * self.zoom_step, 6) for i in range(n))

    @property
    def translate_offsets(self) -> tuple[int, ...]:
        start = -(self.translate_frames // 2)
        return tuple(range(start, start + self.translate_frames))

    def resolutions(self, card: ModelCard) -> tuple[int, ...]:
        return tuple(sorted({int(round(card.train_resolution * f)) for f in self.resolution_factors}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocols": list(self.protocols), "policies": list(self.policies),
            "pan_offsets": list(self.pan_offsets), "translate_frames": self.translate_frames,
            "zooms": list(self.zooms), "embed_sizes": list(self.embed_sizes),
            "embed_positions": self.embed_positions, "consistency_pairs": self.consistency_pairs,
            "consistency_range": self.consistency_range, "resolution_factors": list(self.resolution_factors),
            "pan_steps": {k: list(v) for k, v in PAN_STEPS.items()},
            "ensembles": [e.to_dict() for e in self.ensemble_settings],
        }


@dataclass
class ViewSpec:
    """One model input: a box of an image, rendered at a resolution (through ``renderer`` when set: the
    same pixels as :func:`render`, sharing work between the views of one photo)."""

    image: Image.Image
    box: Box
    resolution: int
    renderer: Renderer | None = None

    def pixels(self, interpolation: str, background: tuple[float, ...]) -> np.ndarray:
        if self.renderer is not None:
            return self.renderer.render(self.box, self.resolution, interpolation)
        return render(self.image, self.box, self.resolution, interpolation, background)


Reducer = Callable[[dict[Any, np.ndarray]], dict[str, Any]]


@dataclass
class ImagePlan:
    """All views of one image (deduplicated by key) and how to turn their softmax rows into a record.

    ``followups`` map the first stage's softmax rows to more views (the ensemble copies of unsure
    views; keys already evaluated are reused); ``remedy_reducers`` fill the record's ``remedies``.
    """

    views: dict[Any, ViewSpec] = field(default_factory=dict)
    reducers: list[Reducer] = field(default_factory=list)
    followups: list[Callable[[dict[Any, np.ndarray]], dict[Any, ViewSpec]]] = field(default_factory=list)
    remedy_reducers: list[Reducer] = field(default_factory=list)

    share: bool = True  # False: every view is its own evaluation (the unshared reference path)
    identity: dict[Any, Any] = field(default_factory=dict)  # unshared key -> the view it stands for

    def add(self, key: Any, spec: ViewSpec) -> Any:
        if not self.share:
            unique = ("unshared", len(self.views), key)
            self.identity[unique] = key
            key = unique
        self.views.setdefault(key, spec)
        return key

    def same_view(self, keys: list[Any]) -> list[Any]:
        """``keys`` without repeats of one view (a view asked for twice is one answer)."""
        seen: dict[Any, Any] = {}
        for k in keys:
            seen.setdefault(self.identity.get(k, k), k)
        return list(seen.values())


def _r(box: Box) -> tuple[float, ...]:
    return tuple(round(v, 4) for v in (box.x0, box.y0, box.x1, box.y1))


def plan_image(
    img: Image.Image, card: ModelCard, cfg: ProtocolConfig, label: int | None, rng: np.random.Generator,
    *, share: bool = True,
) -> ImagePlan:
    """Views and reducers for one decoded image under every configured protocol and policy.

    The reducers fill a record ``{policy: {metric_key: [sum, count]}, "curves": ..., "flips": ...}``.
    Views are keyed by what the model sees (the image or embed canvas, the box, the resolution), so
    a view that several protocols or both policies ask for (the ``object`` policy falls back to the
    centre box on most natural photos) is evaluated once. ``share=False`` evaluates every request
    on its own: the unoptimised reference, which gives the same records.
    """
    from robustness import measures

    plan = ImagePlan(share=share)
    R = card.resolution
    crop = card.crop_pct
    bgc = tuple(card.mean)
    interp = card.interpolation
    w, h = img.size
    cbox = center_box(w, h, R, crop)
    cpx = cbox.width / R  # image pixels per output pixel of the served centre view
    obj_cache: dict[Any, Box] = {}
    renderer = Renderer(img, bgc) if share else None

    def policy_box(policy: str, dx: float = 0.0, dy: float = 0.0, zoom: float = 1.0, res: int = R) -> Box:
        """The policy's box when the input moved by (dx, dy) output pixels at ``res`` and zoomed."""
        centre = zoom_box(shift_box(cbox, dx, dy, res), zoom) if zoom != 1.0 else shift_box(cbox, dx, dy, res)
        if policy == "center":
            return centre
        key = (round(dx * R / res, 6), round(dy * R / res, 6), zoom)
        if key not in obj_cache:
            frame = Box(key[0] * cpx, key[1] * cpx, w + key[0] * cpx, h + key[1] * cpx)
            if zoom != 1.0:
                frame = zoom_box(frame, zoom)
            # nothing re-framed: exactly the centre policy's box of the same frame (one view for both)
            obj_cache[key] = object_box(img, crop_pct=crop, background=bgc, frame=frame, resolution=R,
                                        fallback=centre, renderer=renderer)
        return obj_cache[key]

    def view(policy: str, tag: str, dx: float = 0.0, dy: float = 0.0, zoom: float = 1.0, res: int = R) -> Any:
        box = policy_box(policy, dx, dy, zoom, res)
        return plan.add(("photo", _r(box), res), ViewSpec(img, box, res, renderer))

    policies = cfg.policies
    labels = None if label is None else np.asarray([label])

    # ---- base views and accuracy (always)
    base = {p: view(p, "base") for p in policies}

    def reduce_base(probs: dict[Any, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in policies:
            row = probs[base[p]][None]
            out[p] = {"top1_class": int(np.argmax(row[0]))}
            if labels is not None:
                out[p]["accuracy.top1"] = list(measures.top_k_hits(row, labels, 1))
                out[p]["accuracy.top5"] = list(measures.top_k_hits(row, labels, 5))
        return out

    plan.reducers.append(reduce_base)

    answers: dict[str, dict[str, Any]] = {p: {"base": base[p]} for p in policies}  # what ensembles answer
    if "pan" in cfg.protocols:
        offs = sorted(set(cfg.pan_offsets) | {o + 1 for o in cfg.pan_offsets})
        diag = {p: {o: view(p, "pan", o, o) for o in offs} for p in policies}
        trans = {p: [view(p, "tr", d, 0) for d in cfg.translate_offsets] for p in policies}
        vert = {p: {o: view(p, "vert", 0, o) for o in offs} for p in policies}
        for p in policies:
            answers[p].update(diag=diag[p], trans=trans[p], vert=vert[p])

        def reduce_pan(probs: dict[Any, np.ndarray]) -> dict[str, Any]:
            return {p: _pan_metrics(probs.__getitem__, diag[p], trans[p], vert[p], cfg.pan_offsets) for p in policies}

        plan.reducers.append(reduce_pan)

    if "scale" in cfg.protocols:
        zooms = cfg.zooms
        zviews = {p: [view(p, "zoom", zoom=z) for z in zooms] for p in policies}
        i100 = zooms.index(1.0) if 1.0 in zooms else int(np.argmin([abs(z - 1) for z in zooms]))
        i95 = int(np.argmin([abs(z - 0.95) for z in zooms]))
        i105 = int(np.argmin([abs(z - 1.05) for z in zooms]))

        for p in policies:  # ensembles answer the +-5% pairs (far zooms are unsure, costly, and not served)
            answers[p].update(zoom_pairs=[zviews[p][i] for i in (i100, i95, i105)])

        def reduce_scale(probs: dict[Any, np.ndarray]) -> dict[str, Any]:
            return {p: _scale_metrics(probs.__getitem__, zviews[p], (i100, i95, i105)) for p in policies}

        plan.reducers.append(reduce_scale)

    if "embed" in cfg.protocols:
        C = int(round(R / crop))
        w0 = (C - R) // 2
        obj = Image.fromarray(render(img, cbox, R, interp, bgc))  # the object: the centre-policy view
        fill = tuple(int(round(v)) for v in bgc)
        ccan = center_box(C, C, R, crop)
        emb: dict[str, dict[float, list[tuple[Any, Any]]]] = {p: {} for p in policies}
        canvases: dict[tuple[int, int, int], tuple[Image.Image, dict[str, Box]]] = {}
        for size in cfg.embed_sizes:
            S = max(1, int(round(size * R)))
            small = Image.fromarray(render(obj, Box(0, 0, R, R), S, interp, bgc)) if S != R else obj
            slack = max(R - S - 1, 0)
            for j in range(cfg.embed_positions):
                x, y = (int(v) for v in rng.integers(0, slack + 1, size=2))
                for p in policies:
                    keys = []
                    for k in range(2):
                        # a canvas is its pasted position: positions drawn twice (size 1.0 has no slack) share it
                        at = (S, w0 + x + k, w0 + y + k)
                        if at not in canvases or not share:
                            canvas = Image.new("RGB", (C, C), fill)
                            canvas.paste(small, at[1:])
                            canvases[at] = (canvas, {})
                        canvas, boxes = canvases[at]
                        if p not in boxes:
                            boxes[p] = ccan if p == "center" else object_box(
                                canvas, crop_pct=crop, background=bgc, resolution=R)
                        keys.append(plan.add(("embed", at, _r(boxes[p])), ViewSpec(canvas, boxes[p], R)))
                    emb[p].setdefault(size, []).append((keys[0], keys[1]))

        def reduce_embed(probs: dict[Any, np.ndarray]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for p in policies:
                rec: dict[str, Any] = {}
                for size, pairs in emb[p].items():
                    a = np.stack([probs[k0] for k0, _ in pairs])
                    b = np.stack([probs[k1] for _, k1 in pairs])
                    rec[f"embed@{size:g}.p_change"] = list(measures.p_change(a.argmax(1), b.argmax(1)))
                    if labels is not None:
                        rec[f"embed@{size:g}.accuracy"] = list(
                            measures.top_k_hits(np.concatenate([a, b]), np.repeat(labels, 2 * len(a)), 1))
                out[p] = rec
            return out

        plan.reducers.append(reduce_embed)

    if "consistency" in cfg.protocols:
        half = cfg.consistency_range / 2.0
        cons: dict[str, list[tuple[Any, Any]]] = {p: [] for p in policies}
        for j in range(cfg.consistency_pairs):
            o = rng.integers(0, cfg.consistency_range, size=4)
            for p in policies:
                k1 = view(p, "cons", o[0] - half, o[1] - half)
                k2 = view(p, "cons", o[2] - half, o[3] - half)
                cons[p].append((k1, k2))

        def reduce_cons(probs: dict[Any, np.ndarray]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for p in policies:
                a = [int(np.argmax(probs[k1])) for k1, _ in cons[p]]
                b = [int(np.argmax(probs[k2])) for _, k2 in cons[p]]
                out[p] = {"consistency": list(measures.consistency(a, b))}
            return out

        plan.reducers.append(reduce_cons)

    if "resolution" in cfg.protocols:
        resolutions = cfg.resolutions(card)
        rviews = {p: {r: (view(p, "res", res=r), view(p, "res", 1, 1, res=r)) for r in resolutions}
                  for p in policies}

        def reduce_res(probs: dict[Any, np.ndarray]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for p in policies:
                rec: dict[str, Any] = {}
                for r, (k0, k1) in rviews[p].items():
                    a, b = probs[k0][None], probs[k1][None]
                    rec[f"resolution@{r}.p_change"] = list(measures.p_change(a.argmax(1), b.argmax(1)))
                    if labels is not None:
                        rec[f"resolution@{r}.accuracy"] = list(measures.top_k_hits(a, labels, 1))
                        rec[f"resolution@{r}.top5"] = list(measures.top_k_hits(a, labels, 5))
                out[p] = rec
            return out

        plan.reducers.append(reduce_res)
    if cfg.ensemble_settings:
        _plan_ensembles(plan, cfg, answers, labels)
    return plan


# ------------------------------------------------------------------ metrics of one image's answers
Probs = Callable[[Any], np.ndarray]


def _pan_metrics(get: Probs, diag: dict[int, Any], trans: list[Any], vert: dict[int, Any],
                 pan_offsets: tuple[int, ...]) -> dict[str, Any]:
    """Pan record of one policy (or variant): ``get(key)`` is the answer's probability row at a view."""
    from robustness import measures

    a = np.stack([get(diag[o]) for o in pan_offsets])
    b = np.stack([get(diag[o + 1]) for o in pan_offsets])
    va = np.array([int(np.argmax(get(vert[o]))) for o in pan_offsets])
    vb = np.array([int(np.argmax(get(vert[o + 1]))) for o in pan_offsets])
    seq = np.array([int(np.argmax(get(k))) for k in trans])
    flips = measures.flips_along(seq)
    return {
        "pan.p_change": list(measures.p_change(a.argmax(1), b.argmax(1))),
        "pan.mac": list(measures.mac(a, b)),
        "pan.flip_probability": list(measures.flip_probability(seq)),
        "pan.p_change_vertical": list(measures.p_change(va, vb)),
        "curve.translate": flips.tolist(),
        "flips": int(flips.sum() + (a.argmax(1) != b.argmax(1)).sum() + (va != vb).sum()),
    }


def _scale_metrics(get: Probs, zviews: list[Any], index: tuple[int, int, int]) -> dict[str, Any]:
    """Scale record of one policy (or variant) over the zoom sequence; ``index`` = (1.0, 0.95, 1.05) frames."""
    from robustness import measures

    i100, i95, i105 = index
    seq = np.array([int(np.argmax(get(k))) for k in zviews])
    flips = measures.flips_along(seq)
    return {
        "scale.p_change": list(measures.p_change(seq[[i100, i100]], seq[[i95, i105]])),
        "scale.flip_probability": list(measures.flip_probability(seq)),
        "curve.zoom": flips.tolist(),
        "flips": int(flips.sum()),
    }


def _plan_ensembles(plan: ImagePlan, cfg: ProtocolConfig, answers: dict[str, dict[str, Any]],
                    labels: np.ndarray | None) -> None:
    """Every policy's ensemble variants: the copies of unsure answer views (second stage) and their records.

    An answer view is the base view, a view of the pan protocol, or a frame of the scale protocol's +-5%
    pairs (the 0.40 -> 1.15 zoom sequence is not answered: its far zooms leave the model unsure on most
    frames, so their copies would cost several times the pan protocol's, for framings the service does
    not see; ``scale.flip_probability`` is the bare policy's). Its copies are its box
    moved by the ensemble's offsets (:func:`shift_box`, whole output pixels at the view's
    resolution), keyed like every photo view, so a copy that is also a protocol view (or another
    setting's copy) is evaluated once.
    """
    from robustness import measures

    ensembles = cfg.ensemble_settings
    keys = {p: _answer_keys(a) for p, a in answers.items()}
    distinct = list(dict.fromkeys(k for p in keys for k in keys[p]))
    copy_keys: dict[tuple[Any, tuple[int, int]], Any] = {}
    copy_specs: dict[Any, ViewSpec] = {}
    for k in distinct:
        spec = plan.views[k]
        for off in dict.fromkeys(o for e in ensembles for o in e.extra_offsets):
            box = shift_box(spec.box, off[0], off[1], spec.resolution)
            ck = ("photo", _r(box), spec.resolution) if plan.share else ("unshared copy", k, off)
            copy_keys[(k, off)] = ck
            copy_specs.setdefault(ck, ViewSpec(spec.image, box, spec.resolution, spec.renderer))

    def followup(probs: dict[Any, np.ndarray]) -> dict[Any, ViewSpec]:
        need: dict[Any, ViewSpec] = {}
        for k in distinct:
            for e in ensembles:
                if e.used(probs[k]):
                    for off in e.extra_offsets:
                        ck = copy_keys[(k, off)]
                        if ck not in probs:
                            need[ck] = copy_specs[ck]
        return need

    def reduce_remedies(probs: dict[Any, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for e in ensembles:
            answer: dict[Any, np.ndarray] = {}
            used: dict[Any, bool] = {}
            for k in distinct:
                used[k] = e.used(probs[k])
                answer[k] = (e.combine(probs[k], [probs[copy_keys[(k, o)]] for o in e.extra_offsets])
                             if used[k] else probs[k])
            for p, a in answers.items():
                mine = plan.same_view(keys[p])  # counted per view the policy answers
                rec: dict[str, Any] = {
                    "compute": [float(sum(e.cost(used[k]) for k in mine)), len(mine)],
                    "used": [float(sum(used[k] for k in mine)), len(mine)],
                    "top1_class": int(np.argmax(answer[a["base"]])),
                }
                if labels is not None:
                    row = answer[a["base"]][None]
                    rec["accuracy.top1"] = list(measures.top_k_hits(row, labels, 1))
                    rec["accuracy.top5"] = list(measures.top_k_hits(row, labels, 5))
                    label = int(labels[0])
                    bare_ok = np.array([int(np.argmax(probs[k])) == label for k in mine])
                    ens_ok = np.array([int(np.argmax(answer[k])) == label for k in mine])
                    b0 = mine.index(a["base"])
                    rec["fixed.top1"] = [float(ens_ok[b0] and not bare_ok[b0]), 1]
                    rec["broken.top1"] = [float(bare_ok[b0] and not ens_ok[b0]), 1]
                    rec["fixed.views"] = [float((ens_ok & ~bare_ok).sum()), len(mine)]
                    rec["broken.views"] = [float((bare_ok & ~ens_ok).sum()), len(mine)]
                flips = 0
                if "diag" in a:
                    pan = _pan_metrics(answer.__getitem__, a["diag"], a["trans"], a["vert"], cfg.pan_offsets)
                    flips += pan.pop("flips")
                    rec.update(pan)
                if "zoom_pairs" in a:
                    z100, z95, z105 = (int(np.argmax(answer[k])) for k in a["zoom_pairs"])
                    rec["scale.p_change"] = list(measures.p_change([z100, z100], [z95, z105]))
                    flips += int(z95 != z100) + int(z105 != z100)
                rec["flips"] = flips
                out[remedy_name(p, e)] = rec
        return out

    plan.followups.append(followup)
    plan.remedy_reducers.append(reduce_remedies)


def _answer_keys(a: dict[str, Any]) -> list[Any]:
    """The distinct view keys a policy answers in the base, pan and scale protocols (in a fixed order)."""
    ks = [a["base"]]
    if "diag" in a:
        ks += list(a["diag"].values()) + list(a["trans"]) + list(a["vert"].values())
    if "zoom_pairs" in a:
        ks += list(a["zoom_pairs"])
    return list(dict.fromkeys(ks))
