"""The whole ``dia2-export`` command set: export's commands plus ``calibrate``.

``calibrate`` lives here because calibration sits above export (it builds on export's artifacts and
passes); export must not import it. So this module assembles the full group, and the console entry
(export/entry.py, also behind ``python -m dia2_trt.export``) starts it by module name through
runtime.entry.launch: a string, resolved at run time, not an import of calibration from export.
"""

from __future__ import annotations

from pathlib import Path

import click

from dia2_trt.export import cli as export_cli
from dia2_trt.runtime.cli_common import OneLineGroup, fail, is_within
from dia2_trt.runtime.files import InputFileError, check_regular
from dia2_trt.runtime.manifest import QDQ_PRECISIONS


@click.command()
@click.argument("fp32_artifacts", type=click.Path())
@click.option("--scripts", "scripts_file", required=True, type=click.Path(),
              help="Calibration scripts, one per line.")
@click.option("--precision", required=True, help=f"{' or '.join(QDQ_PRECISIONS)}.")
@click.option("--out", "out", required=True, type=click.Path(), help="Artifact directory to create.")
@click.option("--every", default=1, show_default=True, type=click.IntRange(1),
              help="Observe activations at every N-th step only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact directory.")
def calibrate(fp32_artifacts, scripts_file, precision, out, every, overwrite):
    """Calibrated Q/DQ artifacts (for TensorRT INT8/FP8) from fp32 artifacts and scripts."""
    from .calibrate import calibrate_artifacts, check_calibrate_request, read_scripts

    _check_calibrate_paths(Path(fp32_artifacts), Path(scripts_file), Path(out))
    check_calibrate_request(Path(fp32_artifacts), Path(out), precision, overwrite)
    scripts = read_scripts(Path(scripts_file))
    calibrate_artifacts(Path(fp32_artifacts), scripts, Path(out), precision, every=every, overwrite=overwrite,
                        progress=lambda msg: click.echo(f"[calibrate] {msg}", err=True))
    click.echo(str(out))


# Calibration scripts are a line each: thousands of lines are a few hundred kB.
MAX_SCRIPTS_BYTES = 16 << 20


def _check_calibrate_paths(fp32: Path, scripts: Path, out: Path) -> None:
    """--out (a directory it creates or, with --overwrite, replaces) must not be, hold or lie inside
    the fp32 artifacts, nor hold the scripts; the scripts file must be a bounded regular file."""
    if is_within(out, fp32) or is_within(fp32, out):
        fail(f"--out {out} is, holds or lies inside the fp32 artifact directory {fp32}; write it elsewhere")
    if is_within(scripts, out):
        fail(f"--out {out} holds the --scripts file {scripts}; write it elsewhere")
    try:
        check_regular(scripts, "calibration scripts", MAX_SCRIPTS_BYTES)
    except InputFileError as exc:
        fail(str(exc))


# A group of its own, sharing export's command objects: export's group itself stays as it is,
# whatever else has been imported in the process.
main = OneLineGroup(name="dia2-export", help=export_cli.main.help,
                    commands={**export_cli.main.commands, "calibrate": calibrate})
