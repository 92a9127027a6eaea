"""``dia2-rt triton-serve``: the tritonserver binary of the ``[triton]`` extra (nvidia-pytriton), on
machines without NVIDIA's container.

The wheel's server needs three things its own launcher (pytriton) also arranges:

- a backend directory whose ``python/`` holds the Python-backend stub built for *this*
  interpreter's version (the wheel ships one per version beside the backend);
- ``LD_LIBRARY_PATH`` with this interpreter's ``LIBDIR`` (else the stub loads another
  libpython and fails) and the wheel's ``nvidia_pytriton.libs``;
- this interpreter's import path: the stub is a separate embedded interpreter that reads
  no ``.pth`` file (an editable install is invisible to it) and ignores ``PYTHONPATH``
  (tritonserver 2.51's stub: its sys.path is the base interpreter's), so the repository's
  ``model.py`` prepends ``PYTHONPATH`` itself. A folder of links, ``dia2_trt/runtime ->
  the runtime in use``, first on it, makes the package importable however it was installed.

The backend folder and the link folder live in a temporary directory made and removed
by this command; the server is its child and dies with it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class TritonMissing(RuntimeError):
    """The [triton] extra is not installed, or has no stub for this Python."""


def server_dir() -> Path:
    """nvidia-pytriton's ``tritonserver`` folder (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonMissing("tritonserver comes with the [triton] extra: pip install 'dia2-trt[triton]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (folder / "bin" / "tritonserver").is_file():
        raise TritonMissing(f"{folder}: no tritonserver binary in this nvidia-pytriton install")
    return folder


def stub_path(folder: Path) -> Path:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = folder / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonMissing(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    return stub


def check_numpy() -> None:
    """The 2.51 stub is built against numpy 1: under numpy 2 it misreads every BYTES input (a length
    of 0x36363636 for a 54-byte text) and aborts. The stub imports the numpy this process does."""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise TritonMissing(f"tritonserver 2.51's Python backend needs numpy < 2 (this Python has {numpy.__version__} "
                            f"at {Path(numpy.__file__).parent}); pip install 'dia2-trt[triton]' resolves it")


def prepare(workspace: Path) -> tuple[list[str], dict[str, str]]:
    """The server's argv head (binary, backend directory) and environment, set up in ``workspace``."""
    folder = server_dir()
    check_numpy()
    backend = workspace / "backends" / "python"
    shutil.copytree(folder / "backends" / "python", backend, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub_path(folder), backend / "triton_python_backend_stub")
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(folder.parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = _join([*libs, env.get("LD_LIBRARY_PATH", "")])
    env["PYTHONPATH"] = _join([str(_package_links(workspace)), *[p for p in sys.path if p and Path(p).is_dir()]])
    return [str(folder / "bin" / "tritonserver"), f"--backend-directory={workspace / 'backends'}"], env


def _package_links(workspace: Path) -> Path:
    """``workspace/pythonpath/dia2_trt/runtime`` -> the runtime this process imports."""
    root = workspace / "pythonpath"
    (root / "dia2_trt").mkdir(parents=True)
    (root / "dia2_trt" / "runtime").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    return root


def _join(parts: list[str]) -> str:
    return os.pathsep.join(p for p in parts if p)


def server_args(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, log_verbose: int,
                extra: tuple[str, ...]) -> list[str]:
    return [f"--model-repository={repo}", f"--http-address={host}", f"--http-port={http_port}",
            f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--metrics-address={host}",
            f"--metrics-port={metrics_port}", "--allow-metrics=true", "--allow-gpu-metrics=false",
            "--exit-on-error=true", "--strict-readiness=true", "--exit-timeout-secs=10",
            f"--log-verbose={log_verbose}", *extra]


def run(args: list[str]) -> int:
    """Run tritonserver with ``args`` until it exits; SIGINT/SIGTERM are passed on. Its exit status."""
    with tempfile.TemporaryDirectory(prefix="dia2-triton-") as workspace:
        head, env = prepare(Path(workspace))
        proc = subprocess.Popen([*head, *args], env=env, preexec_fn=_die_with_parent)
        forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return proc.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _die_with_parent() -> None:
    """In the child: SIGTERM when this command dies, however it dies (no orphaned server)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the server may outlive a killed parent
        pass
