"""Hostile model and version names: 400/404 JSON, and never a path outside the repository.

Request names are only ever looked up in the in-memory catalog (built from the repository's
listing); the repository itself refuses any name outside ``[A-Za-z0-9._-]{1,64}`` or with
``..``. The HTTP cases are sent raw (``http.client``), so no client normalises ``..`` away.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.errors import InvalidName, NotFound
from service.core.repository import ModelRepository, parse_version, validate_name
from tests.reliability.conftest import Tally
from tests.reliability.hostile import photo_jpeg

HOSTILE_NAMES = [
    "..", ".", "...", "a..b", "../tiny", "..%2Ftiny", "%2e%2e", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "..%5c..%5cwindows", "..\\..\\windows", "%252e%252e%252f", "tiny%00", "tiny%0a", "%00", "-tiny", "_tiny",
    ".hidden", "tiny%20", "%20tiny", "t%C3%AFny", "%D0%BC%D0%BE%D0%B4%D0%B5%D0%BB%D1%8C", "%F0%9F%98%80",
    "%EF%BC%8E%EF%BC%8E",  # fullwidth dots
    "a" * 65, "a" * 4000, "tiny;rm%20-rf", "tiny'--", "tiny%22", "%7B%7D", "tiny%3F", "tiny%23",
    "%2Fetc%2Fpasswd", "%2F", "~root", "tiny%2F..%2F..%2F..",
]
HOSTILE_VERSIONS = [
    "..", "0", "-1", "01a", "1.0", "%2e%2e", "..%2F1", "1%2F..%2F2", "%EF%BC%91",  # fullwidth 1
    "%C2%B2", "99999999999", "9" * 4000, "1e3", "0x1", "%00", "%20", "1%00",
]


def _raw(base: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, bytes, float]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    start = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read(), time.perf_counter() - start
    finally:
        conn.close()


def _paths() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name in HOSTILE_NAMES:
        out += [("POST", f"/v1/models/{name}:classify"), ("GET", f"/v2/models/{name}"),
                ("GET", f"/v2/models/{name}/ready"), ("GET", f"/v2/models/{name}/config"),
                ("POST", f"/v2/models/{name}/infer"), ("GET", f"/v2/models/{name}/versions/1")]
    for version in HOSTILE_VERSIONS:
        out += [("POST", f"/v1/models/tiny:classify?version={version}"), ("GET", f"/v2/models/tiny/versions/{version}"),
                ("POST", f"/v2/models/tiny/versions/{version}/infer"), ("GET", f"/v2/models/tiny/versions/{version}/ready")]
    out += [("GET", "/v2/models/tiny/../../../../etc/passwd"), ("GET", "/../../etc/passwd"),
            ("GET", "/v2/models//versions/1"), ("POST", "/v1/models/:classify")]
    return out


@pytest.mark.e2e
def test_hostile_names_get_json_400_or_404(service, tally: Tally) -> None:
    photo = photo_jpeg(32, 32)
    infer = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]}).encode()
    failures = []
    for method, path in _paths():
        body, headers = (photo, {"Content-Type": "image/jpeg"}) if "classify" in path else \
            ((infer, {}) if method == "POST" else (b"", {}))
        try:
            status, raw, elapsed = _raw(service.base, method, path, body, headers)
        except (OSError, http.client.HTTPException) as exc:  # the connection died: a crash
            tally.record("names-http", expected=False, crash=True, lost=isinstance(exc, TimeoutError))
            failures.append(f"{method} {path[:80]}: {exc!r}")
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        ok = status in (400, 404) and isinstance(doc, dict) and set(doc) == {"error"} and elapsed < 2.0
        tally.record("names-http", expected=ok, status=status)
        if not ok:
            failures.append(f"{method} {path[:80]} -> {status} in {elapsed:.2f} s: {raw[:120]!r}")
    # and the service still answers
    status, _, _ = _raw(service.base, "POST", "/v1/models/tiny:classify", photo, {"Content-Type": "image/jpeg"})
    assert status == 200
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ unit: the repository never leaves its root
@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES] + ["../x", "/etc", "a/b", "a\\b", "a\x00b", "", " "])
def test_repository_refuses_hostile_names(tmp_path: Path, name: str) -> None:
    from urllib.parse import unquote

    repo = ModelRepository(tmp_path / "repo")
    for candidate in {name, unquote(name), unquote(unquote(name))}:
        try:
            path = repo.model_dir(candidate)
        except InvalidName:
            continue
        assert path.resolve().parent == repo.root.resolve(), (candidate, path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.text(max_size=80), st.from_regex(r"[A-Za-z0-9._/\\%-]{0,70}", fullmatch=True)),
       version=st.one_of(st.text(max_size=12), st.integers(-10, 10**12)))
def test_names_fuzzed_stay_inside_the_repository(tmp_path: Path, name: str, version: object) -> None:
    from tests.reliability.conftest import TALLY

    repo = ModelRepository(tmp_path / "repo")
    try:
        path = repo.model_dir(name)
    except InvalidName:
        TALLY.record("names-fuzz", expected=True, status=400)
    else:
        assert path.resolve().parent == repo.root.resolve() and path.name == name and ".." not in name
        TALLY.record("names-fuzz", expected=True, status=200)
    try:
        v = parse_version(version)  # type: ignore[arg-type]
        assert isinstance(v, int) and v >= 1
    except InvalidName:
        pass


def test_lookup_of_hostile_names_touches_no_file(tiny_repo: ModelRepository, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data plane resolves request names in memory: no filesystem call happens at lookup."""
    import builtins
    import os

    from service.dataplane import DataPlane
    from service.metrics import Metrics
    from service.settings import ServeSettings

    plane = DataPlane(ServeSettings.build(tiny_repo.root, environ={}), tiny_repo, Metrics("memory"))
    plane.load_all()
    opened: list[str] = []
    real_open, real_stat = builtins.open, os.stat
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(str(a[0])) or real_open(*a, **k))
    monkeypatch.setattr(os, "stat", lambda *a, **k: opened.append(str(a[0])) or real_stat(*a, **k))
    from urllib.parse import unquote

    for name in HOSTILE_NAMES + ["../repo/tiny", "tiny/../tiny"]:
        with pytest.raises((InvalidName, NotFound)):
            plane.lookup(unquote(name), None)
    for version in HOSTILE_VERSIONS:
        with pytest.raises((InvalidName, NotFound)):
            plane.lookup("tiny", unquote(version))
    assert opened == []
    assert plane.lookup("tiny", "1").version == 1
    assert validate_name("tiny") == "tiny"
    assert quote("..") == ".."  # (why the raw cases above use %2e%2e as well)
