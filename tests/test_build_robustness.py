"""Quantized artifacts warm a prefix through the prefill graph as stepping would; ``dia2-export``
killed by SIGTERM or stopped by a full disk leaves nothing and says so in one line.

The SIGTERM and disk-full cases run the real CLI in a subprocess on the tiny checkpoint and the
committed fixture (tests/data/tiny-artifacts, which has a prefill graph and 48 prefix frames).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dia2_trt.runtime import Dia2Runtime
from dia2_trt.runtime.params import GenerationParams

from conftest import SCRIPTS

FIXTURE = Path(__file__).parent / "data" / "tiny-artifacts"
VOICES = Path(__file__).parent / "data" / "voices"
GOLDEN = json.loads((VOICES / "golden_prefix.json").read_text())
TWO = next(c for c in GOLDEN["cases"] if (c["variant"], c["seed"]) == ("default", 0) and c["speaker_2"])
GREEDY = GenerationParams(text_temperature=0.0, audio_temperature=0.0)
# Prefill vs step-wise K/V rows (magnitude ~4) on the tiny fixture: fp32 9.5e-7, int8 1.2e-6, int4 1.0e-6,
# int8-qdq and fp8-qdq 0 once the prefill is quantized like the backbone; with an fp32 prefill beside a
# quantized backbone they were 0.05 (int8), 0.53 (int4), 0.07 (int8-qdq), 0.23 (fp8-qdq).
ROW_TOLERANCE = 1e-5


# --- the prefill graph of quantized artifacts ----------------------------------------------


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory):
    """precision -> artifacts quantized from the fp32 fixture, lazily (each costs seconds)."""
    root = tmp_path_factory.mktemp("quantized-prefill")
    made: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in made:
            out = root / precision
            if precision.endswith("-qdq"):
                from dia2_trt.calibration.calibrate import calibrate_artifacts

                calibrate_artifacts(FIXTURE, [SCRIPTS["dialogue"]], out, precision)
            else:
                from dia2_trt.export.build import BuildOptions, quantize_artifacts

                quantize_artifacts(FIXTURE, out, BuildOptions(precision=precision))
            made[precision] = out
        return made[precision]

    return get


def _prefix(runtime: Dia2Runtime):
    words = [VOICES / (clip.split(".")[0] + ".words.json") for clip in (TWO["speaker_1"], TWO["speaker_2"])]
    return runtime.prefix(runtime.voice(VOICES / TWO["speaker_1"], words[0], 1),
                          runtime.voice(VOICES / TWO["speaker_2"], words[1], 2))


def _check_prefill_parity(art: Path, precision: str, tmp_path: Path) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    prefill = manifest["graphs"]["backbone_prefill"]
    assert prefill["precision"] == manifest["graphs"]["backbone"]["precision"] == precision
    assert prefill["quantization"].get("block_size") == manifest["graphs"]["backbone"]["quantization"].get("block_size")
    runtime = Dia2Runtime.load(art)
    prefix = _prefix(runtime)
    one_call, stepped = runtime.warm(prefix, prefill=True), runtime.warm(prefix, prefill=False)
    assert "backbone_prefill" in runtime.graphs  # the prefill graph did run (it loads on first use)
    assert one_call.k_rows.shape[-2] == stepped.k_rows.shape[-2] > 8
    assert np.abs(one_call.k_rows - stepped.k_rows).max() <= ROW_TOLERANCE
    assert np.abs(one_call.v_rows - stepped.v_rows).max() <= ROW_TOLERANCE
    via_prefill = runtime.speak(TWO["script"], GREEDY, prefix=prefix, prefill=True).tokens
    assert via_prefill.tolist() == runtime.speak(TWO["script"], GREEDY, prefix=prefix, prefill=False).tokens.tolist()
    one_call.save(tmp_path / "warm.npz")
    restored = type(one_call).load(tmp_path / "warm.npz")
    assert runtime.speak(TWO["script"], GREEDY, prefix=restored).tokens.tolist() == via_prefill.tolist()


@pytest.mark.parametrize("precision", ["int8", "int4", "int8-qdq", "fp8-qdq"])
def test_quantized_prefill_caches_the_rows_stepping_does(quantized_dirs, precision, tmp_path):
    _check_prefill_parity(quantized_dirs(precision), precision, tmp_path)


def test_a_quantized_build_from_the_checkpoint_has_a_matching_prefill(artifacts_factory, tmp_path):
    _check_prefill_parity(artifacts_factory("default", 0, "int4", 48), "int4", tmp_path)


# --- SIGTERM ---------------------------------------------------------------------------------


def _export(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dia2_trt.export", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _temp_dir(parent: Path) -> Path | None:
    """The build's ``.NAME.xxxx`` directory, once it exists."""
    try:
        return next((parent / n for n in os.listdir(parent) if n.startswith(".out.")), None)
    except FileNotFoundError:
        return None


def _terminate_when(proc: subprocess.Popen, ready, limit: float = 600) -> tuple[int, list[str]]:
    """Poll (no sleep: the moment may be brief) until ``ready()``, then SIGTERM; exit status, stderr lines."""
    deadline = time.monotonic() + limit
    while not ready():
        assert proc.poll() is None, f"exited {proc.returncode} before the point: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the build never reached the point"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.splitlines()


def _said(lines: list[str]) -> list[str]:
    """stderr less the per-stage progress lines."""
    return [line for line in lines if not line.startswith(("[build", "[calibrate]"))]


def _has(parent: Path, name: str):
    return lambda: (t := _temp_dir(parent)) is not None and (t / name).exists()


@pytest.mark.parametrize("point", ["temp-dir-made", "backbone-exported"])
def test_sigterm_mid_export_leaves_nothing(tiny_checkpoint, tmp_path, point):
    (tmp_path / "keep.txt").write_text("untouched")
    parent = tmp_path / "new" / "deeper"
    proc = _export("build", "--checkpoint", str(tiny_checkpoint), "--prefix-frames", "8",
                   "--out", str(parent / "out"), cwd=tmp_path)
    ready = (lambda: _temp_dir(parent) is not None) if point == "temp-dir-made" else _has(parent, "backbone.onnx")
    code, lines = _terminate_when(proc, ready)
    assert code == 143 and _said(lines) == ["Terminated."], lines
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]  # no output, temporary or parent directory


def test_sigterm_mid_quantize_leaves_nothing(tmp_path):
    parent = tmp_path / "new"
    proc = _export("build", "--from-artifacts", str(FIXTURE), "--precision", "int4", "--out", str(parent / "out"),
                   cwd=tmp_path)
    code, lines = _terminate_when(proc, lambda: _temp_dir(parent) is not None)
    assert code == 143 and _said(lines) == ["Terminated."], lines
    assert os.listdir(tmp_path) == []


def test_sigterm_mid_calibration_leaves_nothing(tmp_path):
    scripts = tmp_path / "scripts.txt"
    scripts.write_text("\n".join(SCRIPTS.values()) + "\n")
    parent = tmp_path / "new"
    proc = _export("calibrate", str(FIXTURE), "--scripts", str(scripts), "--precision", "int8-qdq",
                   "--out", str(parent / "out"), cwd=tmp_path)
    # the Replay's directory: the scripts have been spoken, the ranges are being observed
    def ready() -> bool:
        return (t := _temp_dir(parent)) is not None and any(n.startswith(".replay-") for n in os.listdir(t))
    code, lines = _terminate_when(proc, ready)
    assert code == 143 and _said(lines) == ["Terminated."], lines
    assert os.listdir(tmp_path) == ["scripts.txt"]


def test_sigterm_inside_a_deferred_step_ends_the_command_after_it():
    """The rename pair that swaps an artifact in runs whole; the termination follows it."""
    code = textwrap.dedent("""
        import os, signal
        from dia2_trt.runtime import signals as entry
        entry.install()
        done = []
        try:
            with entry.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs between bytecodes: give it many
                    pass
                done.append("step")
        except entry.Terminated:
            print("terminated after", done)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "terminated after ['step']", out.stderr


# --- a full disk -----------------------------------------------------------------------------

ENOSPC_LINE = re.compile(
    r"^Error: cannot write (\S+): no space left on device \(needs about ([0-9.e-]+) GB in (\S+)\)$")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (the fixture's artifacts are 3.6 MB), unmounted afterwards."""
    mount = shutil.which("mount")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                          text=True) if mount else None
    if done is None or done.returncode:
        pytest.skip("cannot mount a 2 MiB tmpfs to fill (needs root or CAP_SYS_ADMIN and mount(8)): "
                    + (done.stderr.strip() if done else "no mount command"))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _check_disk_full(proc: subprocess.Popen, small: Path, out: Path) -> None:
    _, err = proc.communicate(timeout=600)
    lines = _said(err.splitlines())
    assert proc.returncode == 1 and len(lines) == 1, err
    match = ENOSPC_LINE.match(lines[0])
    assert match, lines[0]
    assert match.group(1) == str(out) and match.group(3) == str(out.parent) and float(match.group(2)) > 0.002
    assert os.listdir(small) == []


def test_full_disk_while_quantizing_is_one_line(small_disk, tmp_path):
    out = small_disk / "new" / "out"
    _check_disk_full(_export("build", "--from-artifacts", str(FIXTURE), "--precision", "int8", "--out", str(out),
                             cwd=tmp_path), small_disk, out)


def test_full_disk_while_calibrating_is_one_line(small_disk, tmp_path):
    scripts = tmp_path / "scripts.txt"
    scripts.write_text(SCRIPTS["dialogue"] + "\n")
    out = small_disk / "out"
    _check_disk_full(_export("calibrate", str(FIXTURE), "--scripts", str(scripts), "--precision", "int8-qdq",
                             "--out", str(out), cwd=tmp_path), small_disk, out)


def test_full_disk_while_exporting_is_one_line(small_disk, tiny_checkpoint, tmp_path):
    out = small_disk / "out"
    _check_disk_full(_export("build", "--checkpoint", str(tiny_checkpoint), "--prefix-frames", "8",
                             "--out", str(out), cwd=tmp_path), small_disk, out)
