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
