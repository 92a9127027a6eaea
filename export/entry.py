"""``dia2-export``'s console entry: see dia2_trt.runtime.entry (Ctrl-C during imports, SIGTERM,
missing extras). A build stopped by SIGTERM removes what it made (export/artifact_dir.py ``atomic_dir``)."""

from __future__ import annotations

from dia2_trt.runtime.entry import launch


def main() -> None:
    launch("dia2_trt.export.cli", extra="export")
