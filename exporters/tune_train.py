"""The training loops of ``steady tune`` (torch): FixRes and shift consistency on a pool of views.

Every photo gets a fixed, seeded pool of views (:mod:`exporters.tune_views`); the teacher's answers
on them (the source version's ONNX model) are computed once. When the early layers are frozen and
the module is a timm ``EfficientNet`` (EfficientNet-Lite among them), the frozen part's output on
every pool view is computed once too, and each step runs only the layers being tuned: on two CPU
cores that is what makes hundreds of steps fit in minutes.

- ``fixres``: re-estimate every batch-norm statistic on the pool at the tuning resolution, then
  fine-tune the classifier and the last batch norm (cross-entropy with labels, else KL to the
  source's answer on the same box at the source's resolution).
- ``consistency``: ``ensemble`` = KL(adaptive ensemble || student) on every view; ``js`` = KL(source
  || student) on the policy's own view + ``js_weight`` x AugMix's Jensen-Shannon divergence between
  that view and the others; ``ensemble+js`` = both. Batch-norm statistics stay frozen.

Deterministic for a seed on one device: ``torch.manual_seed``, a seeded NumPy generator for
views and batches, deterministic algorithms.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from service.core.card import TUNE_METHODS, ModelCard
from service.core.errors import ExportError

from exporters.tune_views import (ENSEMBLE_OFFSETS, Teacher, TunePhotos, ViewSpec, ensemble_answers, random_views,
                                  teacher_answers)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["CONSISTENCY_LOSSES", "DEVICES", "TuneConfig", "TuneRun", "resolve_device", "train"]

CONSISTENCY_LOSSES = ("ensemble", "js", "ensemble+js")
DEVICES = ("auto", "cpu", "cuda")
_DEFAULT_STEPS = {"fixres": 300, "consistency": 200}
_DEFAULT_BATCH = {"fixres": 16, "consistency": 8}
_DEFAULT_LR = {"fixres": 1e-3, "consistency": 1e-4}


@dataclass(frozen=True)
class TuneConfig:
    """How to tune: the method, the budget, and the method's recipe.

    ``None`` means the method's default (fixres 300 steps of 16 photos, consistency 200 of 8; SGD
    learning rate 1e-3 for fixres' head, 1e-4
    for consistency, times ``late_lr_mult`` for the late layers; resolution: fixres from the
    source's FixRes sweep, consistency the card's). Shifts are in output pixels; zooms are
    log-uniform in [1/max_zoom, max_zoom]. ``threads`` 0 keeps torch's default.
    """

    method: str = "consistency"
    resolution: int | None = None
    steps: int | None = None
    batch_size: int | None = None  # photos per step
    lr: float | None = None
    seed: int = 0
    split_seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads for torch and the ONNX Runtime teacher (0: their defaults)
    pool_views: int = 8  # per photo, the first the policy's own
    # consistency recipe
    loss: str = "ensemble"
    views: int = 3  # per photo per step
    max_shift: float = 8.0
    max_zoom: float = 1.1
    late_fraction: float = 0.35  # of the parameter tensors, deepest first
    late_lr_mult: float = 10.0
    early_lr_mult: float = 0.0  # 0 freezes the early layers
    js_weight: float = 12.0  # AugMix's lambda
    ensemble_margin: float = 0.15  # >= 1 averages every view
    # fixres recipe
    fixres_shift: float = 4.0
    fixres_zoom: float = 1.05

    def __post_init__(self) -> None:
        checks = [
            (self.method in TUNE_METHODS, f"method must be one of {TUNE_METHODS}, got {self.method!r}"),
            (self.loss in CONSISTENCY_LOSSES, f"loss must be one of {CONSISTENCY_LOSSES}, got {self.loss!r}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.resolution is None or self.resolution >= 8, f"resolution must be >= 8, got {self.resolution}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.pool_views >= 2, f"pool_views must be >= 2, got {self.pool_views}"),
            (self.method == "fixres" or 1 <= self.views <= self.pool_views,
             f"views must be in [1, pool_views={self.pool_views}], got {self.views}"),
            (self.views >= 2 or self.loss == "ensemble", "a js loss needs views >= 2"),
            (self.max_shift >= 0 and self.fixres_shift >= 0, "shifts must be >= 0"),
            (self.max_zoom >= 1 and self.fixres_zoom >= 1, "max_zoom and fixres_zoom must be >= 1"),
            (0 < self.late_fraction <= 1, f"late_fraction must be in (0, 1], got {self.late_fraction}"),
            (self.late_lr_mult > 0 and self.early_lr_mult >= 0, "late_lr_mult must be > 0, early_lr_mult >= 0"),
            (self.js_weight >= 0, f"js_weight must be >= 0, got {self.js_weight}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else _DEFAULT_STEPS[self.method]

    @property
    def photos_per_step(self) -> int:
        return self.batch_size if self.batch_size is not None else _DEFAULT_BATCH[self.method]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.method]

    def recipe(self) -> dict[str, Any]:
        """The method's own settings, for the card's tune record."""
        data = asdict(self)
        keys = (("pool_views", "loss", "views", "max_shift", "max_zoom", "late_fraction", "late_lr_mult",
                 "early_lr_mult", "js_weight", "ensemble_margin", "threads") if self.method == "consistency"
                else ("pool_views", "fixres_shift", "fixres_zoom", "threads"))
        out = {k: data[k] for k in keys}
        if self.method == "consistency" and self.loss != "js":
            out["ensemble_offsets"] = [list(o) for o in ENSEMBLE_OFFSETS]
        return out


@dataclass
class TuneRun:
    """What one training run did: per-step losses, wall time, device, resolution, and notes."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    resolution: int = 0
    labelled: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    def loss_window(self, last: bool) -> float:
        """Mean loss over the first (or last) tenth of the steps (at least one step)."""
        n = max(1, len(self.losses) // 10)
        window = self.losses[-n:] if last else self.losses[:n]
        return float(np.mean(window)) if window else float("nan")


# ----------------------------------------------------------------------------- determinism, devices
def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is refused."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: torch sees no CUDA device (use --device cpu or auto)")
    return name


@contextlib.contextmanager
def _deterministic(seed: int, device: str, threads: int = 0) -> Iterator[None]:
    """Seed torch, switch on deterministic algorithms and set the thread count for the run; restore
    the global settings after."""
    import torch

    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_num_threads())
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    # warn_only: an op without a deterministic kernel (some CUDA backward passes) warns instead of failing
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]
        torch.set_num_threads(previous[4])


# ----------------------------------------------------------------------------- module anatomy
def _batch_norms(module: "nn.Module") -> list["nn.Module"]:
    from torch import nn

    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _head_params(module: "nn.Module") -> list["nn.Parameter"]:
    """The classifier (timm's ``get_classifier``, else the last Linear/Conv2d) and the last batch norm."""
    from torch import nn

    head = module.get_classifier() if hasattr(module, "get_classifier") else None
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not layers:
            raise ExportError("fixres needs a classifier layer (nn.Linear or nn.Conv2d) in the module")
        head = layers[-1]
    params = list(head.parameters())
    norms = _batch_norms(module)
    if norms:
        params += [p for p in norms[-1].parameters() if all(p is not q for q in params)]
    return params


def _set_trainable(module: "nn.Module", config: TuneConfig) -> list[dict[str, Any]]:
    """Mark what learns and return the optimiser's parameter groups.

    fixres: the head only. consistency: parameters by depth (registration order), the last
    ``late_fraction`` at lr * late_lr_mult, the others at lr * early_lr_mult (0 freezes them).
    """
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(False)
    if config.method == "fixres":
        head = _head_params(module)
        for p in head:
            p.requires_grad_(True)
        return [{"params": head, "lr": config.learning_rate}]
    cut = len(params) - max(1, int(round(config.late_fraction * len(params))))
    groups = []
    for chunk, mult in ((params[:cut], config.early_lr_mult), (params[cut:], config.late_lr_mult)):
        if chunk and mult > 0:
            for p in chunk:
                p.requires_grad_(True)
            groups.append({"params": chunk, "lr": config.learning_rate * mult})
    return groups


def _cut(module: "nn.Module") -> int | None:
    """For a timm EfficientNet whose stem is frozen: the first block with a trainable parameter
    (everything before it can be computed once); None for any other module."""
    try:
        from timm.models.efficientnet import EfficientNet
    except ImportError:  # pragma: no cover - timm comes with the export extra
        return None
    if not isinstance(module, EfficientNet):
        return None
    if any(p.requires_grad for m in (module.conv_stem, module.bn1) for p in m.parameters()):
        return None
    for i, block in enumerate(module.blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(module.blocks)


def _prefix(module: "nn.Module", cut: int, x: "torch.Tensor") -> "torch.Tensor":
    x = module.bn1(module.conv_stem(x))
    for block in module.blocks[:cut]:
        x = block(x)
    return x


def _suffix(module: "nn.Module", cut: int, x: "torch.Tensor") -> "torch.Tensor":
    for block in module.blocks[cut:]:
        x = block(x)
    return module.forward_head(module.bn2(module.conv_head(x)))


class _Student:
    """The student's logits on pool views: from the frozen part's cached output where possible,
    else by rendering the views and running the whole module."""

    def __init__(self, module: "nn.Module", photos: TunePhotos, pool: list[list[ViewSpec]], device: str,
                 batch_size: int) -> None:
        import torch

        self.module, self.photos, self.pool, self.device = module, photos, pool, device
        self.cut = _cut(module)
        self.features: torch.Tensor | None = None
        if self.cut is not None:
            flat = [v for views in pool for v in views]
            chunks = []
            with torch.no_grad():
                for i in range(0, len(flat), batch_size):
                    x = torch.from_numpy(photos.render(flat[i:i + batch_size])).to(device)
                    chunks.append(_prefix(module, self.cut, x))
            self.features = torch.cat(chunks)

    def __call__(self, picks: Sequence[tuple[int, int]]) -> "torch.Tensor":
        import torch

        if self.features is not None and self.cut is not None:
            per_photo = len(self.pool[0])
            rows = torch.tensor([p * per_photo + v for p, v in picks], device=self.features.device)
            return _suffix(self.module, self.cut, self.features[rows]).float()
        x = torch.from_numpy(self.photos.render([self.pool[p][v] for p, v in picks])).to(self.device)
        return self.module(x).float()


# ----------------------------------------------------------------------------- losses
def _kl(target: "torch.Tensor", log_student: "torch.Tensor") -> "torch.Tensor":
    """KL(target || student) per row; target as probabilities, student as log-probabilities."""
    import torch

    return (target * (torch.log(target.clamp_min(1e-8)) - log_student)).sum(dim=-1)


def _js(log_probs: "torch.Tensor") -> "torch.Tensor":
    """AugMix's Jensen-Shannon consistency of (photos, views, classes) log-probabilities, per photo:
    the mean over views of KL(p_view || mixture)."""
    probs = log_probs.exp()
    log_mix = probs.mean(dim=1, keepdim=True).clamp(1e-7, 1.0).log()
    return (probs * (log_probs - log_mix)).sum(dim=-1).mean(dim=1)


def _recalibrate(module: "nn.Module", photos: TunePhotos, pool: list[list[ViewSpec]], batch_size: int,
                 device: str) -> int:
    """Replace every batch-norm statistic by its plain average over the pool at the tuning resolution."""
    import torch

    norms = _batch_norms(module)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    # view-major, so that every batch holds different photos: a batch of one photo's views would miss
    # the variance between photos (measured: cross-entropy 2.1 after calibrating on photo-major batches)
    flat = [views[k] for k in range(len(pool[0])) for views in pool]
    with torch.no_grad():
        for i in range(0, len(flat), batch_size):
            module(torch.from_numpy(photos.render(flat[i:i + batch_size])).to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    module.eval()
    return len(flat)


# ----------------------------------------------------------------------------- the loop
def train(module: "nn.Module", card: ModelCard, photos: TunePhotos, teacher: Teacher, config: TuneConfig,
          progress: bool = False) -> TuneRun:
    """Fine-tune ``module`` in place on ``photos`` (rendered at ``photos.resolution``); returns the run.

    ``teacher`` answers for the source version; ``card`` is the source's card (fixres distils from
    the teacher at ``card.resolution``). The module ends in eval mode on the CPU.
    """
    import torch
    from tqdm import tqdm

    device = resolve_device(config.device)
    labelled = config.method == "fixres" and all(label is not None for label in photos.labels)
    run = TuneRun(device=device, resolution=photos.resolution, labelled=labelled)
    t0 = time.perf_counter()
    fixres = config.method == "fixres"
    with _deterministic(config.seed, device, config.threads):
        rng = np.random.default_rng(config.seed)
        shift, zoom = (config.fixres_shift, config.fixres_zoom) if fixres else (config.max_shift, config.max_zoom)
        pool = random_views(rng, range(len(photos)), config.pool_views, shift, zoom)
        flat = [v for views in pool for v in views]
        n_classes = card.num_classes
        targets: torch.Tensor | None = None
        if fixres and not labelled:
            answers = teacher_answers(photos, flat, teacher, card.resolution)
        elif not fixres and config.loss != "js":
            answers, run.notes["ensemble_averaged"] = ensemble_answers(photos, flat, teacher, config.ensemble_margin)
            run.notes["pool_views_total"] = len(flat)
        elif not fixres:
            answers = teacher_answers(photos, [views[0] for views in pool], teacher)
        else:
            answers = None
        if answers is not None:
            targets = torch.from_numpy(answers).to(device).view(len(pool), -1, n_classes)
        module.to(device).eval()
        if fixres:
            run.notes["calibration_views"] = _recalibrate(module, photos, pool, config.photos_per_step, device)
        groups = _set_trainable(module, config)
        student = _Student(module, photos, pool, device, 32)
        run.notes["cached_blocks"] = student.cut
        run.notes["setup_seconds"] = round(time.perf_counter() - t0, 1)
        # SGD, not Adam: at a pretrained optimum Adam moves every weight by ~lr whatever its gradient
        # (measured: the distillation loss rose 20-fold in 20 steps at 1e-4); SGD's step follows the gradient
        optimiser = torch.optim.SGD(groups, momentum=0.9, nesterov=True)
        bases = [g["lr"] for g in groups]
        steps = config.total_steps
        warmup = max(1, steps // 10)
        labels = torch.tensor([-1 if y is None else y for y in photos.labels], device=device)
        bar = tqdm(range(steps), desc=f"tune {config.method}", unit="step", file=sys.stderr, disable=not progress,
                   leave=False)
        for step in bar:
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for g, base in zip(groups, bases):  # linear warm-up, then cosine decay to zero
                g["lr"] = base * scale
            chosen = rng.choice(len(photos), size=min(config.photos_per_step, len(photos)), replace=False)
            loss = _step_loss(student, chosen, rng, targets, labels, config, len(pool[0]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            value = float(loss.detach().cpu())
            if not math.isfinite(value):
                raise ExportError(f"tuning diverged at step {step + 1}: loss {value} (lower --lr)")
            run.losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}")
        bar.close()
        module.eval().cpu()
    run.seconds = time.perf_counter() - t0
    return run


def _step_loss(student: _Student, chosen: np.ndarray, rng: np.random.Generator, targets: "torch.Tensor | None",
               labels: "torch.Tensor", config: TuneConfig, per_photo: int) -> "torch.Tensor":
    import torch

    if config.method == "fixres":
        picks = [(int(p), int(rng.integers(per_photo))) for p in chosen]
        logits = student(picks)
        if targets is None:
            return torch.nn.functional.cross_entropy(logits, labels[torch.as_tensor(chosen, device=labels.device)])
        rows = torch.stack([targets[p, v] for p, v in picks])
        return _kl(rows, torch.log_softmax(logits, dim=1)).mean()
    assert targets is not None
    js = config.loss != "ensemble"
    picks = []
    for p in chosen:  # js: the policy's own view and others; ensemble: any views of the pool
        others = rng.choice(np.arange(1, per_photo), size=config.views - 1, replace=False) if js else \
            rng.choice(per_photo, size=config.views, replace=False)
        picks += [(int(p), int(v)) for v in ([0, *others] if js else others)]
    log_s = torch.log_softmax(student(picks), dim=1).view(len(chosen), config.views, -1)
    loss = torch.zeros((), device=log_s.device)
    if config.loss in ("ensemble", "ensemble+js"):
        rows = torch.stack([targets[p, v] for p, v in picks]).view_as(log_s)
        loss = loss + _kl(rows, log_s).mean()
    if js:
        if config.loss == "js":
            clean = targets[torch.as_tensor(chosen, device=targets.device), 0]
            loss = loss + _kl(clean, log_s[:, 0]).mean()
        loss = loss + config.js_weight * _js(log_s).mean()
    return loss
