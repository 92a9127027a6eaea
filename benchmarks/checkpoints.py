"""Benchmark checkpoints that need no network: the 2B topology and the real-vocabulary tiny, random weights.

``models.tiny.build_2b_topology_checkpoint`` leaves Mimi to the hub id
(kyutai/mimi), which is not reachable offline, and the tiny Mimi's 64-entry
codebooks do not fit the 2B's 2050-token audio vocabulary. So the benchmark
checkpoint gets a random Mimi with transformers' default ``MimiConfig``: the real
Mimi's shapes (~80M parameters, 32 quantizers of 2048 codes, 512 wide, 8 layers),
so codec time is what the real codec would cost.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_SEED = 0


def default_2b_dir(seed: int = DEFAULT_SEED) -> Path:
    env = os.environ.get("DIA2_TRT_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "dia2-trt"
    return root / f"2b-topology-seed{seed}"


def ensure_2b_checkpoint(out: Path | None = None, seed: int = DEFAULT_SEED) -> Path:
    """The 2B-topology checkpoint at ``out`` (default: the cache), built once."""
    from dia2_trt.models.tiny import build_2b_topology_checkpoint

    def build(tmp: Path) -> None:
        build_2b_topology_checkpoint(tmp, seed=seed)
        _add_real_size_mimi(tmp, seed)

    return _build_once(Path(out) if out else default_2b_dir(seed), build, "2B-topology")


def default_real_vocab_dir(seed: int = DEFAULT_SEED) -> Path:
    return default_2b_dir(seed).with_name(f"real-vocab-seed{seed}")


def ensure_real_vocab_checkpoint(out: Path | None = None, seed: int = DEFAULT_SEED) -> Path:
    """models.tiny's real-vocabulary preset at ``out`` (default: the cache), built once."""
    from dia2_trt.models.tiny import build_real_vocab_checkpoint

    return _build_once(Path(out) if out else default_real_vocab_dir(seed),
                       lambda tmp: build_real_vocab_checkpoint(tmp, seed=seed), "real-vocabulary")


def _build_once(out: Path, build, what: str) -> Path:
    """Reuse a finished checkpoint at ``out``, else ``build`` one in a sibling and rename it into place.

    An ``out`` that exists with other things in it is refused, never deleted: it is a path
    the user gave, and this function only replaces what it would have made itself.
    """
    if (out / "config.json").is_file() and (out / "mimi" / "model.safetensors").is_file():
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists but is not a finished {what} checkpoint; "
                         f"remove it yourself or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp)
        os.rename(tmp, out)  # onto nothing, or onto the empty directory checked above
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary: gone after the rename anyway
    return out


def _add_real_size_mimi(checkpoint: Path, seed: int) -> None:
    from transformers import MimiConfig, MimiModel

    from dia2_trt.models.mimi_stream import randomize_mimi

    config = json.loads((checkpoint / "config.json").read_text())
    codebook = config["data"]["audio_bos_token_id"]  # audio ids below bos are the codebook entries
    mimi_config = MimiConfig(num_quantizers=len(config["data"]["delay_pattern"]), codebook_size=codebook)
    randomize_mimi(MimiModel(mimi_config).eval(), seed).save_pretrained(checkpoint / "mimi")
    config["assets"]["mimi"] = "mimi"
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    import sys

    print(ensure_real_vocab_checkpoint() if sys.argv[1:] == ["real-vocab"] else ensure_2b_checkpoint())
