"""The model card: everything needed to feed a model exactly as it was trained.

A card is written once by ``exporters/`` and only read by ``service/`` and
``robustness/``. It is stored twice: as ``card.json`` next to ``model.onnx``
(complete, with the version and the ONNX sha256 that the repository assigns)
and in the ONNX file's ``metadata_props`` under the key ``steady.card`` (without
``version`` and ``onnx_sha256``, which a file cannot know about itself), so an
ONNX file alone describes itself.

Value scaling is always stated on the 0..255 scale: the network input is
``(pixel - mean) / std`` with ``pixel`` in 0..255, channel order RGB, layout NCHW.

Example:
    >>> card = ModelCard(name="m", labels=("a", "b"), train_resolution=224,
    ...                  mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
    >>> ModelCard.from_json(card.to_json()) == card
    True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from service.core.errors import CardError

__all__ = [
    "CARD_SCHEMA_VERSION",
    "METADATA_KEY",
    "POLICIES",
    "INTERPOLATIONS",
    "PRECISIONS",
    "Source",
    "Parity",
    "Quantization",
    "Tune",
    "TUNE_METHODS",
    "ModelCard",
    "steady_version",
]

CARD_SCHEMA_VERSION = 1
METADATA_KEY = "steady.card"
POLICIES = ("center", "object")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
PRECISIONS = ("fp32", "fp16", "int8")
TUNE_METHODS = ("fixres", "consistency")


def steady_version() -> str:
    """The installed Steady version (``0+unknown`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steady")
    except PackageNotFoundError:
        return "0+unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Source:
    """Where the weights came from."""

    kind: str = "unknown"  # efficientnet-lite | torchvision | timm | onnx | module
    architecture: str = ""
    weights_sha256: str | None = None


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime vs the reference on fixed inputs, recorded at export.

    ``reference`` is what the graph was compared with: the PyTorch module (``pytorch``), or for an
    int8 version the float ONNX model it was quantized from (``fp32-onnx``), where the logits cannot
    match to 1e-3 and what must hold is the answer: top-1 agreement >= ``min_agreement``.
    """

    max_abs_diff: float
    top1_agreement: float
    images: tuple[str, ...] = ()
    resolutions: tuple[int, ...] = ()
    tolerance: float | None = 1e-3  # None: no logit tolerance (int8: the agreement decides)
    min_agreement: float = 1.0
    reference: str = "pytorch"


@dataclass(frozen=True)
class Quantization:
    """How an int8 version was made from its float source (:mod:`exporters.quantize`).

    Calibration photos are a seeded subset of the tune half of a folder (the split and the
    subset are functions of the file's relative path and ``seed``); their content digests are kept
    so that no Steady measurement ever scores the version on a photo it was calibrated on.
    """

    method: str                          # minmax | entropy | percentile (onnxruntime.quantization)
    calibration_count: int
    calibration_fingerprint: str         # sha256 over the calibration photos' paths and bytes
    calibration_sha256: tuple[str, ...]  # sha256 of each calibration photo's bytes
    seed: int
    source_sha256: str                   # the float ONNX model that was quantized
    activations: str = "uint8"           # uint8 (asymmetric) | int8 (symmetric)
    weights: str = "int8 per-channel"
    float_nodes: tuple[str, ...] = ()    # nodes kept in float
    options: tuple[tuple[str, str], ...] = ()  # further calibrator / quantizer options, as text
    tool: str = ""                       # onnxruntime version and entry point


@dataclass(frozen=True)
class Tune:
    """How a version was fine-tuned from another one by ``steady tune``.

    The photos were split by ``service.core.images.half_of`` (seeded hash of the relative path);
    the model saw only the ``tune`` half, so only the ``holdout`` half may judge it.
    Fingerprints are label-free (paths and bytes), so they match with or without labels.
    """

    method: str  # one of TUNE_METHODS
    source_version: int
    source_sha256: str  # the source version's ONNX sha256
    data_fingerprint: str  # the whole data folder
    split_seed: int
    tune_fingerprint: str  # the photos tuned on
    tune_images: int
    holdout_images: int
    labelled: bool  # cross-entropy with labels, else distillation from the source
    resolution: int  # the side the model was tuned at
    steps: int
    batch_size: int
    learning_rate: float
    loss_start: float  # mean loss over the first tenth of the steps
    loss_end: float  # ... and over the last tenth
    wall_seconds: float
    seed: int
    device: str
    source_weights_sha256: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # method settings (views, shifts, teacher...)

    def __post_init__(self) -> None:
        if self.method not in TUNE_METHODS:
            raise CardError(f"tune method must be one of {TUNE_METHODS}, got {self.method!r}")


@dataclass(frozen=True)
class ModelCard:
    """Frozen, typed description of one exported model version."""

    name: str
    labels: tuple[str, ...]
    train_resolution: int
    mean: tuple[float, float, float]  # always stated: a missing mean/std is an error, never a guess
    std: tuple[float, float, float]
    version: int | None = None
    test_resolution: int | None = None
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    value_scale: str = "0..255"
    layout: str = "NCHW"
    channel_order: str = "RGB"
    input_name: str = "input"
    output_name: str = "logits"
    policy: str = "center"
    precision: str = "fp32"  # weights/activations inside the graph; inputs and outputs are always float32
    onnx_sha256: str | None = None
    opset: int | None = None
    source: Source = field(default_factory=Source)
    parity: Parity | None = None
    quantization: Quantization | None = None
    tune: Tune | None = None  # set on versions made by ``steady tune``; absent on older cards
    created: str = field(default_factory=_now)
    steady_version: str = field(default_factory=steady_version)
    schema_version: int = CARD_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.name:
            raise CardError("card name must not be empty")
        if not self.labels:
            raise CardError("card labels must not be empty")
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise CardError(f"mean and std need 3 values each, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise CardError(f"std must be positive, got {self.std}")
        if not isinstance(self.train_resolution, int) or self.train_resolution < 8:
            raise CardError(f"train_resolution must be an integer >= 8, got {self.train_resolution!r}")
        if self.test_resolution is None:
            object.__setattr__(self, "test_resolution", self.train_resolution)
        if not isinstance(self.test_resolution, int) or self.test_resolution < 8:
            raise CardError(f"test_resolution must be an integer >= 8, got {self.test_resolution!r}")
        if not 0.1 <= float(self.crop_pct) <= 1.0:
            raise CardError(f"crop_pct must be in [0.1, 1.0], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise CardError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.policy not in POLICIES:
            raise CardError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.precision not in PRECISIONS:
            raise CardError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if (self.precision == "int8") != (self.quantization is not None):
            raise CardError("an int8 card needs its quantization record, and only an int8 card has one")
        if self.value_scale != "0..255":
            raise CardError(f"value_scale must be '0..255' (state mean/std on 0..255), got {self.value_scale!r}")
        if self.layout != "NCHW" or self.channel_order not in ("RGB", "BGR"):
            raise CardError(f"unsupported layout/channel order {self.layout}/{self.channel_order}")
        if self.schema_version != CARD_SCHEMA_VERSION:
            raise CardError(f"card schema_version {self.schema_version} is not {CARD_SCHEMA_VERSION}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def resolution(self) -> int:
        """The resolution the service feeds (test_resolution, never None after init)."""
        assert self.test_resolution is not None  # set in __post_init__
        return self.test_resolution

    def replace(self, **changes: Any) -> "ModelCard":
        """A copy with fields changed (the card itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, *, embedded: bool = False) -> str:
        """JSON text; ``embedded=True`` drops the fields a file cannot know about itself."""
        data = self.to_dict()
        if embedded:
            data.pop("version")
            data.pop("onnx_sha256")
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelCard":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CardError(f"unknown card fields: {sorted(unknown)}")
        kwargs = dict(data)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise CardError(f"card lacks required fields {missing}: preprocessing is never guessed")
        try:
            kwargs["source"] = Source(**kwargs.get("source") or {})
            if kwargs.get("parity") is not None:
                parity = dict(kwargs["parity"])
                parity["images"] = tuple(parity.get("images", ()))
                parity["resolutions"] = tuple(parity.get("resolutions", ()))
                kwargs["parity"] = Parity(**parity)
            if kwargs.get("quantization") is not None:
                q = dict(kwargs["quantization"])
                for key in ("calibration_sha256", "float_nodes"):
                    q[key] = tuple(q.get(key, ()))
                q["options"] = tuple(tuple(pair) for pair in q.get("options", ()))
                kwargs["quantization"] = Quantization(**q)
            if kwargs.get("tune") is not None:
                kwargs["tune"] = Tune(**kwargs["tune"])
            return cls(**kwargs)
        except TypeError as exc:
            raise CardError(f"invalid card: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelCard":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CardError(f"card is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CardError("card JSON must be an object")
        return cls.from_dict(data)
