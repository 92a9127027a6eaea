"""Helpers for the dia2-rt serve tests: a real uvicorn server on a loopback port, in a thread.

Imported by tests/test_serve*.py (pytest puts tests/ on sys.path): plain helpers only; the
fixtures they use (``artifacts``, ``runtime``: the committed tiny fixture, no export, no torch)
live in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

LOOPBACK = "127.0.0.1"
# Bounded waits: no loop in these tests runs unbounded.
STARTUP_SECONDS = 30.0


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port>, in a background thread."""

    def __init__(self, app, ws_max_size: int = 64 * 1024, grace: float = 5.0, edge=None) -> None:
        import uvicorn

        from dia2_trt.runtime.serve.guard import EdgeLimits, uvicorn_config

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, 0))
        self.port = self._sock.getsockname()[1]
        # The CLI's own protocol and limits (tests pass tighter ones to see them act)
        config = uvicorn_config(app, edge or EdgeLimits(), log_level="warning", ws_max_size=ws_max_size,
                                timeout_graceful_shutdown=grace, timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/v1/stream"

    @property
    def state(self):
        return self.app.state.serve

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=STARTUP_SECONDS)
        self._sock.close()


@contextmanager
def live_server(app, **kwargs):
    server = LiveServer(app, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A loopback port nobody listens on now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until(predicate, seconds: float = 20.0, step: float = 0.05):
    """Poll ``predicate`` until it is truthy (returned) or ``seconds`` pass (AssertionError)."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {seconds} s")
        time.sleep(step)


CHROMEDRIVER = Path("/usr/bin/chromedriver")


@contextmanager
def headless_chromium(profile: Path, window: str = "1100,800", page_timeout: float = 30):
    """Debian's chromium under its chromedriver, headless, audio allowed to play unprompted; the
    calling test skips (one reason) where selenium, chromium or the driver is missing."""
    import pytest

    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the [serve-test] extra (selenium)")
    binary = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).exists()), None)
    if binary is None or not CHROMEDRIVER.exists():
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required", f"--window-size={window}",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(page_timeout)
    try:
        yield driver
    finally:
        driver.quit()


def pcm16(pcm: np.ndarray) -> bytes:
    """``dia2-rt speak --out -``'s rounding (so a solo SpeakResult compares byte for byte)."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def split_wav(body: bytes) -> tuple[int, bytes]:
    """(sample rate, PCM bytes) of a streamed 16-bit mono WAV: the data runs to the end of the body."""
    assert body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt " and body[36:40] == b"data"
    channels, rate = struct.unpack("<HI", body[22:28])
    bits = struct.unpack("<H", body[34:36])[0]
    assert (channels, bits) == (1, 16)
    return rate, body[44:]


def speech_body(text: str, **extra) -> dict:
    return {"model": "dia2", "input": text, "voice": "alloy", "response_format": "pcm", **extra}


async def ws_speak(url: str, pieces: list[str], start: dict | None = None, end: bool = True) -> dict:
    """Speak over /v1/stream: returns {"audio", "events", "done", "close_code", "close_reason"}."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    out = {"audio": bytearray(), "events": [], "done": None}
    async with connect(url, max_size=2**24, open_timeout=20) as ws:
        await ws.send(json.dumps({"type": "start", **(start or {})}))
        for piece in pieces:
            await ws.send(json.dumps({"type": "text", "text": piece}))
        if end:
            await ws.send(json.dumps({"type": "end"}))
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    out["audio"] += message
                else:
                    event = json.loads(message)
                    out["events"].append(event)
                    if event["type"] == "done":
                        out["done"] = event
        except ConnectionClosed:
            pass
        out["close_code"], out["close_reason"] = ws.close_code, ws.close_reason
    out["audio"] = bytes(out["audio"])
    return out
