"""The run directory of one ``steady serve``: who owns it, what it started, and the clean-up after a crash.

A ``steady serve`` that dies hard (SIGKILL, an OOM kill, ``ray stop --force``) can leave Ray's agents,
workers and HAProxy behind, still holding its ports. Every process Steady's local Ray starts inherits
``STEADY_RUN_OWNER=<run dir>`` (Ray hands its environment down to every worker, and HAProxy inherits its
manager's), and HAProxy's command line names ``<run dir>/hap/``. The next start in the same directory:

1. takes the directory's lock (``steady.lock``): a live ``steady serve`` holds it for its whole life, so a
   held lock means "in use" (one-line :class:`RunDirBusy`), never "left over";
2. kills the processes of this directory's earlier run: those carrying its marker, its HAProxy, and the
   ones recorded in ``state.json`` (pid + start time, so a reused pid is never hit); only processes of
   the same user, never this process or its ancestors, never another run directory's or another user's
   Ray or HAProxy;
3. checks that every port it is about to bind is free; otherwise :func:`check_ports` fails with one line
   naming the port, the setting that chose it and the process holding it.

Example:
    >>> run = RunDir.acquire("/tmp/steady-0-8000")                 # doctest: +SKIP
    >>> run.clean_leftovers()                                      # doctest: +SKIP
    >>> check_ports([PortUse("port", "127.0.0.1", 8000)])           # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import psutil

from service.core.errors import PortInUse, RunDirBusy

__all__ = ["MARKER", "RunDir", "PortUse", "default_run_dir", "run_processes", "kill_processes", "check_ports",
           "port_holder", "describe", "free_port"]

MARKER = "STEADY_RUN_OWNER"  # environment variable every process of a run inherits: its run directory
STATE_FILE = "state.json"
LOCK_FILE = "steady.lock"
KEEP_SESSIONS = 2  # Ray session folders (logs) and HAProxy node folders kept for a post-mortem


def default_run_dir(port: int) -> str:
    """``/tmp/steady-<uid>-<port>``: one per user and HTTP port, short enough for unix socket paths."""
    return f"/tmp/steady-{os.getuid()}-{port}"


def describe(proc: psutil.Process) -> str:
    """``pid 123 (haproxy -db -f ...)``: a process, for one-line messages."""
    try:
        cmd = " ".join(" ".join(proc.cmdline()).split()) or proc.name()  # one line, whatever the arguments hold
    except psutil.Error:
        cmd = "?"
    return f"pid {proc.pid} ({cmd[:120]})"


def _belongs(proc: psutil.Process, run_dir: str) -> bool:
    """Whether ``proc`` was started by a ``steady serve`` of ``run_dir`` (its marker, or its HAProxy)."""
    try:
        cmd = proc.cmdline()
        if any(part.startswith(f"{run_dir}/hap/") for part in cmd) and "haproxy" in " ".join(cmd[:4]):
            return True
        return proc.environ().get(MARKER) == run_dir
    except psutil.Error:  # gone, or not ours to read
        return False


def run_processes(run_dir: str | os.PathLike[str], *, recorded: Iterable[dict[str, Any]] = ()) -> list[psutil.Process]:
    """The live processes of ``run_dir``'s runs, by marker, HAProxy config path and the ``recorded`` pids
    (matched on their start time too). Same user only; never this process or one of its ancestors."""
    run_dir = str(run_dir)
    uid = os.getuid()
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.pid in spared or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
        except (KeyError, AttributeError):
            continue
        if _belongs(proc, run_dir):
            found[proc.pid] = proc
    for rec in recorded:
        pid = int(rec.get("pid", 0))
        if pid in found or pid in spared or pid <= 1:
            continue
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - float(rec.get("create_time", -1))) < 0.05 and proc.uids().real == uid:
                found[pid] = proc
        except psutil.Error:
            continue
    return [p for p in found.values() if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_processes(procs: Sequence[psutil.Process], timeout: float = 10.0) -> list[str]:
    """SIGKILL ``procs`` and wait (at most ``timeout``) until they are gone; returns what was killed."""
    killed = []
    for proc in procs:
        try:
            text = describe(proc)
            proc.kill()
            killed.append(text)
        except psutil.Error:
            continue
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.05)
    return killed


class RunDir:
    """One run directory, locked by this process while it serves."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    # ----------------------------------------------------------------- owning it
    @classmethod
    def acquire(cls, path: str | os.PathLike[str]) -> "RunDir":
        """Create (mode 0700) and lock ``path``; :class:`RunDirBusy` when a live ``steady serve`` holds it,
        or when it is not a directory of this user (a symlink, someone else's folder in /tmp)."""
        path = Path(path)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirBusy(f"run_dir {path}: cannot create it: {exc.strerror}") from exc
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise RunDirBusy(f"run_dir {path} is not a directory owned by this user (uid {os.getuid()}): "
                             "choose another run_dir")
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            state = cls.read_state(path)
            who = f"pid {state['pid']}" if state.get("pid") else "another process"
            raise RunDirBusy(f"run_dir {path} is in use by a running steady serve ({who}): stop it first, or give "
                             "this one another port or run_dir") from None
        return cls(path, fd)

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1

    # ----------------------------------------------------------------- what the last run left
    @staticmethod
    def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
        try:
            data = json.loads((Path(path) / STATE_FILE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def leftovers(self) -> list[psutil.Process]:
        """Processes an earlier run of this directory left alive (the lock is ours, so none of them serves)."""
        state = self.read_state(self.path)
        recorded = [*state.get("processes", []), {"pid": state.get("pid", 0), "create_time": state.get("create_time", -1)}]
        return run_processes(self.path, recorded=recorded)

    def clean_leftovers(self, timeout: float = 10.0) -> list[str]:
        """Kill what an earlier run left behind, then drop old Ray sessions and HAProxy folders."""
        killed = kill_processes(self.leftovers(), timeout)
        for folder, pattern in ((self.path / "ray", "session_2*"), (self.path / "hap", "*")):
            old = sorted((p for p in folder.glob(pattern) if p.is_dir() and not p.is_symlink()),
                         key=lambda p: p.stat().st_mtime)
            for stale in old[:-KEEP_SESSIONS] if len(old) > KEEP_SESSIONS else []:
                shutil.rmtree(stale, ignore_errors=True)
        return killed

    # ----------------------------------------------------------------- what this run started
    def record(self, ports: dict[str, Any], *, main: psutil.Process | None = None) -> dict[str, Any]:
        """Write ``state.json``: this process, every process of the run and the ports it listens on."""
        main = main or psutil.Process()
        procs = {p.pid: p for p in [main, *main.children(recursive=True)]}
        for p in run_processes(self.path):
            procs.setdefault(p.pid, p)
        rows, listening = [], []
        for proc in procs.values():
            try:
                rows.append({"pid": proc.pid, "create_time": proc.create_time(), "name": proc.name()})
                for conn in proc.net_connections("inet"):
                    if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
                        listening.append({"pid": proc.pid, "address": f"{conn.laddr.ip}:{conn.laddr.port}",
                                          "proto": "tcp" if conn.type == socket.SOCK_STREAM else "udp"})
            except psutil.Error:
                continue
        state = {"pid": main.pid, "create_time": main.create_time(), "recorded_at": time.time(), "ports": ports,
                 "processes": rows, "listening": listening}
        tmp = self.path / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.path / STATE_FILE)
        return state


# --------------------------------------------------------------------- ports
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now and that this process has not handed out before.

    Once a probe socket is closed the kernel may give the same ephemeral port to the next probe, so two calls
    in a row could name one port twice (seen: ``port`` and ``metrics_port`` both 51217).
    """
    with _HANDED_OUT_LOCK:
        for _ in range(1000):
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise OSError(f"no free TCP port on {host} that was not handed out already")


@dataclass(frozen=True)
class PortUse:
    """A port this run will bind: the setting that chose it, the address and the port."""

    setting: str
    host: str
    port: int


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # like the servers that will bind it: connections in TIME_WAIT do not block a listener
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("" if host in ("0.0.0.0", "*") else host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str:
    """Who listens on TCP ``port`` (any address), as ``pid N (command line)``."""
    try:
        conns = psutil.net_connections("tcp")
    except psutil.Error:
        conns = []
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid:
                try:
                    return describe(psutil.Process(conn.pid))
                except psutil.Error:
                    return f"pid {conn.pid}"
            return "a process this user cannot see"
    return "a process this user cannot see (or a socket not yet released)"


def check_ports(uses: Sequence[PortUse], wait_s: float = 0.0) -> None:
    """:class:`PortInUse` (one line: port, setting, holder) for the first port of ``uses`` that stays
    taken for ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    for use in uses:
        while not _bindable(use.host, use.port):
            if time.monotonic() >= deadline:
                raise PortInUse(f"port {use.port} ({use.setting}, on {use.host}) is in use by "
                                f"{port_holder(use.port)}: stop it or choose another {use.setting}")
            time.sleep(0.1)
