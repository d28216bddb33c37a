"""``steady bench serve``: images/s served over HTTP against the in-process ceiling, in one run.

The ceiling is what a user gets with twenty lines of ONNX Runtime in their own process:
decode + the card's preprocessing + ``InferenceSession.run`` on the best batch size, the same
images, the same ONNX Runtime threads as the service, one Python thread. It is measured in
this process while the service sits idle, right before each served measurement and once
after the last, so ``ratio`` = served / ceiling compares numbers taken at the same moment on
a machine that may be busy with other work.

The load comes from ``wrk`` (one thread, ``--latency``, a Lua script cycling over the
request bodies) when it is on PATH, else from an aiohttp client; the client's own CPU use
is reported (``client_cpu``: cores used by the load generator), so a saturated client shows.

Memory is the sum over every process of the service (``steady serve`` and its descendants:
Ray's GCS, raylet, workers, the HAProxy ingress...): ``pss_mb`` counts shared pages once
(the honest total), ``rss_sum_mb`` counts them in every process (an upper bound).

Example:
    >>> doc = bench_serve(BenchOptions(repo="models", model="efficientnet-lite0",
    ...                                data="photos", concurrency=(1, 8, 32)))   # doctest: +SKIP
    >>> doc["runs"][1]["ratio"]                                                # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from service.core.errors import SteadyError
from service.core.images import IMAGE_SUFFIXES, is_image_file
from service.launcher import ServeProcess

__all__ = ["BenchOptions", "bench_serve", "latency_summary", "format_report", "make_large_photos", "memory_of",
           "cpu_times", "cpu_share", "image_paths", "run_wrk", "run_aiohttp", "check_answers"]
CEILING_BATCH_SIZES = (1, 4, 8, 16)
LARGE_SIZE = (4000, 3000)  # 12 MP, a phone photo


@dataclass(frozen=True)
class BenchOptions:
    """What ``steady bench serve`` measures.

    Attributes:
        repo, model, version: the served model (version None: production).
        data: folder of images (read by path, never copied).
        concurrency: connections held open by the load generator, one run each.
        duration_s: seconds per served run.
        url: an already running service (its base URL); None starts ``steady serve``.
        config: settings YAML handed to ``steady serve`` (and used for the ceiling's threads).
        max_images: images cycled through (sorted, the first N).
        large: also run with 12 MP JPEGs generated from the photos into a temp dir.
        ceiling_s: seconds per in-process ceiling measurement.
        client: ``wrk``, ``aiohttp`` or ``auto`` (wrk when on PATH).
        plain: also start :mod:`benchmarks.plain_server` (FastAPI + ONNX Runtime + Pillow, no batching) on
            the same version and drive it right after each served run, with the same client and images.
        compare_url: an already running plain server to drive the same way (instead of starting one).
        compare_version: another version the service serves (its production or candidate, e.g. an int8
            version of the same model), driven with ``?version=`` right after each served run; the
            served run then names its own version too, so no canary draw mixes the two.
    """

    repo: str
    model: str
    data: str
    version: int | None = None
    concurrency: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 15.0
    url: str | None = None
    config: str | None = None
    max_images: int = 64
    large: bool = False
    large_images: int = 8
    ceiling_s: float = 4.0
    client: str = "auto"
    warmup_s: float = 2.0
    extra: dict[str, Any] = field(default_factory=dict)
    plain: bool = False
    compare_url: str | None = None
    compare_version: int | None = None

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency must be integers >= 1, got {self.concurrency}")
        if self.duration_s <= 0 or self.ceiling_s <= 0:
            raise ValueError("duration and ceiling seconds must be > 0")
        if self.client not in ("auto", "wrk", "aiohttp"):
            raise ValueError(f"client must be auto, wrk or aiohttp, got {self.client!r}")


# ------------------------------------------------------------------------ statistics
def latency_summary(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 and mean in milliseconds (nearest-rank percentiles); None when empty."""
    if len(latencies_s) == 0:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.sort(np.asarray(latencies_s, dtype=np.float64)) * 1000.0
    n = len(arr)

    def rank(q: float) -> float:
        return float(arr[min(n - 1, max(0, int(np.ceil(q / 100.0 * n)) - 1))])

    return {"p50_ms": round(rank(50), 2), "p95_ms": round(rank(95), 2), "p99_ms": round(rank(99), 2),
            "mean_ms": round(float(arr.mean()), 2)}


# ------------------------------------------------------------------------ images
def image_paths(folder: str | os.PathLike[str], limit: int) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise SteadyError(f"image folder {folder} does not exist")
    paths = sorted(p for p in root.iterdir() if is_image_file(p))
    if not paths:
        raise SteadyError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths[:limit]


def make_large_photos(sources: Sequence[Path], out_dir: Path, count: int, size: tuple[int, int] = LARGE_SIZE,
                      quality: int = 90, seed: int = 0) -> list[Path]:
    """12 MP JPEGs (phone-photo size and entropy) made by upscaling real photos and adding sensor-like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for i, src in enumerate(list(sources)[:count]):
        with Image.open(src) as img:
            rgb = img.convert("RGB")
        w, h = size if rgb.width >= rgb.height else size[::-1]
        big = np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        noise = rng.integers(-6, 7, size=big.shape, dtype=np.int16)
        big = np.clip(big + noise, 0, 255).astype(np.uint8)
        path = out_dir / f"large_{i:02d}_{src.stem}.jpg"
        Image.fromarray(big).save(path, format="JPEG", quality=quality)
        made.append(path)
    return made


# ------------------------------------------------------------------------ in-process ceiling
class Ceiling:
    """The in-process pipeline a user would write: decode + preprocess + ONNX Runtime, one thread."""

    def __init__(self, repo_root: str, model: str, version: int, settings: Any) -> None:
        from service.catalog import load_version
        from service.core.repository import ModelRepository

        self.served = load_version(ModelRepository(repo_root), model, version, "production", settings)
        self.decode_threads = int(settings.decode_threads)

    def _batch(self, bodies: Sequence[bytes]) -> np.ndarray:
        pre = self.served.pre
        return self.served.classifier.logits(pre.batch(bodies))

    def top1(self, bodies: Sequence[bytes]) -> list[int]:
        return [int(np.argmax(self._batch([b])[0])) for b in bodies]

    def single_latency(self, bodies: Sequence[bytes], rounds: int = 2) -> dict[str, float | None]:
        """One image at a time, end to end (decode + preprocess + ORT batch 1)."""
        self._batch(bodies[:1])
        times = []
        for _ in range(rounds):
            for b in bodies:
                t0 = time.perf_counter()
                self._batch([b])
                times.append(time.perf_counter() - t0)
        return latency_summary(times)

    def throughput(self, bodies: Sequence[bytes], batch_size: int, seconds: float) -> dict[str, Any]:
        """The best in-process pipeline at ``batch_size``: the faster of one thread doing everything in
        turn (``sequential``) and ``decode_threads`` threads decoding the next batch while ONNX Runtime
        runs this one (``pipelined``, the thread budget the service has). Images/s and CPU ms per image."""
        runs = [self._sequential(bodies, batch_size, seconds / 2), self._pipelined(bodies, batch_size, seconds / 2)]
        best = dict(max(runs, key=lambda r: r["images_per_s"]))
        best.update({f"{r['mode']}_images_per_s": r["images_per_s"] for r in runs})
        return best

    def _sequential(self, bodies: Sequence[bytes], batch_size: int, seconds: float) -> dict[str, Any]:
        self._batch(bodies[:batch_size])
        n, i, t0, cpu0 = 0, 0, time.perf_counter(), time.process_time()
        while True:
            chunk = [bodies[(i + k) % len(bodies)] for k in range(batch_size)]
            i += batch_size
            self._batch(chunk)
            n += batch_size
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return _rate("sequential", n, elapsed, time.process_time() - cpu0)

    def _pipelined(self, bodies: Sequence[bytes], batch_size: int, seconds: float) -> dict[str, Any]:
        from concurrent.futures import ThreadPoolExecutor

        pre, clf = self.served.pre, self.served.classifier

        def pixels(body: bytes) -> np.ndarray:
            return pre.prepare(body).pixels

        with ThreadPoolExecutor(self.decode_threads) as pool:
            i = 0

            def submit() -> list[Any]:
                nonlocal i
                futures = [pool.submit(pixels, bodies[(i + k) % len(bodies)]) for k in range(batch_size)]
                i += batch_size
                return futures

            current = submit()
            n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
            while True:
                ahead = submit()
                clf.logits(pre.to_tensor([f.result() for f in current]))
                current = ahead
                n += batch_size
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    cpu = time.process_time() - cpu0
                    for f in current:
                        f.result()
                    return _rate("pipelined", n, elapsed, cpu)


def _rate(mode: str, images: int, seconds: float, cpu_s: float) -> dict[str, Any]:
    return {"mode": mode, "images_per_s": round(images / seconds, 2), "cpu_ms_per_image": round(1000 * cpu_s / images, 2)}


# ------------------------------------------------------------------------ the service's processes
def _name(proc: Any) -> str:
    """A short, stable name for a process of the service (Ray names its workers ``ray::<Actor>``)."""
    try:
        argv = proc.cmdline()
    except Exception:  # noqa: BLE001 - gone or not ours
        return "?"
    first = (argv[0] if argv else proc.name()).strip()
    if first.startswith("ray::"):
        return first.split(" ")[0][:48]
    name = os.path.basename(first.split(" ")[0])
    if name.startswith("python") and len(argv) > 1:
        script = next((a for a in argv[1:] if a and not a.startswith("-")), "")
        return f"python {os.path.basename(script)}"[:48]
    return name[:48]


def memory_of(procs: Sequence[Any]) -> dict[str, Any]:
    """PSS (shared pages split between processes) and RSS summed over ``procs`` (psutil), in MB."""
    pss = rss = 0
    counted = 0
    per: dict[str, float] = {}
    for proc in procs:
        try:
            mem = proc.memory_full_info()
        except Exception:  # noqa: BLE001 - gone, or not readable
            continue
        counted += 1
        pss += mem.pss
        rss += mem.rss
        name = _name(proc)
        per[name] = per.get(name, 0.0) + mem.pss / 2**20
    return {"pss_mb": round(pss / 2**20, 1), "rss_sum_mb": round(rss / 2**20, 1), "processes": counted,
            "pss_mb_by_process": {k: round(v, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}}


def cpu_times(procs: Sequence[Any]) -> dict[int, tuple[str, float]]:
    """pid -> (name, user + system CPU seconds)."""
    out = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
        except Exception:  # noqa: BLE001 - gone
            continue
        out[proc.pid] = (_name(proc), t.user + t.system)
    return out


def cpu_share(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float) -> dict[str, float]:
    """Cores used per process name between two :func:`cpu_times` snapshots (names using >= 0.005 core;
    ``total`` counts every process)."""
    used: dict[str, float] = {}
    for pid, (name, t) in after.items():
        delta = t - before.get(pid, (name, 0.0))[1]
        used[name] = used.get(name, 0.0) + delta / seconds
    shares = {k: round(v, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.005}
    return {"total": round(sum(used.values()), 3), **shares}


# ------------------------------------------------------------------------ load generators
_WRK_SCRIPT = """
local paths = {%(paths)s}
local bodies = {}
local headers = {["Content-Type"] = "image/jpeg"}
local i = 0
init = function(args)
  for k, p in ipairs(paths) do
    local f = assert(io.open(p, "rb")); bodies[k] = f:read("*all"); f:close()
  end
end
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", nil, headers, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "STEADY_JSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, \\"p95_us\\": %%d, \\"p99_us\\": %%d, " ..
    "\\"mean_us\\": %%f, \\"connect\\": %%d, \\"read\\": %%d, \\"write\\": %%d, \\"status\\": %%d, \\"timeout\\": %%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def run_wrk(url: str, paths: Sequence[Path], concurrency: int, duration_s: float, workdir: Path,
            threads: int = 1) -> dict[str, Any]:
    """One wrk run (``threads`` threads, ``concurrency`` connections); client CPU from the child's rusage."""
    script = workdir / "steady-bench.lua"
    script.write_text(_WRK_SCRIPT % {"paths": ", ".join(json.dumps(str(p)) for p in paths)})
    secs = max(1, int(round(duration_s)))
    cmd = ["wrk", f"-t{max(1, min(threads, concurrency))}", f"-c{concurrency}", f"-d{secs}s", "--timeout", "30s", "-s", str(script), url]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((ln for ln in out.splitlines() if ln.startswith("STEADY_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise SteadyError(f"wrk failed ({proc.returncode}): {out[-1500:]}")
    data = json.loads(line[len("STEADY_JSON "):])
    seconds = data["duration_us"] / 1e6
    errors = data["connect"] + data["read"] + data["write"] + data["timeout"]
    return {
        "client": "wrk", "requests": data["requests"], "seconds": round(seconds, 2),
        "images_per_s": round(data["requests"] / seconds, 2),
        "p50_ms": round(data["p50_us"] / 1000, 2), "p95_ms": round(data["p95_us"] / 1000, 2),
        "p99_ms": round(data["p99_us"] / 1000, 2), "mean_ms": round(data["mean_us"] / 1000, 2),
        "non_2xx": data["status"], "socket_errors": errors,
        "client_cpu": round((usage.ru_utime + usage.ru_stime) / wall, 3),
    }


def run_aiohttp(url: str, paths: Sequence[Path], concurrency: int, duration_s: float) -> dict[str, Any]:
    """The fallback client: ``concurrency`` aiohttp workers on keep-alive connections."""
    bodies = [p.read_bytes() for p in paths]

    async def main() -> tuple[list[float], int, int, float]:
        import aiohttp

        latencies: list[float] = []
        bad = [0, 0]
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            end = time.perf_counter() + duration_s
            counter = [0]

            async def worker() -> None:
                while time.perf_counter() < end:
                    body = bodies[counter[0] % len(bodies)]
                    counter[0] += 1
                    t0 = time.perf_counter()
                    try:
                        async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as r:
                            await r.read()
                            if r.status >= 300:
                                bad[0] += 1
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        bad[1] += 1
                        continue
                    latencies.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return latencies, bad[0], bad[1], time.perf_counter() - t0

    cpu0 = time.process_time()
    latencies, non2xx, errors, seconds = asyncio.run(main())
    client_cpu = (time.process_time() - cpu0) / seconds
    return {"client": "aiohttp", "requests": len(latencies), "seconds": round(seconds, 2),
            "images_per_s": round(len(latencies) / seconds, 2), **latency_summary(latencies),
            "non_2xx": non2xx, "socket_errors": errors, "client_cpu": round(client_cpu, 3)}


# ------------------------------------------------------------------------ the plain comparison
class PlainServer:
    """:mod:`benchmarks.plain_server` in a child process on a free loopback port."""

    def __init__(self, version_dir: Path, log: Path, threads: int = 0) -> None:
        from service.launcher import free_port

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.plain_server", str(version_dir),
                                      "--port", str(self.port), "--threads", str(threads)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise SteadyError(f"the plain server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.base}/v2/health/ready", timeout=2.0).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SteadyError(f"the plain server was not ready within {timeout_s:.0f} s")

    def processes(self) -> list[Any]:
        import psutil

        try:
            return [psutil.Process(self.proc.pid)]
        except psutil.Error:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _served_run(load: Any, c: int, seconds: float, procs: Sequence[Any]) -> tuple[dict[str, Any], dict[str, float] | None,
                                                                                   float | None]:
    """One load run: (client result, cores used per process name, CPU ms per image over ``procs``)."""
    cpu0, t0 = cpu_times(procs), time.perf_counter()
    served = load(c, seconds)
    elapsed = time.perf_counter() - t0
    cores = cpu_share(cpu0, cpu_times(procs), elapsed) if procs else None
    ms = round(1000 * cores["total"] * elapsed / max(1, served["requests"]), 2) if cores else None
    return served, cores, ms


# ------------------------------------------------------------------------ the benchmark
def _settings(opts: BenchOptions) -> Any:
    from service.settings import ServeSettings

    return ServeSettings.build(opts.repo, config=opts.config, environ={}, overrides=opts.extra)


def check_answers(url: str, bodies: Sequence[bytes], expected: Sequence[int]) -> float:
    """Share of images whose served top-1 equals the in-process top-1 (the two must agree). A ``version`` in
    the URL's query must be the version that answers."""
    import httpx

    target = httpx.URL(url)
    asked = target.params.get("version")
    target = target.copy_merge_params({"top_k": 1})  # keeps the URL's own query
    same = 0
    with httpx.Client(timeout=60) as client:
        for body, want in zip(bodies, expected):
            r = client.post(target, content=body, headers={"Content-Type": "image/jpeg"})
            if r.status_code != 200:
                raise SteadyError(f"served classify ({target}) answered {r.status_code}: {r.text[:300]}")
            doc = r.json()
            if asked is not None and "version" in doc and str(doc["version"]) != asked:
                raise SteadyError(f"asked for version {asked}, version {doc['version']} answered")
            same += int(doc["predictions"][0]["index"] == want)
    return same / max(1, len(bodies))


def _image_set(name: str, paths: Sequence[Path], opts: BenchOptions, ceiling: Ceiling, url: str,
               service: ServeProcess | None, workdir: Path, log: Any, plain_url: str | None = None,
               plain: PlainServer | None = None, version_url: str | None = None) -> dict[str, Any]:
    bodies = [p.read_bytes() for p in paths]
    client = opts.client if opts.client != "auto" else ("wrk" if shutil.which("wrk") else "aiohttp")
    log(f"[{name}] {len(paths)} images, mean {np.mean([len(b) for b in bodies]) / 1024:.0f} KiB; client {client}")
    agreement = check_answers(url, bodies, ceiling.top1(bodies))
    single_before = ceiling.single_latency(bodies[: min(len(bodies), 32)])
    log(f"[{name}] served top-1 == in-process top-1 on {agreement:.1%}; in-process single image p50 "
        f"{single_before['p50_ms']} ms")
    pids = service.processes() if service else []
    idle0, t_idle = cpu_times(pids), time.perf_counter()
    sweep = {b: ceiling.throughput(bodies, b, opts.ceiling_s / 2) for b in CEILING_BATCH_SIZES}
    idle = cpu_share(idle0, cpu_times(pids), time.perf_counter() - t_idle) if service else None  # no traffic
    best = max(sweep, key=lambda b: sweep[b]["images_per_s"])
    log(f"[{name}] ceiling sweep (images/s by batch size): "
        f"{ {b: (r['images_per_s'], r['mode']) for b, r in sweep.items()} }; best {best}")

    def loader(target: str) -> Any:
        def load(c: int, seconds: float) -> dict[str, Any]:
            if client == "wrk":
                return run_wrk(target, paths, c, seconds, workdir)
            return run_aiohttp(target, paths, c, seconds)
        return load

    load = loader(url)
    load(max(opts.concurrency), opts.warmup_s)  # warm connections, batches, caches
    plain_load = loader(plain_url) if plain_url else None
    plain_agreement = None
    if plain_load is not None:
        plain_agreement = check_answers(plain_url, bodies, ceiling.top1(bodies))  # type: ignore[arg-type]
        log(f"[{name}] plain server top-1 == in-process top-1 on {plain_agreement:.1%} (its own resize + crop)")
        plain_load(max(opts.concurrency), opts.warmup_s)
    version_load = loader(version_url) if version_url else None
    version_agreement = None
    if version_load is not None:
        version_agreement = check_answers(version_url, bodies, ceiling.top1(bodies))  # type: ignore[arg-type]
        log(f"[{name}] version {opts.compare_version}: top-1 == version {ceiling.served.version} in-process on "
            f"{version_agreement:.1%}")
        version_load(max(opts.concurrency), opts.warmup_s)
    runs = []
    before = ceiling.throughput(bodies, best, opts.ceiling_s)
    for c in opts.concurrency:
        pids = service.processes() if service else []
        served, service_cpu, service_ms = _served_run(load, c, opts.duration_s, pids)
        plain_run = None
        if plain_load is not None:  # the same client, images and concurrency, right after
            p_served, p_cpu, p_ms = _served_run(plain_load, c, opts.duration_s, plain.processes() if plain else [])
            plain_run = {**p_served, "cpu_cores": p_cpu, "cpu_ms_per_image": p_ms}
        version_run = None
        if version_load is not None:  # the other version, same service, client, images and concurrency
            v_served, v_cpu, v_ms = _served_run(version_load, c, opts.duration_s, pids)
            version_run = {"version": opts.compare_version, **v_served, "service_cpu_cores": v_cpu,
                           "service_cpu_ms_per_image": v_ms}
            if v_served["non_2xx"] or v_served["socket_errors"]:  # answers per second of errors are no figure
                raise SteadyError(f"version {opts.compare_version} answered {v_served['non_2xx']} non-2xx and "
                                  f"{v_served['socket_errors']} socket errors at c={c}: is it this service's "
                                  "production or candidate?")
        after = ceiling.throughput(bodies, best, opts.ceiling_s)
        ceil = (before["images_per_s"] + after["images_per_s"]) / 2
        run = {"concurrency": c, **served, "ceiling_images_per_s": round(ceil, 2),
               "ceiling_before": before, "ceiling_after": after,
               "ratio": round(served["images_per_s"] / ceil, 3), "service_cpu_cores": service_cpu,
               # contention-proof efficiency: CPU spent per image, by the whole service vs in-process
               "service_cpu_ms_per_image": service_ms,
               "ceiling_cpu_ms_per_image": round((before["cpu_ms_per_image"] + after["cpu_ms_per_image"]) / 2, 2)}
        # the same ratio counted in CPU time: unaffected by how much CPU other work on the machine takes
        run["cpu_ratio"] = (round(run["ceiling_cpu_ms_per_image"] / run["service_cpu_ms_per_image"], 3)
                            if run["service_cpu_ms_per_image"] else None)
        if version_run is not None:
            run["compare_version"] = version_run
            run["version_vs_main"] = round(version_run["images_per_s"] / max(served["images_per_s"], 1e-9), 3)
            log(f"[{name}] c={c}: version {opts.compare_version} served {version_run['images_per_s']} img/s, "
                f"{run['version_vs_main']}x version {ceiling.served.version}; CPU ms/image "
                f"{version_run['service_cpu_ms_per_image']}")
        if plain_run is not None:
            run["plain"] = plain_run
            run["vs_plain"] = round(served["images_per_s"] / max(plain_run["images_per_s"], 1e-9), 3)
            run["plain_ratio"] = round(plain_run["images_per_s"] / ceil, 3)
            if plain_run["cpu_ms_per_image"] and run["service_cpu_ms_per_image"]:
                run["vs_plain_cpu"] = round(plain_run["cpu_ms_per_image"] / run["service_cpu_ms_per_image"], 3)
            log(f"[{name}] c={c}: plain server {plain_run['images_per_s']} img/s (ratio {run['plain_ratio']}), "
                f"CPU ms/image {plain_run['cpu_ms_per_image']}; Steady / plain {run['vs_plain']} "
                f"(CPU: {run.get('vs_plain_cpu')})")
        log(f"[{name}] c={c}: served {served['images_per_s']} img/s, ceiling {ceil:.1f}, ratio {run['ratio']}, "
            f"p50/p95/p99 {served['p50_ms']}/{served['p95_ms']}/{served['p99_ms']} ms, "
            f"client {served['client_cpu']} core, errors {served['non_2xx'] + served['socket_errors']}; CPU ms/image "
            f"service {run['service_cpu_ms_per_image']} vs in-process {run['ceiling_cpu_ms_per_image']}")
        runs.append(run)
        before = after
    # single-image latency before and after the served runs, so a busy machine shows in both
    single_after = ceiling.single_latency(bodies[: min(len(bodies), 32)])
    single = {k: (round((single_before[k] + single_after[k]) / 2, 2) if single_before[k] is not None else None)
              for k in single_before}
    return {
        "name": name, "images": len(paths), "mean_bytes": int(np.mean([len(b) for b in bodies])),
        "top1_agreement": round(agreement, 4), "plain_top1_agreement": plain_agreement,
        "compare_version_top1_agreement": version_agreement, "single_image_ms": single,
        "single_image_ms_before_after": [single_before, single_after],
        "ceiling_by_batch_size": {str(k): v for k, v in sweep.items()}, "ceiling_batch_size": best,
        "service_idle_cpu_cores": idle,
        "runs": runs,
        "p50_c1_minus_single_ms": next((round(r["p50_ms"] - single["p50_ms"], 2) for r in runs
                                        if r["concurrency"] == 1 and single["p50_ms"] is not None), None),
    }


def bench_serve(opts: BenchOptions, log: Any = None) -> dict[str, Any]:
    """Start (or reach) the service, measure served and ceiling side by side; the result document."""
    from service.core.repository import ModelRepository

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    repo = ModelRepository(opts.repo)
    version = repo.resolve(opts.model, opts.version)
    settings = _settings(opts)
    paths = image_paths(opts.data, opts.max_images)
    load_avg_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="steady-bench-") as tmp:
        workdir = Path(tmp)
        service: ServeProcess | None = None
        plain: PlainServer | None = None
        memory: dict[str, Any] | None = None
        try:
            plain_url = opts.compare_url.rstrip("/") if opts.compare_url else None
            if opts.plain and not plain_url:
                plain = PlainServer(repo.version_dir(opts.model, version), workdir / "plain.log",
                                    threads=int(settings.ort_threads))
                log(f"plain server ready in {plain.wait_ready():.1f} s")
                plain_url = plain.base
            if plain_url:
                plain_url = f"{plain_url}/v1/models/{opts.model}:classify"
            if opts.url:
                base = opts.url.rstrip("/")
                import httpx

                if httpx.get(f"{base}/v2/health/ready", timeout=5.0).status_code != 200:
                    raise SteadyError(f"{base}/v2/health/ready is not 200")
                ready_s = None
            else:
                log("starting steady serve ...")
                service = ServeProcess.start({"repo": str(opts.repo)}, workdir / "serve.log", config=opts.config)
                ready_s = service.wait_ready()
                base = service.base
                log(f"ready in {ready_s:.1f} s (from launching `steady serve` to /v2/health/ready == 200)")
            url = f"{base}/v1/models/{opts.model}:classify"
            version_url = None
            if opts.compare_version is not None:
                version_url = f"{url}?version={opts.compare_version}"
                url = f"{url}?version={version}"
            ceiling = Ceiling(str(opts.repo), opts.model, version, settings)
            sets = [_image_set("photos", paths, opts, ceiling, url, service, workdir, log, plain_url, plain,
                               version_url)]
            if service:
                memory = memory_of(service.processes())
                log(f"service memory: PSS {memory['pss_mb']} MB over {memory['processes']} processes "
                    f"(RSS sum {memory['rss_sum_mb']} MB)")
            if opts.large:
                log(f"generating {opts.large_images} 12 MP JPEGs ...")
                large = make_large_photos(paths, workdir / "large", opts.large_images)
                sets.append(_image_set("large-12mp", large, opts, ceiling, url, service, workdir, log, plain_url, plain,
                                       version_url))
            if service:
                after = memory_of(service.processes())
                if memory is None or after["pss_mb"] > memory["pss_mb"]:
                    memory = after
        finally:
            if plain:
                plain.stop()
            if service:
                service.stop()
                service.cleanup()
    return {
        "model": opts.model, "version": version, "precision": repo.card(opts.model, version).precision,
        "url": opts.url or "started by the benchmark",
        "settings": {k: getattr(settings, k) for k in ("max_batch_size", "batch_wait_timeout_s", "ort_threads",
                                                          "decode_threads", "replica_cpus", "num_replicas",
                                                          "proxy", "live_fraction")},
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_avg_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "ready_s": round(ready_s, 2) if ready_s is not None else None,
        "memory": memory,
        "image_sets": sets,
        # the headline numbers: the photo set
        "runs": sets[0]["runs"],
        "ratio": {str(r["concurrency"]): r["ratio"] for r in sets[0]["runs"]},
        "cpu_ratio": {str(r["concurrency"]): r["cpu_ratio"] for r in sets[0]["runs"]},
        "vs_plain": {str(r["concurrency"]): r["vs_plain"] for r in sets[0]["runs"] if "vs_plain" in r} or None,
        "compare_version": None if opts.compare_version is None else {
            "version": opts.compare_version,
            "precision": repo.card(opts.model, opts.compare_version).precision,
            "vs_main": {str(r["concurrency"]): r["version_vs_main"] for r in sets[0]["runs"]}},
        "single_image_ms": sets[0]["single_image_ms"]["p50_ms"],
    }


def format_report(doc: dict[str, Any]) -> str:
    lines = [f"steady bench serve: {doc['model']} v{doc['version']} ({doc.get('precision')}) on {doc['cpus']} CPUs "
             f"(load {doc['load_average_before'][0]} -> {doc['load_average_after'][0]})"]
    if doc["ready_s"] is not None:
        lines.append(f"ready {doc['ready_s']} s")
    if doc["memory"]:
        m = doc["memory"]
        lines.append(f"memory: PSS {m['pss_mb']} MB (RSS sum {m['rss_sum_mb']} MB) over {m['processes']} processes")
    for s in doc["image_sets"]:
        lines.append(f"\n[{s['name']}] {s['images']} images, mean {s['mean_bytes'] // 1024} KiB; "
                     f"in-process single image p50 {s['single_image_ms']['p50_ms']} ms; "
                     f"ceiling batch {s['ceiling_batch_size']}; top-1 agreement {s['top1_agreement']:.1%}")
        lines.append(f"{'conc':>5} {'served/s':>9} {'ceiling/s':>9} {'ratio':>6} {'p50 ms':>8} {'p95 ms':>8} "
                     f"{'p99 ms':>8} {'errors':>6} {'client':>7} {'cpu ms/img svc/ceil':>20}")
        for r in s["runs"]:
            lines.append(f"{r['concurrency']:>5} {r['images_per_s']:>9.1f} {r['ceiling_images_per_s']:>9.1f} "
                         f"{r['ratio']:>6.3f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                         f"{r['non_2xx'] + r['socket_errors']:>6} {r['client_cpu']:>7.3f} "
                         f"{str(r['service_cpu_ms_per_image']) + ' / ' + str(r['ceiling_cpu_ms_per_image']):>20}")
            if "compare_version" in r:
                vr = r["compare_version"]
                lines.append(f"{'v' + str(vr['version']):>5} {vr['images_per_s']:>9.1f} {'':>9} {'':>6} "
                             f"{vr['p50_ms']:>8.1f} {vr['p95_ms']:>8.1f} {vr['p99_ms']:>8.1f} "
                             f"{vr['non_2xx'] + vr['socket_errors']:>6} {vr['client_cpu']:>7.3f} "
                             f"{str(vr['service_cpu_ms_per_image']):>20}   {r['version_vs_main']}x v{doc['version']}")
            if "plain" in r:
                pr = r["plain"]
                lines.append(f"{'plain':>5} {pr['images_per_s']:>9.1f} {'':>9} {r['plain_ratio']:>6.3f} "
                             f"{pr['p50_ms']:>8.1f} {pr['p95_ms']:>8.1f} {pr['p99_ms']:>8.1f} "
                             f"{pr['non_2xx'] + pr['socket_errors']:>6} {pr['client_cpu']:>7.3f} "
                             f"{str(pr['cpu_ms_per_image']):>20}   Steady/plain {r['vs_plain']}")
    return "\n".join(lines)
