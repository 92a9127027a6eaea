"""``dia2-export``'s console entry: see dia2_trt.runtime.entry (Ctrl-C during imports, missing extras)."""

from __future__ import annotations

from dia2_trt.runtime.entry import launch


def main() -> None:
    launch("dia2_trt.export.cli", extra="export")
