"""The benchmark suite: build (or reuse) the artifacts of one model, then run ``dia2-rt bench`` on them.

    python benchmarks/suite.py tiny  [--work bench-out]   # reference + fp32 and fp16 artifacts, every backend
    python benchmarks/suite.py real-vocab [--work bench-out]  # tiny widths, Dia2's vocabularies and 32 codebooks
    python benchmarks/suite.py 2b    [--work bench-out]   # reference + fp32, int8, int4 artifacts, a few dozen frames

Results land in WORK/<model>-bench/ (bench.json, bench.md, latency.png, breakdown.png).
Any other arguments go to ``dia2-rt bench`` and override the plan (e.g. ``--frames 16``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_2b import export_2b  # noqa: E402

# Per model: precisions to build, and bench settings sized for a 2-core CPU.
PLANS = {
    "tiny": {"precisions": ("fp32", "fp16"), "bench": ["--frames", "64", "--repeats", "5", "--warmup-frames", "8"]},
    # The real vocabularies and 32 codebooks at tiny widths: the per-frame overhead the 2B
    # pays beyond its weight reads (sampling, 32 stages, codec, host), measurable on a CPU.
    "real-vocab": {"precisions": ("fp32",), "bench": ["--frames", "64", "--repeats", "5", "--warmup-frames", "8"]},
    "2b": {"precisions": ("fp32", "int8", "int4"),
           "bench": ["--frames", "32", "--repeats", "2", "--warmup-frames", "2"]},
}


def build(model: str, precision: str, work: Path) -> Path:
    out = work / f"{model}-{precision}"
    if (out / "manifest.json").is_file():
        return out
    if model == "2b":
        # Weight-only precisions quantize the fp32 export (built first) instead of exporting again.
        fp32 = work / f"{model}-fp32" if precision in ("int8", "int4") else None
        report = export_2b(out, precision, None, 0, fp32)
        if report["returncode"] != 0:
            sys.exit(f"2B export failed, see {report['log']}")
        return out
    source = ["--size", "tiny"]
    if model == "real-vocab":
        # built in a child: this process stays free of torch while the benchmark runs
        made = subprocess.run([sys.executable, str(Path(__file__).with_name("checkpoints.py")), "real-vocab"],
                              check=True, capture_output=True, text=True)
        source = ["--checkpoint", made.stdout.strip().splitlines()[-1]]
    subprocess.run([sys.executable, "-m", "dia2_trt.export", "build", *source, "--precision", precision,
                    "--out", str(out), "--overwrite"], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0], allow_abbrev=False)
    parser.add_argument("model", choices=sorted(PLANS))
    parser.add_argument("--work", type=Path, default=Path("bench-out"))
    args, extra = parser.parse_known_args()  # the rest goes to dia2-rt bench
    args.work.mkdir(parents=True, exist_ok=True)
    plan = PLANS[args.model]
    artifacts = [build(args.model, p, args.work.resolve()) for p in plan["precisions"]]
    command = [sys.executable, "-c", "from dia2_trt.runtime.cli import main; main()", "bench",
               *[arg for a in artifacts for arg in ("--artifacts", str(a))], *plan["bench"],
               "--out", str(args.work / f"{args.model}-bench"), *extra]
    sys.exit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
