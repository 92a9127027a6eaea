"""``dia2-export``'s console entry (and ``python -m dia2_trt.export``): see dia2_trt.runtime.entry (Ctrl-C
during imports, SIGTERM, missing extras). A build stopped by SIGTERM removes what it made
(export/artifact_dir.py ``atomic_dir``).

The full command set, export's commands plus ``calibrate``, is assembled in dia2_trt.calibration.cli,
the room above export. It is started here by module name (``launch`` imports it at run time), so
export holds no import of calibration; the name string is the one link, on purpose.

The command modules import torch, transformers and onnx only inside the commands, so ``-h`` and a
usage error answer at once; a missing [export] extra then shows up when a command starts, not at
import, and is turned into the same one line here.
"""

from __future__ import annotations

import sys

from dia2_trt.runtime.entry import launch


def main() -> None:
    try:
        launch("dia2_trt.calibration.cli", extra="export")
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("dia2_trt") or exc.name is None:
            raise
        sys.stderr.write(f"Error: this command needs the [export] extra (no module {exc.name!r}): "
                         "pip install 'dia2-trt[export]'\n")
        sys.exit(1)
