"""The run directory: only this directory's leftovers are cleaned up; busy ports name their holder. No Ray."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from service.core.errors import InvalidInput, PortInUse, RunDirBusy
from service.rundir import MARKER, PortUse, RunDir, check_ports, free_port, port_holder, run_processes
from service.settings import ServeSettings

SLEEP = "import time; time.sleep(120)"


@pytest.fixture()
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(10)


def _sleeper(procs: list[subprocess.Popen[bytes]], *args: str, marker: str | None = None,
             program: str = sys.executable) -> psutil.Process:
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    if marker:
        env[MARKER] = marker
    p = subprocess.Popen([program, "-c", SLEEP, *args], env=env)
    procs.append(p)
    proc = psutil.Process(p.pid)
    for _ in range(100):  # until it has exec'ed (cmdline and environment readable)
        if proc.cmdline()[:1] == [program]:
            break
        time.sleep(0.01)
    return proc


def test_clean_up_kills_only_what_this_run_directory_started(tmp_path: Path, spawned: list) -> None:
    run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")
    fake_haproxy = tmp_path / "haproxy"  # a program called haproxy, like Ray's bundled binary
    fake_haproxy.symlink_to(sys.executable)
    ray_worker_a = _sleeper(spawned, marker=run_a)
    haproxy_a = _sleeper(spawned, "-db", "-f", f"{run_a}/hap/node/haproxy.cfg", program=str(fake_haproxy))
    others = [
        _sleeper(spawned, marker=run_b),  # another run directory's Ray
        _sleeper(spawned, "-db", "-f", f"{run_b}/hap/node/haproxy.cfg", program=str(fake_haproxy)),
        _sleeper(spawned, "-db", "-f", "/tmp/haproxy-serve/node/haproxy.cfg", program=str(fake_haproxy)),  # Ray's default
        _sleeper(spawned, f"{run_a}/ray/session_latest/logs/raylet.out"),  # e.g. someone's `tail -f` of a log
        _sleeper(spawned, marker=run_a + "x"),
    ]
    assert {p.pid for p in run_processes(run_a)} == {ray_worker_a.pid, haproxy_a.pid}
    run = RunDir.acquire(run_a)
    try:
        killed = run.clean_leftovers(timeout=10)
    finally:
        run.release()
    assert len(killed) == 2 and all("pid" in k for k in killed)
    assert not ray_worker_a.is_running() or ray_worker_a.status() == psutil.STATUS_ZOMBIE
    assert not haproxy_a.is_running() or haproxy_a.status() == psutil.STATUS_ZOMBIE
    for proc in others:
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE, proc.cmdline()


def test_recorded_pids_count_only_with_their_start_time(tmp_path: Path, spawned: list) -> None:
    run = RunDir.acquire(tmp_path / "run")
    try:
        stranger = _sleeper(spawned)  # no marker: only the record can name it
        record = {"pid": stranger.pid, "create_time": stranger.create_time() - 100.0}  # a reused pid
        (run.path / "state.json").write_text(json.dumps({"pid": 0, "processes": [record]}))
        assert run.leftovers() == []
        record["create_time"] = stranger.create_time()
        (run.path / "state.json").write_text(json.dumps({"pid": 0, "processes": [record]}))
        assert [p.pid for p in run.leftovers()] == [stranger.pid]
    finally:
        run.release()


def test_a_live_owner_keeps_the_run_directory(tmp_path: Path) -> None:
    first = RunDir.acquire(tmp_path / "run")
    first.record({"port": 1234})
    with pytest.raises(RunDirBusy, match=rf"in use by a running steady serve \(pid {os.getpid()}\)"):
        RunDir.acquire(tmp_path / "run")
    state = RunDir.read_state(tmp_path / "run")
    assert state["ports"] == {"port": 1234} and state["pid"] == os.getpid()
    assert any(p["pid"] == os.getpid() for p in state["processes"])
    first.release()
    RunDir.acquire(tmp_path / "run").release()  # free again once the owner is gone


def test_a_symlinked_run_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunDirBusy, match="not a directory owned by this user"):
        RunDir.acquire(tmp_path / "run")


def test_a_taken_port_names_its_holder(spawned: list) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (f"import socket, time\ns = socket.socket(); s.bind(('0.0.0.0', {port})); s.listen()\n"  # newlines too
            "print('up', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    spawned.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"up"
    assert port_holder(port).startswith(f"pid {holder.pid} (")
    # a listener on every interface also blocks a loopback bind
    with pytest.raises(PortInUse) as info:
        check_ports([PortUse("haproxy_stats_port", "127.0.0.1", port)])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"port {port} (haproxy_stats_port, on 127.0.0.1) is in use by pid {holder.pid} (")
    assert message.endswith("stop it or choose another haproxy_stats_port")


def test_free_port_never_names_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may give a closed probe's port to the next probe: free_port skips what it handed out."""
    from service import rundir

    given = [free_port() for _ in range(200)]
    assert len(set(given)) == len(given)
    ports = iter([given[0], given[0], given[1], 50999])

    class Probe:
        def __enter__(self) -> "Probe":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, address: tuple[str, int]) -> None:
            self.port = next(ports)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(rundir.socket, "socket", Probe)
    monkeypatch.setattr(rundir, "_HANDED_OUT", set(given[:2]))
    assert free_port() == 50999


def test_free_ports_pass_and_time_wait_does_not_count() -> None:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end stays in TIME_WAIT
        client.close()
    check_ports([PortUse("port", "127.0.0.1", port)])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"run_dir": "relative/run"}, "run_dir must be an absolute path of at most 32 characters"),
    ({"run_dir": "/tmp/" + "x" * 40}, "run_dir must be an absolute path of at most 32 characters"),
    ({"port": 9000, "haproxy_metrics_port": 9000}, "port and haproxy_metrics_port are both 9000"),
    ({"drain_timeout_s": 0.5}, "drain_timeout_s"),
])
def test_settings_of_a_run_are_validated(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ServeSettings.build("/models", environ={}, overrides=overrides)
