"""What ``dia2-export build`` shows: a line per stage and one summary, not the exporters' chatter.

torch.onnx, onnxscript, onnx and Polygraphy print from Python (print, warnings, logging) and from
C++ straight to file descriptors 1 and 2, so the quiet mode redirects the descriptors themselves
into a temporary file for the duration of the build; ``--verbose`` leaves them alone.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from dia2_trt.runtime.manifest import Manifest


@contextmanager
def quiet_descriptors(verbose: bool) -> Iterator[TextIO]:
    """Yield a stream to the real stderr; unless ``verbose``, everything else written to fd 1/2 is dropped."""
    sys.stdout.flush()
    sys.stderr.flush()
    if verbose:
        yield sys.stderr
        return
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    with tempfile.TemporaryFile() as sink:
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            console.close()


class BuildProgress:
    """``progress(msg)`` for build_artifacts: one line per stage, with the time since the start."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, message: str) -> None:
        if message.startswith("done in"):  # the summary says it
            return
        print(f"[build {self.elapsed:6.1f}s] {message}", file=self.stream, flush=True)

    def summary(self, manifest: Manifest, out: Path) -> str:
        sizes = {g.file: _graph_bytes(manifest, name) for name, g in manifest.graphs.items()}
        tokenizer = sum(p.stat().st_size for p in manifest.tokenizer_dir.iterdir() if p.is_file())
        total = sum(sizes.values()) + tokenizer
        parts = ", ".join(f"{name} {_mb(size)}" for name, size in sizes.items())
        return (f"built {out} ({manifest.precision}) in {self.elapsed:.1f}s: {parts}, tokenizer {_mb(tokenizer)}; "
                f"{_mb(total)} in all")


def _graph_bytes(manifest: Manifest, name: str) -> int:
    spec = manifest.graph(name)
    data = spec.external_data_path
    return spec.path.stat().st_size + (data.stat().st_size if data else 0)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"
