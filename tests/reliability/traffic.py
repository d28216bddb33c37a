"""Client-side traffic for the operations tests (drain, slow decoding, soak): request kinds, client
threads, and every outcome with its timing and whether the answer was right.

A :class:`Kind` is one request (REST, V2 JSON, V2 binary, or a bad input with its expected 4xx); the
expected top-1 of each good kind is learnt from the service itself before the test traffic
(:meth:`Traffic.learn`), so "answered wrongly" means "a different class than the same request got
when nothing else was happening".
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import numpy as np

__all__ = ["Kind", "Outcome", "Traffic", "rest", "v2_json", "v2_binary", "bad", "top1_of"]

JPEG = {"Content-Type": "image/jpeg"}


@dataclass(frozen=True)
class Kind:
    """One request: where it goes, what it carries, the status it must get when the service is healthy."""

    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    status: int = 200


def rest(name: str, photo: bytes, model: str = "tiny") -> Kind:
    return Kind(name, f"/v1/models/{model}:classify", photo, JPEG)


def v2_json(name: str, photo: bytes, model: str = "tiny") -> Kind:
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                       "parameters": {"content_type": "base64"}, "data": [base64.b64encode(photo).decode()]}]}
    return Kind(name, f"/v2/models/{model}/infer", json.dumps(doc).encode(), {"Content-Type": "application/json"})


def v2_binary(name: str, photo: bytes, model: str = "tiny", count: int = 1) -> Kind:
    """``count`` copies of ``photo`` in one binary V2 request (logits back in binary too)."""
    element = (struct.pack("<I", len(photo)) + photo) * count
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count],
                       "parameters": {"binary_data_size": len(element)}}],
           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    head = json.dumps(doc).encode()
    return Kind(name, f"/v2/models/{model}/infer", head + element,
                {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})


def bad(name: str, body: bytes, status: int, content_type: str = "image/jpeg", model: str = "tiny") -> Kind:
    return Kind(name, f"/v1/models/{model}:classify", body, {"Content-Type": content_type}, status)


def top1_of(response: httpx.Response) -> int | None:
    """The top-1 class of a 200 answer (REST: first prediction; V2: argmax of the logits, JSON or binary)."""
    if response.status_code != 200:
        return None
    if response.request.url.path.endswith(":classify"):
        return int(response.json()["predictions"][0]["index"])
    length = response.headers.get("inference-header-content-length")
    if length is None:
        out = response.json()["outputs"][0]
        return int(np.argmax(np.asarray(out["data"], dtype=np.float32)))
    head = json.loads(response.content[: int(length)])
    size = head["outputs"][0]["parameters"]["binary_data_size"]
    start = int(length)
    return int(np.argmax(np.frombuffer(response.content[start:start + size], dtype="<f4")))


@dataclass
class Outcome:
    """What one request got."""

    kind: str
    start: float  # time.monotonic() when it was sent
    end: float
    status: int | str  # HTTP status, or the exception's name ("timeout" when it got no answer in time)
    retry_after: str | None = None
    top1: int | None = None
    right: bool | None = None  # for 200 answers of good kinds: the expected class?
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Traffic:
    """``clients`` threads sending ``kinds`` round-robin to ``base`` until :meth:`stop`."""

    base: str
    kinds: list[Kind]
    clients: int = 4
    timeout: float = 30.0
    pause_s: float = 0.0
    expected: dict[str, int] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def learn(self) -> "Traffic":
        """The expected top-1 of every good kind, from one quiet request each."""
        with httpx.Client(timeout=self.timeout) as client:
            for kind in self.kinds:
                if kind.status == 200:
                    r = client.post(self.base + kind.path, content=kind.body, headers=kind.headers)
                    assert r.status_code == 200, (kind.name, r.status_code, r.text[:200])
                    top1 = top1_of(r)
                    assert top1 is not None
                    self.expected[kind.name] = top1
        return self

    def send(self, client: httpx.Client, kind: Kind) -> Outcome:
        start = time.monotonic()
        try:
            r = client.post(self.base + kind.path, content=kind.body, headers=kind.headers)
        except httpx.TimeoutException:
            return Outcome(kind.name, start, time.monotonic(), "timeout")
        except httpx.HTTPError as exc:
            return Outcome(kind.name, start, time.monotonic(), type(exc).__name__, error=str(exc)[:200])
        out = Outcome(kind.name, start, time.monotonic(), r.status_code, r.headers.get("retry-after"))
        if r.status_code == 200 and kind.name in self.expected:
            out.top1 = top1_of(r)
            out.right = out.top1 == self.expected[kind.name]
        elif r.status_code != 200:
            out.error = r.text[:200]
        return out

    def _client(self, index: int, chooser: Callable[[int], Kind]) -> None:
        n = index
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                out = self.send(client, chooser(n))
                with self._lock:
                    self.outcomes.append(out)
                if isinstance(out.status, str):
                    time.sleep(0.05)  # refused or reset: do not spin
                elif self.pause_s:
                    time.sleep(self.pause_s)
                n += self.clients

    def start(self, chooser: Callable[[int], Kind] | None = None) -> "Traffic":
        pick = chooser or (lambda n: self.kinds[n % len(self.kinds)])
        self._threads = [threading.Thread(target=self._client, args=(i, pick), daemon=True)
                         for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        with self._lock:
            return list(self.outcomes)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


def run_elsewhere(base: str, kinds: list[Kind], clients: int, seconds: float, nice: int = 19,
                  timeout: float = 120.0) -> list[Outcome]:
    """Send ``kinds`` from ``clients`` threads of another process for ``seconds`` (at ``nice``), like clients on
    other machines: their own CPU work does not compete with the measuring process's threads for its GIL."""
    import os
    import pickle
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec, out = os.path.join(tmp, "spec.pkl"), os.path.join(tmp, "out.pkl")
        with open(spec, "wb") as fh:
            pickle.dump({"base": base, "kinds": kinds, "clients": clients, "seconds": seconds, "timeout": timeout}, fh)
        code = ("import pickle, sys, time; from tests.reliability.traffic import Traffic; "
                "s = pickle.load(open(sys.argv[1], 'rb')); "
                "t = Traffic(s['base'], s['kinds'], clients=s['clients'], timeout=s['timeout']).start(); "
                "time.sleep(s['seconds']); pickle.dump(t.stop(), open(sys.argv[2], 'wb'))")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        subprocess.run(["nice", "-n", str(nice), sys.executable, "-c", code, spec, out], check=True, env=env,
                       timeout=seconds + timeout + 60)
        with open(out, "rb") as fh:
            return list(pickle.load(fh))
