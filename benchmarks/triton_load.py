"""The Triton path against ``dia2-rt serve`` on the same artifacts, in one run.

    python -m dia2_trt.benchmarks.triton_load --artifacts DIR [--streams 4] [--clients 4] [--requests 24]
        [--rounds 2] [--out triton-load.json]

Starts both servers (subprocesses on free loopback ports, each with ``--threads 1``): ``dia2-rt
serve --workers S`` and ``dia2-rt triton-serve`` on a repository from ``dia2-rt triton-repo
--max-streams S``, so both generate at most S utterances at once on one loaded runtime. Then, for
``--rounds`` rounds, alternating the servers within each round so drift on a shared machine falls
on both alike: ``--requests`` requests from ``--clients`` concurrent clients, cycling through the
serve load's scripts and seeds (raw PCM over HTTP for serve, the gRPC stream for Triton). Every
response must equal that request's solo run sample for sample. Reports, per server: requests/s,
audio-seconds/s, client-side time to first audio p50/p95 (request sent -> first audio bytes), and
Triton's figures as ratios to serve's.

Needs the ``[serve]`` and ``[triton]`` extras in one environment (nvidia-pytriton pins numpy < 2).
Timings on a shared machine are disturbed by whatever else runs; compare the two servers of one
run, not runs with each other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from dia2_trt.benchmarks.serve_load import SCRIPTS, ServerProcess, free_port, solo_audio

LOOPBACK = "127.0.0.1"
CLI = [sys.executable, "-c", "from dia2_trt.runtime.cli import main; main()"]


class TritonProcess:
    """``dia2-rt triton-serve`` on a fresh repository for ``artifacts``, on free loopback ports."""

    def __init__(self, artifacts: Path, streams: int, workdir: Path) -> None:
        repo = workdir / "repo"
        subprocess.run([*CLI, "triton-repo", "--artifacts", str(artifacts), "--out", str(repo), "--threads", "1",
                        "--max-streams", str(streams)], check=True, capture_output=True)
        self.http, self.grpc, metrics = free_port(), free_port(), free_port()
        self.url = f"{LOOPBACK}:{self.grpc}"
        self.log = (workdir / "tritonserver.log").open("wb")
        self.proc = subprocess.Popen([*CLI, "triton-serve", "--repo", str(repo), "--http-port", str(self.http),
                                      "--grpc-port", str(self.grpc), "--metrics-port", str(metrics)],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, seconds: float = 120.0) -> TritonProcess:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"triton-serve exited with {self.proc.returncode} (see {self.log.name})")
            try:
                if httpx.get(f"http://{LOOPBACK}:{self.http}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("tritonserver did not come up")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


@dataclass
class Result:
    key: tuple[str, int]
    audio: bytes
    first_audio: float  # seconds from sending to the first audio bytes


Requester = tuple[Callable[[str, int], Result], Callable[[], None]]  # (request, close)


def serve_request(url: str) -> Requester:
    """One client's requester for ``dia2-rt serve`` (raw 16-bit PCM, streamed)."""
    client = httpx.Client(timeout=300)

    def request(text: str, seed: int) -> Result:
        began = time.perf_counter()
        body = {"model": "dia2", "input": text, "voice": "alloy", "response_format": "pcm", "seed": seed}
        with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
            response.raise_for_status()
            parts, first = [], None
            for part in response.iter_raw():
                if first is None and part:
                    first = time.perf_counter() - began
                parts.append(part)
        assert first is not None, "a 200 without audio"
        return Result((text, seed), b"".join(parts), first)

    return request, client.close


def triton_request(url: str) -> Requester:
    """One client's requester for the Triton model (one gRPC stream per client)."""
    from dia2_trt.runtime.triton.client import TritonSpeech

    client = TritonSpeech(url)

    def request(text: str, seed: int) -> Result:
        began = time.perf_counter()
        parts, first = [], None
        for pcm, _words in client.stream(text, {"seed": seed}):
            if first is None and pcm.size:
                first = time.perf_counter() - began
            parts.append(pcm.astype("<i2").tobytes())
        assert first is not None, "a stream without audio"
        return Result((text, seed), b"".join(parts), first)

    return request, client.close  # an open gRPC stream's threads would keep the process alive


@dataclass
class Phase:
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0


def load(make_requester: Callable[[], Requester], clients: int, requests: int) -> Phase:
    """``requests`` requests from ``clients`` threads, each taking the next (script, seed) in turn."""
    phase, lock, counter = Phase(), threading.Lock(), iter(range(requests))
    requesters = [make_requester() for _ in range(clients)]
    errors: list[BaseException] = []

    def client(request) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                result = request(*SCRIPTS[i % len(SCRIPTS)])
            except BaseException as exc:  # reported after the phase: a failed request fails the run
                errors.append(exc)
                return
            with lock:
                phase.results.append(result)

    threads = [threading.Thread(target=client, args=(request,)) for request, _ in requesters]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.wall = time.perf_counter() - began
    for _, close in requesters:
        close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]!r}")
    return phase


def summary(phases: list[Phase], solo: dict, rate: int) -> dict:
    results = [r for p in phases for r in p.results]
    wrong = sum(r.audio != solo[r.key] for r in results)
    if wrong:
        raise RuntimeError(f"{wrong} of {len(results)} responses differ from their solo run")
    wall = sum(p.wall for p in phases)
    ttfa = np.array([r.first_audio for r in results])
    audio_seconds = sum(len(r.audio) // 2 for r in results) / rate
    return {"requests": len(results), "wall_seconds": wall, "requests_per_second": len(results) / wall,
            "audio_seconds_per_second": audio_seconds / wall,
            "ttfa_p50_seconds": float(np.percentile(ttfa, 50)), "ttfa_p95_seconds": float(np.percentile(ttfa, 95))}


def run(args) -> dict:
    from dia2_trt.runtime import Dia2Runtime

    solo = solo_audio(args.artifacts)
    rate = Dia2Runtime.load(args.artifacts, threads=1).sample_rate
    with tempfile.TemporaryDirectory(prefix="triton-load-") as work:
        serve = ServerProcess(args.artifacts, args.streams, args.requests)  # the queue holds every request
        triton = TritonProcess(args.artifacts, args.streams, Path(work))
        try:
            serve.wait_ready()
            triton.wait_ready()
            phases: dict[str, list[Phase]] = {"serve": [], "triton": []}
            contenders = {"serve": lambda: serve_request(serve.url), "triton": lambda: triton_request(triton.url)}
            for make in contenders.values():  # warm-up: first sessions, first connections
                load(make, args.clients, args.clients)
            for round_no in range(args.rounds):
                order = list(contenders) if round_no % 2 == 0 else list(reversed(contenders))
                for name in order:
                    phases[name].append(load(contenders[name], args.clients, args.requests))
        finally:
            serve.stop()
            triton.stop()
    report = {name: summary(p, solo, rate) for name, p in phases.items()}
    s, t = report["serve"], report["triton"]
    report["triton_vs_serve"] = {
        "throughput_ratio": t["requests_per_second"] / s["requests_per_second"],
        "ttfa_p50_ratio": t["ttfa_p50_seconds"] / s["ttfa_p50_seconds"],
        "ttfa_p95_ratio": t["ttfa_p95_seconds"] / s["ttfa_p95_seconds"],
    }
    report["config"] = {"artifacts": str(args.artifacts), "streams": args.streams, "clients": args.clients,
                        "requests_per_round": args.requests, "rounds": args.rounds}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--streams", type=int, default=4, help="serve --workers and triton-repo --max-streams")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=24, help="requests per server per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("triton-load.json"))
    args = parser.parse_args()
    report = run(args)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':8} {'req/s':>7} {'audio s/s':>9} {'TTFA p50':>9} {'TTFA p95':>9}")
    for name in ("serve", "triton"):
        r = report[name]
        print(f"{name:8} {r['requests_per_second']:7.2f} {r['audio_seconds_per_second']:9.2f} "
              f"{r['ttfa_p50_seconds'] * 1000:7.0f}ms {r['ttfa_p95_seconds'] * 1000:7.0f}ms")
    ratios = report["triton_vs_serve"]
    print(f"triton/serve: throughput {ratios['throughput_ratio']:.2f}x, TTFA p50 {ratios['ttfa_p50_ratio']:.2f}x, "
          f"p95 {ratios['ttfa_p95_ratio']:.2f}x  ({args.out})")


if __name__ == "__main__":
    main()
