"""The PyTorch reference loop as a benchmark contender (torch lives here, outside the runtime).

Run as its own benchmark worker (``python -m dia2_trt.benchmarks.reference_worker``),
driven by ``dia2_trt.benchmarks.harness``.
The model's ``step_reference`` (backbone), ``stage_reference`` (one depformer
stage) and Mimi's batch decode are timed; everything else is host work. The
reference has no streaming codec: its first audio is the batch decode's output
after the last frame, which is what its time to first audio reports.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, cast

import torch

from dia2_trt.export.reference_run import decode_batch, reference_loop
from dia2_trt.models.sources import resolve_checkpoint
from dia2_trt.runtime.params import GenerationParams

from .harness import FrameClock, worker_main

if TYPE_CHECKING:
    from transformers import MimiModel


class ReferenceSubject:
    def __init__(self, spec, clock) -> None:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.loop, mimi = reference_loop(resolve_checkpoint(checkpoint=spec.source))
        self.mimi = cast("MimiModel", mimi)  # reference_loop types its Mimi as a plain object
        self.clock = clock
        model = self.loop.model
        model.transformer.step_reference = clock.timed("backbone", model.transformer.step_reference,
                                                       starts_frame=True)
        model.depformer.stage_reference = clock.timed("depformer", model.depformer.stage_reference)
        self.decode = clock.timed("codec", decode_batch)
        self.sample_rate = int(self.mimi.config.sampling_rate)
        self.frame_rate = float(self.mimi.config.frame_rate)

    def run(self, text: str, seed: int, frames: int) -> dict:
        self.clock.reset(frames + 1)  # the loop stops itself at max_frames; the clock only sizes its buffers
        started = time.perf_counter()
        result = self.loop.run(text, GenerationParams(seed=seed), max_frames=frames)
        self.clock.end()
        pcm = self.decode(self.mimi, result.tokens)
        first = time.perf_counter() - started if pcm.size else None
        return self.clock.report(time.perf_counter() - started, int(pcm.size), first)


if __name__ == "__main__":
    worker_main(sys.argv[1], lambda spec: ReferenceSubject(spec, FrameClock()))
