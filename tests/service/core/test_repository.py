import json
import multiprocessing
import os
from pathlib import Path

import pytest

from service.core.errors import ChecksumError, InvalidName, ModelNotFound, RepositoryError, VersionNotFound
from service.core.repository import ModelRepository, parse_version, validate_name
from tests.conftest import tiny_card


def test_versions_are_allocated_in_order_and_files_are_read_only(tiny_repo: ModelRepository, tiny_onnx: bytes) -> None:
    second = tiny_repo.add("tiny", tiny_onnx, tiny_card())
    assert second.version == 2
    assert tiny_repo.versions("tiny") == [1, 2]
    vdir = tiny_repo.version_dir("tiny", 2)
    assert sorted(p.name for p in vdir.iterdir()) == ["SHA256SUMS", "card.json", "model.onnx"]
    for file in vdir.iterdir():
        assert not os.access(file, os.W_OK) or os.geteuid() == 0
        assert file.stat().st_mode & 0o222 == 0
    assert not [p for p in vdir.parent.iterdir() if p.name.startswith(".tmp")]


def test_load_returns_verified_bytes_and_the_embedded_card(tiny_repo: ModelRepository) -> None:
    import onnx

    loaded = tiny_repo.load("tiny", 1)
    assert loaded.card.version == 1 and loaded.card.name == "tiny"
    assert loaded.sha256 == tiny_repo.verify("tiny", 1)
    model = onnx.load_from_string(loaded.onnx_bytes)
    meta = {p.key: p.value for p in model.metadata_props}
    embedded = json.loads(meta["steady.card"])
    assert embedded["labels"] == list(loaded.card.labels)
    assert "onnx_sha256" not in embedded


def _flip_byte(path: Path, offset: int = 100) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", ["model.onnx", "card.json", "SHA256SUMS"])
def test_one_flipped_byte_is_refused_with_a_checksum_error(tiny_repo: ModelRepository, file: str) -> None:
    _flip_byte(tiny_repo.version_dir("tiny", 1) / file, offset=20)
    with pytest.raises(ChecksumError, match="checksum"):
        tiny_repo.load("tiny", 1)


def test_missing_file_is_a_checksum_error(tiny_repo: ModelRepository) -> None:
    path = tiny_repo.version_dir("tiny", 1) / "model.onnx"
    os.chmod(path.parent, 0o755)
    path.unlink()
    with pytest.raises(ChecksumError, match="checksum"):
        tiny_repo.load("tiny", 1)


@pytest.mark.parametrize("name", ["", "..", "a/b", "a\\b", "../etc", "a..b", ".hidden", "-x", "x" * 65, "é", "a b", "a%2Fb"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


@pytest.mark.parametrize("name", ["lite0", "efficientnet-lite0", "m.v2_final", "A", "x" * 64])
def test_good_names_pass(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "abc", "", "１", "9" * 12])
def test_bad_versions_are_refused(value: str) -> None:
    with pytest.raises(InvalidName):
        parse_version(value)


def test_unknown_model_and_version(tiny_repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFound):
        tiny_repo.versions("nope")
    with pytest.raises(VersionNotFound):
        tiny_repo.load("tiny", 7)


def test_resolve_prefers_production_then_newest(tiny_repo: ModelRepository, tiny_onnx: bytes) -> None:
    tiny_repo.add("tiny", tiny_onnx, tiny_card())
    assert tiny_repo.resolve("tiny") == 2
    tiny_repo.set_stage("tiny", "production", 1, reason="first")
    assert tiny_repo.resolve("tiny") == 1
    assert tiny_repo.resolve("tiny", "2") == 2


def test_stages_history_and_rollback(tiny_repo: ModelRepository, tiny_onnx: bytes) -> None:
    for _ in range(2):
        tiny_repo.add("tiny", tiny_onnx, tiny_card())
    tiny_repo.set_stage("tiny", "production", 1, reason="a")
    tiny_repo.set_stage("tiny", "candidate", 2, reason="b")
    tiny_repo.set_stage("tiny", "production", 2, reason="c")
    stages = tiny_repo.set_stage("tiny", "production", 3, reason="d", forced=True)
    assert stages.production == 3 and stages.candidate is None
    assert [h["to"] for h in stages.history] == [1, 2, 2, 3]
    assert stages.history[-1]["forced"] is True
    assert tiny_repo.rollback("tiny").production == 2
    assert tiny_repo.rollback("tiny").production == 1
    with pytest.raises(RepositoryError):
        tiny_repo.rollback("tiny")
    assert len(tiny_repo.stages("tiny").history) == 6


def test_check_runs_under_the_lock_and_can_refuse(tiny_repo: ModelRepository) -> None:
    def refuse(version: int) -> None:
        raise RepositoryError(f"no gate for {version}")

    with pytest.raises(RepositoryError, match="no gate for 1"):
        tiny_repo.set_stage("tiny", "production", 1, check=refuse)
    assert tiny_repo.stages("tiny").production is None
    assert tiny_repo.stages("tiny").history == ()


def _add_many(root: str, onnx_bytes: bytes, count: int) -> None:
    repo = ModelRepository(root)
    for _ in range(count):
        repo.add("tiny", onnx_bytes, tiny_card())


def test_concurrent_writers_get_distinct_versions(tmp_path: Path, tiny_onnx: bytes) -> None:
    # spawn, not fork: a fork of this multithreaded process (torch, gRPC, ONNX Runtime threads) can crash in
    # the child (seen in CI: SIGSEGV) before it reaches the code under test
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(tmp_path), tiny_onnx, 3)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    repo = ModelRepository(tmp_path)
    assert repo.versions("tiny") == list(range(1, 10))
    for v in range(1, 10):
        assert repo.load("tiny", v).card.version == v


def test_read_bound_json_is_the_one_reader(tiny_repo: ModelRepository) -> None:
    from service.core.errors import BoundFileInvalid, BoundFileMissing, BoundFileStale
    from service.core.repository import atomic_write_json, read_bound_json

    vdir = tiny_repo.version_dir("tiny", 1)
    sha = tiny_repo.verify("tiny", 1)
    with pytest.raises(BoundFileMissing, match="does not exist"):
        read_bound_json(vdir, "gate.json", sha)
    (vdir / "gate.json").write_text("[1]")
    with pytest.raises(BoundFileInvalid, match="JSON object, not list"):
        read_bound_json(vdir, "gate.json", sha)
    (vdir / "gate.json").write_text("{")
    with pytest.raises(BoundFileInvalid, match="unreadable"):
        read_bound_json(vdir, "gate.json", sha)
    atomic_write_json(vdir / "gate.json", {"model_sha256": "0" * 64})
    with pytest.raises(BoundFileStale, match="another model"):
        read_bound_json(vdir, "gate.json", sha)
    atomic_write_json(vdir / "gate.json", {"model_sha256": sha, "decision": "pass"})
    assert read_bound_json(vdir, "gate.json", sha)["decision"] == "pass"
