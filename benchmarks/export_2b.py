"""Export the 2B-topology random checkpoint (``dia2-export build``) and record wall time and peak memory.

    python benchmarks/export_2b.py [--precision fp32] [--out DIR] [--json FILE]
    python benchmarks/export_2b.py --precision int4 --from-artifacts DIR_FP32 --out DIR   # quantize only

The build runs as a child process so its memory is measured from outside:

* ``peak_tree_rss_bytes``: the largest sum of RSS over the build process and all
  its descendants, sampled every 0.2 s by psutil (what the machine had to hold);
* ``peak_child_maxrss_bytes``: ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, the
  kernel's exact peak of the largest single descendant (misses nothing between
  samples, but does not add processes up).

A build killed by the kernel's OOM killer shows up as ``returncode`` -9.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import DEFAULT_SEED, ensure_2b_checkpoint  # noqa: E402

SAMPLE_SECONDS = 0.2


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # exited between listing and sampling
    return total


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` with output to ``log``; wall time, peak tree RSS, peak child maxrss, exit code."""
    started = time.perf_counter()
    peak = 0
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        proc = psutil.Process(child.pid)
        while child.poll() is None:
            peak = max(peak, tree_rss(proc))
            time.sleep(SAMPLE_SECONDS)
    return {
        "command": cmd,
        "returncode": child.returncode,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "peak_tree_rss_bytes": peak,
        "peak_child_maxrss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "log": str(log),
    }


def export_2b(out: Path, precision: str, checkpoint: Path | None, seed: int,
              from_artifacts: Path | None = None) -> dict:
    started = time.perf_counter()
    if from_artifacts:  # int8/int4 from an fp32 export: the quantization pass alone
        ckpt = from_artifacts
        source = ["--from-artifacts", str(from_artifacts)]
    else:
        ckpt = ensure_2b_checkpoint(checkpoint, seed)
        source = ["--checkpoint", str(ckpt)]
    prepare = time.perf_counter() - started
    cmd = [sys.executable, "-m", "dia2_trt.export", "build", *source,
           "--precision", precision, "--out", str(out), "--overwrite"]
    result = run_measured(cmd, out.with_name(out.name + ".build.log"))
    files = sorted(out.iterdir()) if out.is_dir() else []
    return {
        "checkpoint": str(ckpt),
        "checkpoint_prepare_seconds": round(prepare, 2),
        "precision": precision,
        "out": str(out),
        **result,
        "machine": {"cpus": psutil.cpu_count(), "memory_total_bytes": psutil.virtual_memory().total},
        "files": {p.name: p.stat().st_size for p in files if p.is_file()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8", "int4"))
    parser.add_argument("--from-artifacts", type=Path, help="int8/int4: quantize this fp32 export instead")
    parser.add_argument("--checkpoint", type=Path, help="2B-topology checkpoint (built if missing)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, default=Path("bench-out/2b-fp32"))
    parser.add_argument("--json", type=Path, help="default: OUT.export.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = export_2b(args.out.resolve(), args.precision, args.checkpoint, args.seed, args.from_artifacts)
    path = args.json or args.out.with_name(args.out.name + ".export.json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    gib = 2**30
    print(f"export {report['precision']}: rc {report['returncode']}, {report['wall_seconds']:.0f} s, "
          f"peak tree RSS {report['peak_tree_rss_bytes'] / gib:.1f} GiB, "
          f"peak child maxrss {report['peak_child_maxrss_bytes'] / gib:.1f} GiB -> {path}")
    sys.exit(0 if report["returncode"] == 0 else 1)


if __name__ == "__main__":
    main()
