"""Load on ``dia2-rt serve``: throughput, time to first audio, queueing, cancellation and memory.

    python -m dia2_trt.benchmarks.serve_load --artifacts DIR [--workers 2] [--max-queue 6] [--clients 32]
        [--rounds 3] [--disconnects 50] [--rss-requests 300] [--out serve-load.json]
    python -m dia2_trt.benchmarks.serve_load --artifacts DIR --compare-batched 8 [--workers 2] [--clients 32]

Starts the real server (a subprocess on a free loopback port), then:

0. five requests one at a time: time to first audio with no queue;
1. ``--rounds`` bursts of ``--clients`` concurrent ``/v1/audio/speech`` requests (several
   scripts and seeds); every 200 must equal that request's solo run (generated here, in this
   process, with the same runtime code) sample for sample; the rest must be clean 503s with
   Retry-After. Reports requests/s, audio-seconds/s, p50/p95 client-side time to first audio
   (request sent -> first body byte), the deepest queue seen and the server's queue-wait figures.
2. ``--disconnects`` clients that hang up after their first audio chunk: afterwards no worker
   may stay busy.
3. RSS of the server after 30 and after ``--rss-requests`` requests.
4. ``/healthz`` latency while ``--flood-clients`` clients post 1 MiB JSON bodies in a loop (a
   second server, taking 2 MiB bodies so each one is read, decoded and checked): the event
   loop must stay free for everything else while requests are parsed.

With ``--compare-batched N`` only step 1 runs, on two servers up side by side: ``--workers W``
(each stream stepped alone, today's default) and ``--max-streams N`` (every stream of the batch in
one graph call per frame), their bursts alternating; it reports both, the ratios, and the batched
engine's mean streams per frame and ms per frame (from its /metrics).

Timings on a shared machine are disturbed by whatever else runs; the figures are for
comparing configurations measured in one run, not absolute claims.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

LOOPBACK = "127.0.0.1"
SCRIPTS = (
    ("[S1] Hello there, how are you? [S2] I am fine, thanks.", 0),
    ("[S1] Hello there, how are you? [S2] I am fine, thanks.", 1),
    ("[S2] Just one speaker, talking for a while.", 2),
    ('[S1] Wait for it. <break time="0.4s"/> Now. [S2] Okay!', 3),
)
LONG = ("[S1] This is a longer script, so that every client can hang up while its audio is still "
        "being generated. [S2] And so it goes on.")
SHORT = "[S1] Hi there."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``dia2-rt serve`` in a subprocess on a free loopback port."""

    def __init__(self, artifacts: Path, workers: int, max_queue: int, *extra: str,
                 max_streams: int | None = None) -> None:
        """``max_streams``: serve that many streams as one batch (``--max-streams``) instead of
        ``workers`` streams each stepped alone."""
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        code = "from dia2_trt.runtime.cli import main; main()"
        slots = ["--max-streams", str(max_streams)] if max_streams else ["--workers", str(workers)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--artifacts", str(artifacts), "--port", str(self.port),
             *slots, "--max-queue", str(max_queue), "--threads", "1", "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, seconds: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                assert self.proc.stdout is not None  # stdout=PIPE
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not come up")

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def health(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=10).json()

    def metrics(self) -> dict[str, float]:
        """The unlabelled and labelled samples of /metrics, by their full name."""
        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, seconds: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def solo_audio(artifacts: Path) -> dict[tuple[str, int], bytes]:
    """Each (script, seed)'s audio generated alone, as s16le bytes (what the server must send)."""
    from dia2_trt.runtime import Dia2Runtime, GenerationParams
    from dia2_trt.runtime.audio import pcm16

    runtime = Dia2Runtime.load(artifacts, threads=1, max_streams=1)  # each session stepped alone
    return {(text, seed): pcm16(runtime.speak(text, GenerationParams(seed=seed)).pcm) for text, seed in SCRIPTS}


@dataclass
class Outcome:
    key: tuple[str, int]
    status: int
    body: bytes = b""
    first_byte: float | None = None  # seconds from sending to the first body byte
    seconds: float = 0.0
    retry_after: str | None = None


async def speak(client: httpx.AsyncClient, url: str, text: str, seed: int) -> Outcome:
    began = time.perf_counter()
    body = {"model": "dia2", "input": text, "voice": "alloy", "response_format": "pcm", "seed": seed}
    async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
        parts, first = [], None
        async for part in response.aiter_raw():
            if first is None:
                first = time.perf_counter() - began
            parts.append(part)
        return Outcome((text, seed), response.status_code, b"".join(parts), first,
                       time.perf_counter() - began, response.headers.get("retry-after"))


def first_byte(outcome: Outcome) -> float:
    """A served request's time to first audio."""
    assert outcome.first_byte is not None  # a 200 streams audio, so a first byte arrived
    return outcome.first_byte


async def burst(url: str, clients: int) -> list[Outcome]:
    """``clients`` requests at once, cycling through SCRIPTS."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        jobs = [speak(client, url, *SCRIPTS[i % len(SCRIPTS)]) for i in range(clients)]
        return await asyncio.gather(*jobs)


async def hang_up_after_first_chunk(url: str, clients: int) -> dict[str, int]:
    """``clients`` streaming requests that each close the connection after their first audio bytes."""

    async def one(client: httpx.AsyncClient) -> int:
        body = {"model": "dia2", "input": LONG, "voice": "alloy", "response_format": "pcm"}
        async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
            if response.status_code == 200:
                async for _ in response.aiter_raw():
                    break  # leaving the block closes this connection mid-stream
            return response.status_code

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        statuses = await asyncio.gather(*[one(client) for _ in range(clients)])
    return {str(status): statuses.count(status) for status in sorted(set(statuses))}


async def sequential_load(url: str, requests: int, concurrency: int) -> None:
    """``requests`` short requests, ``concurrency`` at a time (no more than the server admits)."""
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for start in range(0, requests, concurrency):
            count = min(concurrency, requests - start)
            outcomes = await asyncio.gather(*[speak(client, url, SHORT, i) for i in range(count)])
            bad = [o.status for o in outcomes if o.status != 200]
            if bad:
                raise RuntimeError(f"requests failed under admitted load: {bad}")


class QueuePoller:
    """Samples /healthz in the background: the deepest queue and most busy workers seen."""

    def __init__(self, url: str) -> None:
        self.url, self.max_queued, self.max_busy = url, 0, 0
        self._task: asyncio.Future | None = None

    async def __aenter__(self) -> QueuePoller:
        self._task = asyncio.ensure_future(self._poll())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None  # __aenter__ started it
        self._task.cancel()

    async def _poll(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                health = (await client.get(f"{self.url}/healthz")).json()
                self.max_queued = max(self.max_queued, health["queued"])
                self.max_busy = max(self.max_busy, health["busy"])
                await asyncio.sleep(0.02)


@dataclass
class LoadReport:
    served: int = 0
    refused: int = 0
    mismatched: int = 0
    other: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    audio_seconds: float = 0.0
    ttfa: list[float] = field(default_factory=list)
    retry_after: list[str | None] = field(default_factory=list)  # None: a 503 without Retry-After


def check_burst(outcomes: list[Outcome], solo: dict, sample_rate: int, report: LoadReport) -> None:
    for outcome in outcomes:
        if outcome.status == 200:
            report.served += 1
            report.mismatched += outcome.body != solo[outcome.key]
            report.audio_seconds += len(outcome.body) / 2 / sample_rate
            report.ttfa.append(first_byte(outcome))
        elif outcome.status == 503:
            report.refused += 1
            report.retry_after.append(outcome.retry_after)
        else:
            report.other.append(outcome.status)


async def measure(server: ServerProcess, solo: dict, clients: int, rounds: int) -> tuple[LoadReport, QueuePoller]:
    report, sample_rate = LoadReport(), server.health()["sample_rate"]
    async with QueuePoller(server.url) as poller:
        began = time.perf_counter()
        for _ in range(rounds):
            check_burst(await burst(server.url, clients), solo, sample_rate, report)
        report.wall_seconds = time.perf_counter() - began
    return report, poller


def summarise(report: LoadReport, poller: QueuePoller, metrics: dict[str, float]) -> dict:
    ttfa = np.asarray(report.ttfa) if report.ttfa else np.zeros(1)
    waits = metrics.get("dia2_queue_wait_seconds_count", 0.0)
    return {
        "served": report.served, "refused_503": report.refused, "mismatched": report.mismatched,
        "other_statuses": report.other, "retry_after_values": sorted(set(report.retry_after), key=str),
        "requests_per_second": report.served / report.wall_seconds,
        "audio_seconds_per_second": report.audio_seconds / report.wall_seconds,
        "ttfa_p50_seconds": float(np.percentile(ttfa, 50)), "ttfa_p95_seconds": float(np.percentile(ttfa, 95)),
        "max_queue_depth_seen": poller.max_queued, "max_busy_workers_seen": poller.max_busy,
        "mean_queue_wait_seconds": metrics.get("dia2_queue_wait_seconds_sum", 0.0) / waits if waits else 0.0,
    }


def engine_figures(metrics: dict[str, float]) -> dict:
    """A batched server's engine, from /metrics: mean streams per frame and ms per frame."""
    frames = metrics.get("dia2_engine_frames_total", 0.0)
    if not frames:
        return {}
    return {"frames": int(frames),
            "mean_streams_per_frame": metrics["dia2_engine_streams_stepped_total"] / frames,
            "ms_per_frame": 1000 * metrics["dia2_engine_frame_seconds_total"] / frames,
            "slots": int(metrics["dia2_engine_slots"])}


def compare(args) -> dict:
    """``--workers W`` (each stream stepped alone) against ``--max-streams N`` (one batch), both
    servers up together and their bursts alternating, so drift on a shared machine hits both."""
    solo = solo_audio(args.artifacts)
    servers = {f"workers_{args.workers}": ServerProcess(args.artifacts, args.workers, args.max_queue),
               f"max_streams_{args.compare_batched}": ServerProcess(args.artifacts, args.workers, args.max_queue,
                                                                    max_streams=args.compare_batched)}
    out: dict[str, Any] = {"config": {"workers": args.workers, "max_streams": args.compare_batched,
                                      "max_queue": args.max_queue, "clients": args.clients, "rounds": args.rounds}}
    try:
        for server in servers.values():
            server.wait_ready()
            asyncio.run(unloaded_ttfa(server.url, 1))  # warm: first graph calls, caches
        reports = {name: LoadReport() for name in servers}
        pollers = {name: QueuePoller(server.url) for name, server in servers.items()}
        for _ in range(args.rounds):
            for name, server in servers.items():
                reports[name].wall_seconds += asyncio.run(_timed_burst(server, pollers[name], solo, args.clients,
                                                                      reports[name]))
        for name, server in servers.items():
            metrics = server.metrics()
            out[name] = {**summarise(reports[name], pollers[name], metrics), "engine": engine_figures(metrics)}
    finally:
        out["exit_codes"] = {name: server.stop() for name, server in servers.items()}
    base, batched = (out[name] for name in servers)
    out["batched_over_workers"] = {key: batched[key] / base[key] if base[key] else None for key in
                                   ("requests_per_second", "audio_seconds_per_second", "ttfa_p50_seconds",
                                    "ttfa_p95_seconds")}
    return out


async def _timed_burst(server: ServerProcess, poller: QueuePoller, solo: dict, clients: int,
                       report: LoadReport) -> float:
    """One burst into ``report``; returns its wall seconds."""
    sample_rate = server.health()["sample_rate"]
    async with poller:
        began = time.perf_counter()
        check_burst(await burst(server.url, clients), solo, sample_rate, report)
        return time.perf_counter() - began


def run(args) -> dict:
    if args.compare_batched:
        return compare(args)
    solo = solo_audio(args.artifacts)
    server = ServerProcess(args.artifacts, args.workers, args.max_queue).wait_ready()
    out: dict[str, Any] = {"config": {"workers": args.workers, "max_queue": args.max_queue, "clients": args.clients,
                      "rounds": args.rounds, "disconnects": args.disconnects, "rss_requests": args.rss_requests}}
    try:
        began = time.perf_counter()
        out["unloaded_ttfa_p50_seconds"] = asyncio.run(unloaded_ttfa(server.url))
        report, poller = asyncio.run(measure(server, solo, args.clients, args.rounds))
        out["load"] = summarise(report, poller, server.metrics())
        statuses = asyncio.run(hang_up_after_first_chunk(server.url, args.disconnects))
        out["disconnects"] = {"statuses": statuses, "busy_after": wait_idle(server),
                              "cancelled_total": server.metrics().get(
                                  'dia2_requests_total{endpoint="speech",outcome="cancelled"}', 0.0)}
        out["rss"] = rss_growth(server, args.rss_requests, args.workers)
        out["seconds"] = time.perf_counter() - began
    finally:
        out["exit_code"] = server.stop()
    if args.flood_clients:
        flooded = ServerProcess(args.artifacts, args.workers, args.max_queue, "--max-body-bytes",
                                str(2 * FLOOD_BODY_BYTES)).wait_ready()
        try:
            out["healthz_under_flood"] = healthz_under_flood(flooded.url, args.flood_clients)
        finally:
            flooded.stop()
    return out


async def unloaded_ttfa(url: str, requests: int = 5) -> float:
    """Median time to first audio of requests sent one at a time: no queue, an idle worker."""
    async with httpx.AsyncClient(timeout=120) as client:
        firsts = [first_byte(await speak(client, url, *SCRIPTS[0])) for _ in range(requests)]
    return float(np.median(firsts))


def wait_idle(server: ServerProcess, seconds: float = 30.0) -> int:
    """Busy workers once the server settles (0 expected), polling at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        health = server.health()
        if (health["busy"] == 0 and health["queued"] == 0) or time.monotonic() > deadline:
            return health["busy"]
        time.sleep(0.05)


def rss_growth(server: ServerProcess, requests: int, concurrency: int) -> dict:
    asyncio.run(sequential_load(server.url, 30, concurrency))
    after_30 = server.rss()
    asyncio.run(sequential_load(server.url, requests - 30, concurrency))
    after_all = server.rss()
    return {"after_30_mib": after_30 / 2**20, f"after_{requests}_mib": after_all / 2**20,
            "ratio": after_all / after_30}


FLOOD_BODY_BYTES = 2**20


def flood_body(size: int) -> bytes:
    """A well-formed speech request about ``size`` bytes long: its script is far over any
    ``--max-input-chars``, so the server reads, decodes and checks all of it, then says 400."""
    words = ("[S1] " + "word " * (size // 5)).encode()[:size]
    return json.dumps({"model": "dia2", "voice": "alloy", "input": words.decode()}).encode()


def flood(url: str, clients: int, seconds: float, size: int) -> int:
    """``clients`` threads posting ``size``-byte bodies back to back for ``seconds``; prints and
    returns how many requests got an answer."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    body, done, lock = flood_body(size), [0], threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < end:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request("POST", "/v1/audio/speech", body, {"content-type": "application/json"})
                conn.getresponse().read()
                with lock:
                    done[0] += 1
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(done[0], flush=True)
    return done[0]


def healthz_under_flood(url: str, clients: int = 20, seconds: float = 8.0, size: int = FLOOD_BODY_BYTES) -> dict:
    """``/healthz`` latency (ms, one request every 20 ms on a kept-alive connection) while a
    separate process floods the server; the flood runs apart so it never takes this process's GIL."""
    code = ("import sys; from dia2_trt.benchmarks.serve_load import flood; "
            "flood(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))")
    proc = subprocess.Popen([sys.executable, "-c", code, url, str(clients), str(seconds), str(size)],
                            stdout=subprocess.PIPE, text=True)
    latencies, statuses = [], set()
    time.sleep(min(1.0, seconds / 4))  # the flood is under way
    with httpx.Client(timeout=10) as client:
        while proc.poll() is None:
            began = time.perf_counter()
            statuses.add(client.get(f"{url}/healthz").status_code)
            latencies.append((time.perf_counter() - began) * 1000)
            time.sleep(0.02)
    assert proc.stdout is not None  # stdout=PIPE
    floods = int(proc.stdout.read().strip() or 0)
    ms = np.array(latencies)
    return {"healthz_requests": len(ms), "healthz_statuses": sorted(statuses), "flood_requests": floods,
            "flood_clients": clients, "body_bytes": size, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=6)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disconnects", type=int, default=50)
    parser.add_argument("--rss-requests", type=int, default=300)
    parser.add_argument("--flood-clients", type=int, default=20, help="0 skips the flood")
    parser.add_argument("--compare-batched", type=int, default=0, metavar="N",
                        help="only the bursts, on --workers and on --max-streams N servers side by side")
    parser.add_argument("--out", type=Path, default=Path("serve-load.json"))
    args = parser.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
