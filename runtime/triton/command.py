"""The ``dia2-rt triton-repo`` and ``dia2-rt triton-serve`` commands (loaded only when run)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import click

from ..backends import BACKEND_NAMES
from ..cli_common import cpu_count, fail
from ..script import MAX_SCRIPT_CHARS


@click.command("triton-repo")
@click.option("--artifacts", required=True, type=click.Path(), help="Artifact directory (dia2-export build).")
@click.option("--out", required=True, type=click.Path(), help="Model repository directory (created if missing).")
@click.option("--model-name", default="dia2", show_default=True, help="The model's folder and name in Triton.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Model instances (each a process with its own runtime).")
@click.option("--kind", default="cpu", show_default=True, type=click.Choice(["cpu", "gpu"]),
              help="Instance group kind (gpu: KIND_GPU, one group per visible GPU; use with --backend tensorrt).")
@click.option("--max-streams", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Streams generated at once per instance.")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0, 10_000),
              help="Streams that may wait per instance; past that, UNAVAILABLE.")
@click.option("--max-input-chars", default=4096, show_default=True, type=click.IntRange(1, MAX_SCRIPT_CHARS),
              help="Longest script a request may send.")
@click.option("--voice", "voice_options", multiple=True, metavar="NAME=FILE",
              help="Copy a .voice file into the repository under NAME (repeatable).")
@click.option("--copy-artifacts", is_flag=True,
              help="Copy the artifacts into the repository (self-contained, e.g. for a bucket) instead of "
                   "naming their absolute path.")
@click.option("--threads", type=click.IntRange(1, cpu_count()), help="ONNX Runtime intra-op threads per graph.")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(BACKEND_NAMES))
@click.option("--no-verify", is_flag=True, help="Skip the artifact files' checksums when the model loads.")
def triton_repo(artifacts, out, model_name, instances, kind, max_streams, max_queue, max_input_chars,
                voice_options, copy_artifacts, threads, backend, no_verify) -> None:
    """Write a Triton model repository whose model streams Dia2 (decoupled, Python backend)."""
    from ..artifacts import ArtifactError
    from .repo import write_repo

    settings = {"backend": backend, "threads": threads or 0, "verify": not no_verify, "max_streams": max_streams,
                "max_queue": max_queue, "max_input_chars": max_input_chars}
    try:
        model = write_repo(Path(artifacts), Path(out), model_name=model_name, instances=instances, kind=kind,
                           voices=voice_options, copy_artifacts=copy_artifacts, settings=settings)
    except (ArtifactError, ValueError) as exc:  # RepoError, VoiceRegistryError
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the repository: {exc.strerror or exc}: {exc.filename or out}")
    click.echo(f"wrote {model} (serve it: dia2-rt triton-serve --repo {out})", err=True)


@click.command("triton-serve", context_settings={"ignore_unknown_options": True})
@click.option("--repo", required=True, type=click.Path(), help="Model repository (dia2-rt triton-repo).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for HTTP, gRPC and metrics.")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
@click.option("--log-verbose", default=0, show_default=True, type=click.IntRange(0, 10))
@click.argument("tritonserver_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- TRITONSERVER_ARGS]...")
def triton_serve(repo, host, http_port, grpc_port, metrics_port, log_verbose, tritonserver_args) -> None:
    """Run Triton Inference Server (from the [triton] extra) on a model repository."""
    from .server import TritonMissing, run, server_args

    if not Path(repo).is_dir():
        fail(f"--repo {repo}: not a directory")
    if len({http_port, grpc_port, metrics_port}) < 3:
        fail("--http-port, --grpc-port and --metrics-port must differ")
    if not _loopback(host):
        click.echo(f"warning: serving on {host}, reachable from other machines, with no authentication", err=True)
    args = server_args(Path(repo).resolve(), host, http_port, grpc_port, metrics_port, log_verbose,
                       tuple(tritonserver_args))
    try:
        code = run(args)
    except TritonMissing as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot start tritonserver: {exc.strerror or exc}")
    sys.exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell reports it


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
