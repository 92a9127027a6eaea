"""Helpers for the hardening tests (tests/test_hardening_*.py, tests/torchfree/test_script_checks.py):
run a CLI in process and insist on one ``Error:`` line.

Imported by name (pytest puts tests/ on sys.path); plain functions, no fixtures.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _invoke(main, args, input=None):
    from click.testing import CliRunner

    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def _one_error_line(done, code: int | None = None) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.exit_code != 0 and (code is None or done.exit_code == code), (done.exit_code, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def _rt(args, input=None):
    from dia2_trt.runtime.cli import main

    return _invoke(main, args, input)


def _export(args, input=None):
    from dia2_trt.export.cli import main

    return _invoke(main, args, input)


def copy_with_negated_action_head(src: Path, dst: Path) -> None:
    """A copy of artifacts ``src`` whose backbone's text-action head is negated: consistent (its
    manifest checksum updated), wrong (every action flips), for the accuracy checks to catch."""
    import json
    import shutil

    import onnx
    from onnx import numpy_helper

    from dia2_trt.runtime.artifacts import sha256

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "backbone.onnx"))
    head = next(n for n in model.graph.node if "action_head" in str(list(n.metadata_props)) and n.op_type == "MatMul")
    weight = next(t for t in model.graph.initializer if t.name == head.input[1])
    weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
    onnx.save(model, str(dst / "backbone.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["graphs"]["backbone"]["sha256"] = sha256(dst / "backbone.onnx")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    (dst / ".verified.json").unlink(missing_ok=True)
