"""The teacher-forced accuracy report of ``dia2-export validate --against``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dia2_trt.export.accuracy import MIN_COMPARED_STEPS, THRESHOLDS, _failures, accuracy_report

from conftest import SCRIPTS
from hardening_support import copy_with_negated_action_head


def _quiet(msg: str) -> None:
    pass


def test_fp32_against_itself_agrees_everywhere(tiny_artifacts):
    report = accuracy_report(tiny_artifacts, tiny_artifacts, SCRIPTS["dialogue"], echo=_quiet)
    assert report["passed"] and report["reference_replay_agreement"] == 1.0
    names = ["action", "cb0"] + [f"cb{q}" for q in range(1, 5)]
    assert list(report["outputs"]) == names
    for r in report["outputs"].values():
        assert r["agreement"] == 1.0 and r["max_abs"] == 0.0 and r["confident_agreement"] == 1.0
    first = accuracy_report(tiny_artifacts, tiny_artifacts, SCRIPTS["dialogue"], echo=_quiet, max_steps=12)
    assert first["steps"] == 12 < report["steps"] and first["outputs"]["cb0"]["compared_steps"] == 12


def test_fp16_passes_with_small_logits_errors(artifacts_factory, tiny_artifacts):
    report = accuracy_report(artifacts_factory(precision="fp16"), tiny_artifacts, SCRIPTS["dialogue"], echo=_quiet)
    assert report["precision"] == "fp16" and report["passed"], report["failures"]
    for name, r in report["outputs"].items():
        assert 0 < r["max_abs"] < 0.1, name  # fp16, not bit-identical, and per codebook
        assert r["confident_steps"] > 0 and r["confident_agreement"] >= THRESHOLDS["fp16"]["confident_agreement"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dia2_trt.export", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_validate_against_exits_1_when_a_head_is_broken(tiny_artifacts, tmp_path):
    broken = tmp_path / "broken"
    copy_with_negated_action_head(tiny_artifacts, broken)
    report = tmp_path / "accuracy.json"
    result = _run_cli("validate", str(broken), "--against", str(tiny_artifacts), "--report", str(report))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: accuracy below the thresholds: action")
    data = json.loads(report.read_text())
    assert not data["passed"] and data["outputs"]["action"]["agreement"] < THRESHOLDS["fp32"]["agreement"]


def test_validate_against_refuses_another_checkpoint(tiny_artifacts, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_artifacts, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"]["files"] = {name: "0" * 64 for name in manifest["source"]["files"]}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not built from the same checkpoint"):
        accuracy_report(other, tiny_artifacts, SCRIPTS["dialogue"], echo=_quiet)


def test_thresholds_cover_every_precision():
    assert set(THRESHOLDS) == {"fp32", "fp16", "int8", "int4", "int8-qdq", "fp8-qdq"}
    for limits in THRESHOLDS.values():
        assert 0 < limits["agreement"] <= limits["confident_agreement"] <= 1.0
    assert np.isclose(THRESHOLDS["fp32"]["agreement"], 1.0)


def test_a_decision_an_outside_entry_can_take_is_not_confident():
    """The conditional top-2 among the kept can be far apart while an entry just outside the guided
    top-k has a better conditional logit: a small error lets it in, and it wins."""
    from dia2_trt.export.accuracy import _margin
    from dia2_trt.runtime.params import GenerationParams

    params = GenerationParams(cfg_scale=2.0, cfg_filter_k=2, text_temperature=0.0, audio_temperature=0.0)
    cond = np.array([5.0, 1.0, 0.0, 6.0], np.float32)
    # guided = 2 * cond - uncond = [5, 3, -1, 2.97]: entry 3 (cond 6 > the winner's 5) is 0.03 outside
    close = np.stack([cond, 2 * cond - np.array([5.0, 3.0, -1.0, 2.97], np.float32)])
    assert _margin(close, params, ()) == pytest.approx(2 * 0.03 / (2 * 3), rel=1e-3)
    # far outside (guided 0): entering needs e >= 3 / 6 = 0.5; the kept pair 5 vs 1 needs 2; the winner
    # leaving needs (5 - 0) / 6: the smallest, 0.5, decides
    far = np.stack([cond, 2 * cond - np.array([5.0, 3.0, -1.0, 0.0], np.float32)])
    assert _margin(far, params, ()) == pytest.approx(2 * 0.5)
    # an outside entry that cannot beat the winner does not count
    weak = np.stack([np.array([5.0, 1.0, 0.0, 0.5], np.float32),
                     2 * np.array([5.0, 1.0, 0.0, 0.5], np.float32) - np.array([5.0, 3.0, -1.0, 2.97], np.float32)])
    assert _margin(weak, params, ()) == pytest.approx(2 * min(4 / 2, (5 - 2.97) / 6, (5 - 0.5) / 2), rel=1e-3)


def test_the_agreement_floor_needs_enough_steps_and_the_confident_floor_does_not():
    limits = THRESHOLDS["int8"]
    outputs = {
        "cb3": {"agreement": 0.1, "compared_steps": MIN_COMPARED_STEPS},
        "cb19": {"agreement": 0.0, "compared_steps": 1},  # too few to judge
        "cb20": {"agreement": 1.0, "compared_steps": 2, "confident_agreement": 0.5},
        "cb21": {"agreement": None, "compared_steps": 0},
    }
    failures = _failures({"thresholds": limits, "outputs": outputs})
    assert failures == [f"cb3 agreement 0.100 < {limits['agreement']}",
                        f"cb20 confident agreement 0.500 < {limits['confident_agreement']}"]
