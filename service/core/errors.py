"""Every domain error Steady raises, in one place.

Each class documents the HTTP status it maps to (``status``) and the CLI exit
code it maps to (``exit_code``). The HTTP layer turns any :class:`SteadyError`
into ``{"error": str(exc)}`` with ``exc.status``; the CLI prints ``str(exc)`` on
one line of stderr and exits with ``exc.exit_code``.
"""

from __future__ import annotations

__all__ = [
    "SteadyError",
    "InvalidInput",
    "UnsupportedImage",
    "ImageTooLarge",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "NotFound",
    "ModelNotFound",
    "VersionNotFound",
    "Unauthorized",
    "AdminDisabled",
    "Overloaded",
    "ChecksumError",
    "RepositoryError",
    "BoundFileError",
    "BoundFileMissing",
    "BoundFileInvalid",
    "BoundFileStale",
    "InvalidName",
    "CardError",
    "ExportError",
    "ParityError",
    "ScoreError",
    "ClusterUnavailable",
    "GateError",
    "PromotionRefused",
    "DeviceUnavailable",
    "PortInUse",
    "RunDirBusy",
    "DecodeBudgetExceeded",
]


class SteadyError(Exception):
    """Base class. HTTP 500, exit code 1."""

    status: int = 500
    exit_code: int = 1


class InvalidInput(SteadyError, ValueError):
    """A request or argument is malformed: wrong shape, dtype, size, NaN. HTTP 400."""

    status = 400
    exit_code = 2


class UnsupportedImage(InvalidInput):
    """The bytes are not an image Steady can decode. HTTP 400."""


class ImageTooLarge(SteadyError):
    """The image's pixel count is over the limit (decompression bombs). HTTP 413."""

    status = 413
    exit_code = 2


class PayloadTooLarge(SteadyError):
    """The request body is over the byte limit. HTTP 413."""

    status = 413
    exit_code = 2


class UnsupportedMediaType(SteadyError):
    """The Content-Type is not an image, multipart or the V2 protocol's. HTTP 415."""

    status = 415
    exit_code = 2


class NotFound(SteadyError, LookupError):
    """HTTP 404."""

    status = 404
    exit_code = 2


class ModelNotFound(NotFound):
    """No such model (or it is not served). HTTP 404."""


class VersionNotFound(NotFound):
    """No such version of the model (or it is not served). HTTP 404."""


class Unauthorized(SteadyError):
    """Missing or wrong bearer token on an admin endpoint. HTTP 401."""

    status = 401


class AdminDisabled(SteadyError):
    """Admin endpoints are off because no token is configured. HTTP 403."""

    status = 403


class Overloaded(SteadyError):
    """The bounded queue is full; the client should retry later. HTTP 503."""

    status = 503


class ChecksumError(SteadyError):
    """A stored file does not match its recorded sha256. HTTP 500, exit code 1."""


class RepositoryError(SteadyError):
    """The model repository is missing, inconsistent or cannot be written. HTTP 500."""


class BoundFileError(RepositoryError):
    """A JSON file in a version folder that is bound to the model's sha256 (robustness.json, gate.json)
    cannot be used. Subclasses say why; the message is one line naming the file. HTTP 500, exit code 1."""


class BoundFileMissing(BoundFileError):
    """The bound file does not exist (e.g. the version was never scored or gated)."""


class BoundFileInvalid(BoundFileError):
    """The bound file is unreadable, not JSON, or not a JSON object."""


class BoundFileStale(BoundFileError):
    """The bound file was written for another model (its ``model_sha256`` differs)."""


class InvalidName(InvalidInput):
    """A model name or version breaks the documented character set. HTTP 400."""


class CardError(SteadyError, ValueError):
    """A model card is missing fields or has invalid values."""

    exit_code = 2


class ExportError(SteadyError):
    """Export from PyTorch (or import of an ONNX file) failed."""


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree beyond the stated tolerances."""


class ScoreError(SteadyError):
    """Robustness scoring could not run (no images, bad protocol name...)."""

    exit_code = 2


class ClusterUnavailable(SteadyError):
    """A Ray cluster cannot run the work: no CPU frees up in time (Serve replicas or other jobs hold them).
    HTTP 503, exit code 1."""

    status = 503


class GateError(SteadyError):
    """The gate cannot decide: missing or stale robustness.json, bad policy. Exit code 2."""

    exit_code = 2


class PromotionRefused(SteadyError):
    """A promotion was refused (no passing gate for this exact sha256). Exit code 1."""

    exit_code = 1


class DeviceUnavailable(SteadyError):
    """The configured device cannot be used here: GPU preprocessing without NVIDIA DALI or without a CUDA
    device, or a card DALI cannot reproduce. A configuration problem found at start-up. Exit code 2."""

    exit_code = 2


class PortInUse(SteadyError):
    """A port ``steady serve`` must bind is held by another process; the message names the port, the
    setting that chose it and the holder. Exit code 1."""


class RunDirBusy(SteadyError):
    """Another live ``steady serve`` holds the run directory (same ``run_dir``, by default the same port),
    or the directory is unsafe to use. Exit code 1."""


class DecodeBudgetExceeded(SteadyError):
    """Decoding the image needs more CPU time than ``decode_budget_s`` (or more progressive JPEG scans than
    allowed): a smaller or baseline-encoded image must be sent. HTTP 413."""

    status = 413
    exit_code = 2
