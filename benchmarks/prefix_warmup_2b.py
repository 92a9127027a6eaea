"""Warm-up cost of a 10 s two-speaker prefix on the 2B topology: step-wise vs prefill vs warm-state tail.

    flock /tmp/dia2-heavy.lock python benchmarks/prefix_warmup_2b.py --checkpoint DIR [--repeats 2] [--json FILE]

The same computations as the runtime's graphs (``Backbone.step``, the backbone
graph's export form, and ``Backbone.prefill``, the prefill graph's), eager
PyTorch fp32 on the CPU, on the 2B-topology random checkpoint; an ONNX export of
the 2B with the prefill graph takes longer than this machine had. The warm-up
inputs are the runtime's own (``prefix.warmup_tokens``) for a synthetic 10.08 s
prefix (two 5.04 s speakers, a word every 0.4 s), so the reusable part of a warm
state (``script_free_frames``) is the one the runtime would keep. Contenders
alternate within each repeat; report medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dia2_trt.models.sources import load_model, resolve_checkpoint
from dia2_trt.models.tokens import resolve_token_ids
from dia2_trt.runtime.prefix import script_free_frames, warmup_tokens
from dia2_trt.runtime.state_machine import REFERENCE_MAX_PADDING, Entry, StateMachine
from dia2_trt.runtime.voice import PrefixPlan, Voice, Word, build_plan, words_to_entries

FRAME_RATE = 12.5


def synthetic_plan(q: int, vocab: int, seconds_each: float = 5.04) -> PrefixPlan:
    rng = np.random.default_rng(0)
    voices = []
    for slot in (1, 2):
        frames = int(round(seconds_each * FRAME_RATE))
        words = [Word(f"w{i}", 0.1 + 0.4 * i, 0.4 + 0.4 * i) for i in range(int(seconds_each / 0.4) - 1)]
        entries, steps = words_to_entries(words, lambda text: [10 + len(text)] * 2, f"[S{slot}]", FRAME_RATE)
        voices.append(Voice(slot, rng.integers(0, vocab, (q, frames)), words, entries, steps))
    plan = build_plan(*voices)
    assert plan is not None  # None only without a speaker 1
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    files = resolve_checkpoint(checkpoint=args.checkpoint)
    model = load_model(files)
    cfg = model.config
    ids = resolve_token_ids(cfg, files.tokenizer_dir)
    delays = list(cfg.data.delay_pattern)
    plan = synthetic_plan(cfg.data.audio_channels, cfg.data.audio_vocab_size - 2)
    machine = StateMachine(ids, second_stream_ahead=cfg.data.second_stream_ahead, initial_padding=2,
                           max_padding=REFERENCE_MAX_PADDING)
    tokens = np.full((2, cfg.data.channels), ids.pad, dtype=np.int64)
    tokens[0, 0], tokens[1, 0] = ids.bos, ids.zero
    script = [Entry([20, 21], "a", 2), Entry([22], "b", 1), Entry([23], "c", 1)]
    seq = warmup_tokens(plan, machine, machine.new_state([*plan.entries, *script]), ids, delays, tokens.copy())
    reusable = len(script_free_frames(plan, machine, ids, delays, tokens.copy()))
    dec = cfg.model.decoder
    capacity = plan.frames + 8
    caches = [torch.zeros(2, dec.kv_heads, capacity, dec.gqa_head_dim) for _ in range(2 * dec.n_layer)]
    seq_t = torch.from_numpy(seq)

    def stepwise(first: int = 0) -> None:
        for t in range(first, plan.frames):
            pos = torch.tensor([t])
            *_, k_new, v_new = model.transformer.step(seq_t[t], pos, caches[: dec.n_layer], caches[dec.n_layer:], pos)
            for i in range(dec.n_layer):
                caches[i][:, :, t], caches[dec.n_layer + i][:, :, t] = k_new[i], v_new[i]

    def prefill() -> None:
        model.transformer.prefill(seq_t.permute(1, 2, 0).contiguous())

    contenders = {"step": stepwise, "prefill": prefill, "warm_tail": lambda: stepwise(reusable)}
    times = {name: [] for name in contenders}
    with torch.inference_mode():
        for r in range(args.repeats):
            for name in list(contenders)[r % 3:] + list(contenders)[: r % 3]:
                started = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - started)
                print(f"repeat {r} {name}: {times[name][-1]:.2f} s", flush=True)
    medians = {n: statistics.median(v) for n, v in times.items()}
    result = {"checkpoint": str(args.checkpoint), "prefix_frames": plan.frames, "reusable_frames": reusable,
              "threads": torch.get_num_threads(), "seconds": times, "median_s": medians,
              "speedup_vs_step": {n: medians["step"] / m for n, m in medians.items()},
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
