"""Console entry points that turn Ctrl-C and SIGTERM into one line, even while the heavy imports
still run, after the command's own cleanup (runtime/signals.py).

Importing the CLI pulls in numpy, ONNX Runtime (and for ``dia2-export`` torch): seconds
in which a Ctrl-C would otherwise print an import traceback. This module imports
nothing heavy itself; ``dia2_trt.runtime``'s ``__init__`` must stay light (or lazy)
for that to hold, and tests/test_cli.py checks it.
"""

from __future__ import annotations

import sys

from .signals import EXIT_TERMINATED, Terminated, install

EXIT_INTERRUPTED = 130


def launch(module: str, extra: str | None = None) -> None:
    """Import ``module`` and run its ``main`` group; Ctrl-C, SIGTERM and a missing extra are one line."""
    install()
    try:
        from importlib import import_module

        main = import_module(module).main
    except KeyboardInterrupt:
        _die("Interrupted.", EXIT_INTERRUPTED)
    except Terminated:
        _die("Terminated.", EXIT_TERMINATED)
    except ModuleNotFoundError as exc:
        if extra is None or (exc.name or "").startswith("dia2_trt"):
            raise
        _die(f"Error: this command needs the [{extra}] extra (no module {exc.name!r}): "
             f"pip install 'dia2-trt[{extra}]'", 1)
    try:
        main()
    except KeyboardInterrupt:  # between the import and the command's own handling
        _die("Interrupted.", EXIT_INTERRUPTED)
    except Terminated:
        _die("Terminated.", EXIT_TERMINATED)


def _die(line: str, code: int) -> None:
    sys.stderr.write(line + "\n")
    sys.exit(code)


def main() -> None:
    """``dia2-rt``."""
    launch("dia2_trt.runtime.cli")
