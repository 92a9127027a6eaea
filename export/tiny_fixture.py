"""Regenerate the committed torch-free test fixture: ``python -m dia2_trt.export.tiny_fixture``.

Writes, under ``tests/data/`` of this checkout (or ``--out DIR``):

- ``tiny-artifacts/``: the default tiny checkpoint (random weights, seed 0) exported in fp32, so the
  tests in ``tests/torchfree/`` can run the runtime in a venv without torch;
- ``tiny-golden.json``: the PyTorch reference loop's greedy tokens and word timestamps for
  ``SCRIPT`` on that checkpoint, which the runtime must reproduce token for token.

Run it again whenever the graphs or the checkpoint layout change, and commit both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from dia2_trt.models.sources import resolve_checkpoint
from dia2_trt.models.tiny import build_tiny_checkpoint
from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.files import write_atomic
from dia2_trt.runtime.params import GenerationParams

from .build import BuildOptions, build_artifacts
from .manifest import write_manifest
from .reference_run import run_reference

SCRIPT = "[S1] Hello there, how are you? [S2] I am fine, thanks."
GREEDY: dict[str, Any] = {"text_temperature": 0.0, "audio_temperature": 0.0}  # GenerationParams' keywords
ARTIFACTS, GOLDEN = "tiny-artifacts", "tiny-golden.json"
# Room for the audio prefixes of tests/data/voices (33 frames at most), so the torch-free tier
# covers the prefix path, prefill graph included.
PREFIX_FRAMES = 48
_REPO_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def regenerate(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="dia2-tiny-fixture-") as tmp:
        files = resolve_checkpoint(checkpoint=build_tiny_checkpoint(Path(tmp) / "ckpt", seed=0))
        build_artifacts(files, out / ARTIFACTS, BuildOptions(overwrite=True, prefix_frames=PREFIX_FRAMES))
        forget_checkpoint_paths(out / ARTIFACTS)
        result, _, _ = run_reference(files, SCRIPT, GenerationParams(**GREEDY))
    golden = {"script": SCRIPT, "params": GREEDY, "tokens": result.tokens.tolist(),
              "timestamps": [[word, seconds] for word, seconds in result.timestamps]}
    write_atomic(out / GOLDEN, lambda t: Path(t).write_text(json.dumps(golden) + "\n"))


def forget_checkpoint_paths(directory: Path) -> None:
    """The checkpoint was built in a temporary directory, whose path names nothing once it is gone (and
    differs on every run): the committed manifest identifies it by its files' hashes alone."""
    manifest = load_manifest(directory, verify=False)
    write_manifest(replace(manifest, source=replace(manifest.source, checkpoint=None, mimi=None)), directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dia2_trt.export.tiny_fixture",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=_REPO_DATA, help=f"default: {_REPO_DATA}")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a directory (from an installed package, pass --out)")
    regenerate(args.out)
    sizes = sum(p.stat().st_size for p in (args.out / ARTIFACTS).rglob("*") if p.is_file())
    print(f"wrote {args.out / ARTIFACTS} ({sizes / 1e6:.2f} MB) and {args.out / GOLDEN}")


if __name__ == "__main__":
    main()
