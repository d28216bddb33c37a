"""The versioned model repository on disk.

Layout::

    <root>/<model>/stages.json             production/candidate pointers + history
    <root>/<model>/.lock                   flock target for every write to the model
    <root>/<model>/<version>/model.onnx    immutable once written
    <root>/<model>/<version>/card.json     immutable once written
    <root>/<model>/<version>/SHA256SUMS    sha256 of the two files above
    <root>/<model>/<version>/robustness.json, gate.json   written later, bound to the sha256

Versions are integers allocated 1, 2, 3... under the model's lock; a version
is written to a temporary folder and renamed into place, so it appears whole or
not at all. Every load verifies the sha256 of both files and refuses a mismatch
with :class:`~service.core.errors.ChecksumError`.

Model names: 1-64 characters from ``[A-Za-z0-9._-]``, starting with a letter
or digit, and never containing ``..``.

Example:
    >>> repo = ModelRepository("/tmp/models")          # doctest: +SKIP
    >>> card = repo.add("lite0", onnx_bytes, card)       # doctest: +SKIP
    >>> loaded = repo.load("lite0", card.version)        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from service.core.card import METADATA_KEY, ModelCard
from service.core.errors import (
    BoundFileInvalid,
    BoundFileMissing,
    BoundFileStale,
    CardError,
    ChecksumError,
    InvalidName,
    ModelNotFound,
    RepositoryError,
    VersionNotFound,
)

__all__ = [
    "NAME_PATTERN",
    "STAGES",
    "validate_name",
    "parse_version",
    "sha256_bytes",
    "sha256_file",
    "atomic_write_json",
    "read_json",
    "read_bound_json",
    "LoadedVersion",
    "Stages",
    "ModelRepository",
]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STAGES = ("production", "candidate")
MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
SUMS_FILE = "SHA256SUMS"
STAGES_FILE = "stages.json"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = name if isinstance(name, str) and len(name) <= 80 else repr(name)[:80] + "..."
        raise InvalidName(
            f"invalid model name {shown!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..'"
        )
    return name


def parse_version(value: str | int) -> int:
    """Parse a version given on a command line or URL: a positive integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        version = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        version = int(value)
    else:
        shown = value if isinstance(value, str) and len(value) <= 40 else repr(value)[:40] + "..."
        raise InvalidName(f"invalid version {shown!r}: versions are positive integers")
    if version < 1:
        raise InvalidName(f"invalid version {version}: versions start at 1")
    return version


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to ``path`` so readers see the old or the new file, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, "rb") as fh:
        return json.loads(fh.read())


def read_bound_json(version_dir: str | os.PathLike[str], name: str, sha256: str) -> dict[str, Any]:
    """The JSON object ``version_dir/name`` when it is bound to the model ``sha256``.

    The one reader of the files that describe a model version after it was stored
    (``robustness.json``, ``gate.json``): each records the ``model_sha256`` it was made for.

    Raises:
        BoundFileMissing: the file does not exist.
        BoundFileInvalid: unreadable, not JSON, or not a JSON object.
        BoundFileStale: its ``model_sha256`` is not ``sha256``.
    """
    path = Path(version_dir) / name
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise BoundFileMissing(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BoundFileInvalid(f"{path} is unreadable: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise BoundFileInvalid(f"{path} must hold a JSON object, not {type(data).__name__}")
    recorded = data.get("model_sha256")
    if recorded != sha256:
        raise BoundFileStale(f"{path} is stale: it was made for another model (sha256 {str(recorded)[:12]}; "
                             f"this version is {sha256[:12]})")
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class LoadedVersion:
    """A checksum-verified version: the card and the exact ONNX bytes that were hashed."""

    card: ModelCard
    onnx_bytes: bytes
    path: Path

    @property
    def sha256(self) -> str:
        assert self.card.onnx_sha256 is not None
        return self.card.onnx_sha256


@dataclass(frozen=True)
class Stages:
    """Contents of ``stages.json``."""

    production: int | None
    candidate: int | None
    history: tuple[dict[str, Any], ...]

    def get(self, stage: str) -> int | None:
        if stage not in STAGES:
            raise InvalidName(f"unknown stage {stage!r}: use one of {STAGES}")
        return self.production if stage == "production" else self.candidate

    def to_dict(self) -> dict[str, Any]:
        return {"production": self.production, "candidate": self.candidate, "history": list(self.history)}


class ModelRepository:
    """A folder of models, each a folder of integer versions."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------- listing
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name) and ".." not in p.name
        )

    def model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def versions(self, name: str) -> list[int]:
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            raise ModelNotFound(f"model {name!r} not found in {self.root}")
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())

    def version_dir(self, name: str, version: int) -> Path:
        path = self.model_dir(name) / str(parse_version(version))
        if not path.is_dir():
            raise VersionNotFound(f"model {name!r} has no version {version}")
        return path

    def resolve(self, name: str, version: int | str | None = None) -> int:
        """The version to use: the one given, else production, else the newest."""
        if version is not None:
            version = parse_version(version)
            self.version_dir(name, version)
            return version
        versions = self.versions(name)
        if not versions:
            raise VersionNotFound(f"model {name!r} has no versions")
        production = self.stages(name).production
        return production if production is not None else versions[-1]

    # ----------------------------------------------------------------- reading
    def card(self, name: str, version: int) -> ModelCard:
        """The card of a version, without verifying the model file (see :meth:`load`)."""
        path = self.version_dir(name, version) / CARD_FILE
        try:
            return ModelCard.from_json(path.read_bytes())
        except (OSError, CardError) as exc:
            raise ChecksumError(f"checksum: card of {name}/{version} is unreadable or corrupt: {exc}") from exc

    def verify(self, name: str, version: int) -> str:
        """Verify both files of a version against SHA256SUMS and the card; return the ONNX sha256."""
        return self._verified(name, version)[0].onnx_sha256 or ""

    def load(self, name: str, version: int) -> LoadedVersion:
        """Read and verify a version. The returned bytes are exactly the ones hashed."""
        card, onnx_bytes, path = self._verified(name, version)
        return LoadedVersion(card=card, onnx_bytes=onnx_bytes, path=path)

    def _verified(self, name: str, version: int) -> tuple[ModelCard, bytes, Path]:
        path = self.version_dir(name, version)
        try:
            sums = _parse_sums((path / SUMS_FILE).read_text())
            card_bytes = (path / CARD_FILE).read_bytes()
            onnx_bytes = (path / MODEL_FILE).read_bytes()
        except (OSError, ValueError) as exc:
            raise ChecksumError(f"checksum: {name}/{version} cannot be verified: {exc}") from exc
        actual = {CARD_FILE: sha256_bytes(card_bytes), MODEL_FILE: sha256_bytes(onnx_bytes)}
        for file, digest in actual.items():
            if sums.get(file) != digest:
                raise ChecksumError(
                    f"checksum mismatch for {name}/{version}/{file}: expected {sums.get(file)}, got {digest}"
                )
        card = self.card(name, version)
        if card.onnx_sha256 != actual[MODEL_FILE]:
            raise ChecksumError(f"checksum mismatch: card of {name}/{version} names a different model.onnx")
        return card, onnx_bytes, path

    # ----------------------------------------------------------------- writing
    def add(self, name: str, onnx_bytes: bytes, card: ModelCard) -> ModelCard:
        """Store a new immutable version; embed the card in the ONNX metadata; return the final card."""
        import onnx

        validate_name(name)
        model = onnx.load_from_string(onnx_bytes)
        card = card.replace(name=name, version=None, onnx_sha256=None, opset=card.opset or _opset(model))
        _set_metadata(model, METADATA_KEY, card.to_json(embedded=True))
        data = model.SerializeToString()
        digest = sha256_bytes(data)
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        with self.lock(name):
            version = max(self.versions(name), default=0) + 1
            final = card.replace(version=version, onnx_sha256=digest)
            card_bytes = (final.to_json() + "\n").encode()
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
            try:
                (tmp / MODEL_FILE).write_bytes(data)
                (tmp / CARD_FILE).write_bytes(card_bytes)
                (tmp / SUMS_FILE).write_text(
                    f"{digest}  {MODEL_FILE}\n{sha256_bytes(card_bytes)}  {CARD_FILE}\n"
                )
                for file in (MODEL_FILE, CARD_FILE, SUMS_FILE):
                    with open(tmp / file, "rb") as fh:
                        os.fsync(fh.fileno())
                    os.chmod(tmp / file, 0o444)
                os.chmod(tmp, 0o755)
                target = model_dir / str(version)
                if target.exists():
                    raise RepositoryError(f"{name}/{version} already exists: versions are immutable")
                os.rename(tmp, target)
                _fsync_dir(model_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if not (model_dir / STAGES_FILE).exists():
                atomic_write_json(model_dir / STAGES_FILE, Stages(None, None, ()).to_dict())
        return final

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive lock on a model (across processes) for every write."""
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ stages
    def stages(self, name: str) -> Stages:
        path = self.model_dir(name) / STAGES_FILE
        if not path.exists():
            self.versions(name)  # raises ModelNotFound for unknown models
            return Stages(None, None, ())
        try:
            data = read_json(path)
            return Stages(data.get("production"), data.get("candidate"), tuple(data.get("history", ())))
        except (OSError, ValueError, AttributeError) as exc:
            raise RepositoryError(f"{path} is unreadable: {exc}") from exc

    def set_stage(
        self,
        name: str,
        stage: str,
        version: int | None,
        *,
        reason: str = "",
        forced: bool = False,
        check: Any = None,
    ) -> Stages:
        """Point ``stage`` at ``version`` (None clears it) under the lock, appending history.

        ``check(version)`` runs under the lock before anything is written; it raises to refuse.
        """
        if stage not in STAGES:
            raise InvalidName(f"unknown stage {stage!r}: use one of {STAGES}")
        with self.lock(name):
            if version is not None:
                self.version_dir(name, version)
                if check is not None:
                    check(version)
            current = self.stages(name)
            previous = current.get(stage)
            entry = {"time": _now(), "stage": stage, "from": previous, "to": version, "reason": reason}
            if forced:
                entry["forced"] = True
            updated = Stages(
                production=version if stage == "production" else current.production,
                candidate=version if stage == "candidate" else current.candidate,
                history=current.history + (entry,),
            )
            if stage == "production" and updated.candidate == version:
                updated = Stages(updated.production, None, updated.history)
            atomic_write_json(self.model_dir(name) / STAGES_FILE, updated.to_dict())
            return updated

    def rollback(self, name: str, *, reason: str = "rollback") -> Stages:
        """Restore the production version that preceded the current one."""
        with self.lock(name):
            current = self.stages(name)
            if current.production is None:
                raise RepositoryError(f"model {name!r} has no production version to roll back")
            target = _previous_production(current)
            if target is None:
                raise RepositoryError(f"model {name!r} has no earlier production version to roll back to")
            entry = {"time": _now(), "stage": "production", "from": current.production, "to": target,
                     "reason": reason, "rollback": True}
            updated = Stages(target, current.candidate, current.history + (entry,))
            atomic_write_json(self.model_dir(name) / STAGES_FILE, updated.to_dict())
            return updated


def _previous_production(stages: Stages) -> int | None:
    """The version production held before the (non-rollback) change that installed the current one."""
    for entry in reversed(stages.history):
        if entry.get("stage") == "production" and not entry.get("rollback") and entry.get("to") == stages.production:
            return entry.get("from")
    return None


def _parse_sums(text: str) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, _, file = line.partition("  ")
        if len(digest) != 64 or not file:
            raise ValueError(f"malformed {SUMS_FILE} line {line!r}")
        sums[file] = digest
    return sums


def _opset(model: Any) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _set_metadata(model: Any, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key = key
    entry.value = value
