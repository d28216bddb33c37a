"""int8 versions through ONNX Runtime's own quantization tooling, calibrated on the user's photos.

A float version (or a fresh fp32 export) becomes a new version whose graph carries static QDQ
int8 (``onnxruntime.quantization.quantize_static``: per-channel int8 weights, activations
calibrated on photos that went through Steady's one preprocessing path). The photos are a folder:

- its images are split by :func:`service.core.images.half_of` (sha256 of the relative path and a
  seed) into a *tune* half (the photos a version may be fitted on) and a *held-out* half;
- the calibration photos are the first ``count`` of the tune half in the seeded
  :func:`~service.core.images.calibration_order`; their count, fingerprint and content digests go
  into the card (:class:`service.core.card.Quantization`), so ``steady score`` can refuse to measure
  the version on them;
- parity is the answer, not the logits: top-1 agreement with the float source on the parity photos
  (scikit-image's photos at three resolutions and held-out photos of the folder at the native
  one) and the largest logit difference, both recorded; below ``min_agreement`` the export fails.

Whether the int8 version is as steady and as accurate as the float one is for the gate to say:
score both on the held-out half (``steady score --split holdout``) and gate the int8 version against
the float production version; the regression rules cover accuracy and every flip metric.

Example:
    >>> card = quantize_version(repo, "efficientnet-lite0", 1, "photos")    # doctest: +SKIP
    >>> card.precision, card.quantization.calibration_count, card.parity.top1_agreement  # doctest: +SKIP
    ('int8', 100, 0.99)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from service.core.card import ModelCard, Parity, Quantization, Source
from service.core.errors import ExportError, InvalidInput, ParityError
from service.core.images import calibration_order, half_of, is_image_file
from service.core.preprocess import Preprocessor
from service.core.repository import ModelRepository
from service.core.static_shape import shape_nodes

__all__ = ["METHODS", "ACTIVATIONS", "DEFAULT_MIN_AGREEMENT", "QuantizeOptions", "CalibrationSet", "calibration_set",
           "quantize_onnx", "quantize_version"]

_log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("uint8", "int8")  # uint8: asymmetric (ORT's default for QDQ on x86); int8: symmetric
# 0.97 sits at the noise floor of ~100 photos: on lite0, changing only which 32 or 64 photos calibrate moved
# held-out agreement between 0.952 and 0.990; the recommended configuration measured 0.975 on shifted views
DEFAULT_MIN_AGREEMENT = 0.95
PARITY_HOLDOUT = 128  # held-out photos of the folder in the parity set (besides scikit-image's)
PARITY_SHIFTS = (-8, 0, 8)  # each held-out photo is compared at 3 x 3 whole-pixel moves of its view


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize (defaults: the configuration measured best on lite0; README.md, "Precision").

    Attributes:
        count: calibration photos (the first ``count`` of the tune half, seeded order).
        seed: the split and subset seed.
        method: ORT's calibration method: ``minmax``, ``entropy`` or ``percentile``.
        activations: ``uint8`` (asymmetric) or ``int8`` (symmetric).
        percentile: the percentile of the ``percentile`` method.
        float_nodes: node names kept in float (besides the shape arithmetic, always float).
        min_agreement: top-1 agreement with the float source below which the export fails.
        parity_holdout: held-out photos of the folder added to the parity set.
    """

    count: int = 64
    seed: int = 0
    method: str = "minmax"
    activations: str = "uint8"
    percentile: float = 99.999
    float_nodes: tuple[str, ...] = ()
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    parity_holdout: int = PARITY_HOLDOUT

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InvalidInput(f"calibration count must be >= 1, got {self.count}")
        if self.method not in METHODS:
            raise InvalidInput(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.activations not in ACTIVATIONS:
            raise InvalidInput(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if not 50.0 < self.percentile < 100.0:
            raise InvalidInput(f"percentile must be in (50, 100), got {self.percentile}")
        if not 0.0 < self.min_agreement <= 1.0:
            raise InvalidInput(f"min_agreement must be in (0, 1], got {self.min_agreement}")
        if self.parity_holdout < 0:
            raise InvalidInput(f"parity_holdout must be >= 0, got {self.parity_holdout}")


@dataclass(frozen=True)
class CalibrationSet:
    """The photos of a folder, split: ``calibration`` (the subset used) and ``holdout`` (never used to calibrate)."""

    root: Path
    calibration: tuple[str, ...]
    holdout: tuple[str, ...]
    pool: int  # photos in the tune half

    def fingerprint(self) -> tuple[str, tuple[str, ...]]:
        """(sha256 over the calibration photos' paths and bytes, each photo's sha256)."""
        digest = hashlib.sha256()
        each = []
        for name in self.calibration:
            h = hashlib.sha256((self.root / name).read_bytes()).hexdigest()
            each.append(h)
            digest.update(f"{name}\0{h}\n".encode())
        return digest.hexdigest(), tuple(each)


def calibration_set(root: str | Path, count: int, seed: int) -> CalibrationSet:
    """Split the images under ``root`` and take the calibration subset.

    Raises:
        InvalidInput: the folder is missing, or its tune half has fewer than ``count`` photos.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidInput(f"calibration folder {root} does not exist")
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if is_image_file(p))
    pool = [n for n in names if half_of(n, seed) == "tune"]
    holdout = [n for n in names if half_of(n, seed) == "holdout"]
    if len(pool) < count:
        raise InvalidInput(f"the tune half of {root} (seed {seed}) has {len(pool)} photos of the {count} "
                           f"asked for ({len(names)} images in all): give more photos or a smaller --count")
    return CalibrationSet(root, tuple(calibration_order(pool, seed)[:count]), tuple(holdout), len(pool))


def _tensors(card: ModelCard, root: Path, names: Sequence[str], shifts: Sequence[int] = (0,)) -> np.ndarray:
    """(N x shifts^2, 3, R, R) float32: the card's preprocessing (policy and resolution), as served; with
    ``shifts`` each photo's view moved by every (dx, dy) of whole output pixels too."""
    from service.core.boxes import shift_box

    pre = Preprocessor(card)
    views = []
    for name in names:
        img = pre.decode((root / name).read_bytes())
        box = pre.box(img)
        views += [pre.view(img, shift_box(box, dx, dy, pre.resolution)).pixels for dy in shifts for dx in shifts]
    return pre.to_tensor(views)


class _Reader:
    """ORT's CalibrationDataReader protocol over preprocessed tensors, one photo per call."""

    def __init__(self, input_name: str, tensors: np.ndarray) -> None:
        self.input_name, self.tensors, self.i = input_name, tensors, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.tensors):
            return None
        self.i += 1
        return {self.input_name: self.tensors[self.i - 1:self.i]}

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return len(self.tensors)


def quantize_onnx(onnx_bytes: bytes, card: ModelCard, data: str | Path,
                  options: QuantizeOptions = QuantizeOptions()) -> tuple[bytes, Quantization, Parity]:
    """The int8 graph of a float model, its quantization record and its parity against the float model.

    Raises:
        InvalidInput: bad options or too few photos.
        ExportError: ONNX Runtime's quantizer failed.
        ParityError: top-1 agreement with the float model under ``options.min_agreement``.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    photos = calibration_set(data, options.count, options.seed)
    fingerprint, digests = photos.fingerprint()
    tensors = _tensors(card, photos.root, photos.calibration)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    extra: dict[str, Any] = {"ActivationSymmetric": options.activations == "int8"}
    if options.method == "percentile":
        extra["CalibPercentile"] = options.percentile
    with tempfile.TemporaryDirectory(prefix="steady-quantize-") as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "fp32-pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        try:
            quant_pre_process(str(src), str(pre))  # shape inference + ORT's graph optimisation, as ORT recommends
            model = onnx.load(str(pre))
            known = {n.name for n in model.graph.node}
            unknown = [n for n in options.float_nodes if n not in known]
            if unknown:
                raise InvalidInput(f"float_nodes {unknown} are not nodes of the model")
            exclude = sorted(set(shape_nodes(model)) | set(options.float_nodes))
            input_name = model.graph.input[0].name
            with contextlib.redirect_stdout(sys.stderr):  # ORT's calibrators print progress; stdout is the result's
                quantize_static(str(pre), str(out), _Reader(input_name, tensors), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8 if options.activations == "uint8"
                                else QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=methods[options.method], nodes_to_exclude=exclude,
                                extra_options=extra)
            int8 = out.read_bytes()
        except (InvalidInput, ParityError):
            raise
        except Exception as exc:  # the quantizer raises many types
            raise ExportError(f"onnxruntime.quantization failed: {type(exc).__name__}: {exc}") from exc
    quantization = Quantization(
        method=options.method, calibration_count=len(photos.calibration), calibration_fingerprint=fingerprint,
        calibration_sha256=digests, seed=options.seed, source_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        activations=options.activations, float_nodes=tuple(options.float_nodes),
        options=tuple(sorted((k, str(v)) for k, v in extra.items())),
        tool=f"onnxruntime {onnxruntime.__version__} quantize_static QDQ (quant_pre_process first)",
    )
    parity = int8_parity(int8, onnx_bytes, card, photos, options)
    return int8, quantization, parity


def int8_parity(int8: bytes, fp32: bytes, card: ModelCard, photos: CalibrationSet,
                options: QuantizeOptions) -> Parity:
    """Top-1 agreement and max logit difference of the int8 graph against the float one.

    Parity photos: scikit-image's photos at the card's parity resolutions, and up to
    ``options.parity_holdout`` held-out photos of the folder at the native resolution, each at
    3 x 3 whole-pixel moves of its view (:data:`PARITY_SHIFTS`): about ten times more answers than
    photos, which the agreement threshold needs; never a calibration photo.

    Raises:
        ParityError: agreement under ``options.min_agreement``, with the numbers.
    """
    from exporters.parity import parity_resolutions, photo_inputs
    from service.core.runtime import Classifier, RuntimeOptions

    sizes = parity_resolutions(card.resolution)
    runtime = RuntimeOptions(provider="cpu", static_sizes=sizes)  # the specialised graphs the service runs
    a, b = Classifier(fp32, card, runtime), Classifier(int8, card, runtime)
    photos_in = photo_inputs()
    held = list(photos.holdout[:options.parity_holdout])
    batches: list[tuple[list[str], np.ndarray]] = []
    for size in sizes:
        pre = Preprocessor(card, resolution=size)
        batches.append(([f"{n}@{size}px" for n, _ in photos_in],
                        pre.to_tensor([pre.prepare(data).pixels for _, data in photos_in])))
    moves = [(dx, dy) for dy in PARITY_SHIFTS for dx in PARITY_SHIFTS]
    for start in range(0, len(held), 4):
        chunk = held[start:start + 4]
        batches.append(([f"holdout:{n}@{card.resolution}px{dx:+d},{dy:+d}" for n in chunk for dx, dy in moves],
                        _tensors(card, photos.root, chunk, PARITY_SHIFTS)))
    worst, total, agree, differ = 0.0, 0, 0, []
    for names, batch in batches:
        la, lb = a.logits(batch).astype(np.float64), b.logits(batch).astype(np.float64)
        if not np.isfinite(lb).all():
            raise ParityError("the int8 model gives non-finite logits")
        worst = max(worst, float(np.abs(la - lb).max()))
        for name, x, y in zip(names, la.argmax(1), lb.argmax(1)):
            total += 1
            agree += int(x == y)
            if x != y:
                differ.append(f"{name} fp32 {int(x)} vs int8 {int(y)}")
    agreement = agree / total
    _log.info("int8 parity: top-1 agreement %d/%d = %.3f, max abs logit difference %.3g", agree, total,
              agreement, worst)
    if agreement < options.min_agreement:
        shown = "; ".join(differ[:5]) + (" ..." if len(differ) > 5 else "")
        raise ParityError(f"int8 top-1 agreement with the float model {agree}/{total} = {agreement:.3f} is under "
                          f"{options.min_agreement:g} (max abs logit difference {worst:.3g}): {shown}")
    names = tuple(n for n, _ in photos_in) + tuple(f"holdout:{n}" for n in held)
    return Parity(max_abs_diff=worst, top1_agreement=agreement, images=names, resolutions=sizes,
                  tolerance=None, min_agreement=options.min_agreement, reference="fp32-onnx")


def quantize_version(repo: ModelRepository, model: str, version: int, data: str | Path,
                     options: QuantizeOptions = QuantizeOptions()) -> ModelCard:
    """Quantize a stored float version into a new int8 version of the same model; returns its card."""
    loaded = repo.load(model, version)
    if loaded.card.precision != "fp32":
        raise InvalidInput(f"{model}/{version} is {loaded.card.precision}: quantize a fp32 version")
    int8, quantization, parity = quantize_onnx(loaded.onnx_bytes, loaded.card, data, options)
    card = loaded.card.replace(precision="int8", quantization=quantization, parity=parity,
                               source=Source(kind="quantized", architecture=f"{model}/{version}",
                                             weights_sha256=loaded.sha256))
    return repo.add(model, int8, card)
