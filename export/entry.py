"""``dia2-export``'s console entry (and ``python -m dia2_trt.export``): see dia2_trt.runtime.entry (Ctrl-C
during imports, SIGTERM, missing extras). A build stopped by SIGTERM removes what it made
(export/artifact_dir.py ``atomic_dir``).

The full command set, export's commands plus ``calibrate``, is assembled in dia2_trt.calibration.cli,
the room above export. It is started here by module name (``launch`` imports it at run time), so
export holds no import of calibration; the name string is the one link, on purpose.
"""

from __future__ import annotations

from dia2_trt.runtime.entry import launch


def main() -> None:
    launch("dia2_trt.calibration.cli", extra="export")
