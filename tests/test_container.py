"""The CPU image (Dockerfile) is built with podman and `dia2-rt speak` runs inside it.

Base images cannot be pulled on these machines, so the base is made locally: debootstrap
of Debian bookworm (minbase + python3, the slim base's Python 3.11), imported into
podman and kept in a cache (podman storage under /var/cache/dia2-trt, tag keyed by the
recipe's hash), so only the first run on a machine pays for it (~95 s debootstrap, then
each build ~85 s on 2 cores). The image cannot reach PyPI (TLS interception here), so
its dependencies are wheels built on the host and handed in as build/wheelhouse.

podman runs with runc, vfs storage and a containers.conf without default ulimits and
with cgroupfs (crun fails on these hosts' hybrid cgroups). Without podman, runc, root
or a base, the test skips with the reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "tiny-artifacts"
ROOMS = ["runtime", "models", "export", "calibration", "benchmarks"]
SUITE, MIRROR, INCLUDE = "bookworm", "http://deb.debian.org/debian", "python3,python3-venv"
BASE_PYTHON = (3, 11)  # bookworm's python3: the host-built wheels must be for it
SCRIPT = "[S1] Hello from the container. [S2] And from the host."

def _cache_dir() -> Path:
    return Path(os.environ.get("DIA2_TRT_CONTAINER_CACHE", "/var/cache/dia2-trt"))


def _podman_env(cache: Path) -> dict[str, str]:
    """containers.conf / storage.conf for this machine kind, in the cache (storage persists there)."""
    conf, storage = cache / "containers.conf", cache / "storage.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n')
    storage.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{cache}/storage"\nrunroot = "{cache}/run"\n')
    return {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}


def _run(cmd, env, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def podman():
    missing = [tool for tool in ("podman", "runc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install podman runc debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("podman with runc and vfs storage is set up here for root only")
    if sys.version_info[:2] != BASE_PYTHON:
        pytest.skip(f"the wheelhouse is built by this Python {sys.version_info[:2]}; the base has {BASE_PYTHON}")
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        pytest.skip(f"no container cache at {cache}: {exc.strerror}")
    env = _podman_env(cache)
    info = _run(["podman", "info"], env)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    return env


def _base_image(env: dict[str, str]) -> str:
    """The local Debian base, made once per recipe (a lock keeps parallel runs from making it twice)."""
    key = hashlib.sha256(f"{SUITE} minbase {INCLUDE} {MIRROR}".encode()).hexdigest()[:12]
    tag = f"localhost/dia2-trt-base:{SUITE}-{key}"
    cache = _cache_dir()
    with open(cache / "base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _run(["podman", "image", "exists", tag], env).returncode == 0:
            return tag
        if shutil.which("debootstrap") is None:
            pytest.skip("no cached base image and no debootstrap to make one")
        rootfs = cache / f"rootfs-{key}"
        made = _run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(rootfs), MIRROR], env)
        if made.returncode != 0:
            shutil.rmtree(rootfs, ignore_errors=True)  # ours: made just above
            pytest.skip(f"debootstrap failed (no Debian mirror?): {made.stdout.decode(errors='replace')[-300:]}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = _run(["podman", "import", "-", tag], env, stdin=tar.stdout)
        tar.wait()
        shutil.rmtree(rootfs)  # ours; the image now holds it
        assert imported.returncode == 0, imported.stderr.decode(errors="replace")
        return tag


def _context(tmp: Path) -> Path:
    """The build context: what .containerignore lets in, plus a wheelhouse of every dependency."""
    ctx = tmp / "context"
    ctx.mkdir()
    for name in ("Dockerfile", ".containerignore", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, ctx / name)
    for room in ROOMS:
        shutil.copytree(ROOT / room, ctx / room, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    from packaging.requirements import Requirement

    deps = [str(Requirement(r)).split(";")[0] for r in requires("dia2-trt") or []
            if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": "serve"})]
    wheels = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(ctx / "build" / "wheelhouse"),
                             *deps, "setuptools>=70", "wheel"], capture_output=True, check=False)
    if wheels.returncode != 0:
        pytest.skip(f"cannot build the wheelhouse here: {wheels.stderr.decode(errors='replace')[-300:]}")
    return ctx


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.tensorrt", "Dockerfile.jetson"])
def test_recipes_take_their_base_as_an_argument_and_serve(name):
    """Every image's base is a build argument (the CPU one made locally here, NGC's or L4T's elsewhere)."""
    lines = [line.strip() for line in (ROOT / name).read_text().splitlines() if line.strip()]
    code = [line for line in lines if not line.startswith("#")]
    assert code[0].startswith("ARG BASE_IMAGE=")
    assert all(line.split()[1] == "${BASE_IMAGE}" for line in code if line.startswith("FROM "))
    assert code[-1].startswith('CMD ["dia2-rt", "serve", "--artifacts", "/artifacts"')
    assert any(line.startswith("USER 10001") for line in code)  # not root


def test_ignore_files_agree():
    """podman reads .containerignore, docker .dockerignore: one list in two names."""
    assert (ROOT / ".containerignore").read_text() == (ROOT / ".dockerignore").read_text()


@pytest.mark.slow
def test_cpu_image_speaks_what_the_host_speaks(podman, tmp_path):
    env = podman
    base = _base_image(env)
    tag = f"localhost/dia2-trt-test:{os.getpid()}"
    # --layers=false: with vfs every layer is a full copy of the tree, so per-step layers cost
    # more time (132 s against 83 s, measured) and leave ~1 GB of dangling images per run.
    built = _run(["podman", "build", "-q", "--layers=false", "--build-arg", f"BASE_IMAGE={base}", "-t", tag,
                  str(_context(tmp_path))], env)
    assert built.returncode == 0, built.stderr.decode(errors="replace")[-2000:]
    try:
        inside = _run(["podman", "run", "--rm", "--network=none", "-v", f"{FIXTURE}:/artifacts:ro", tag, "sh", "-c",
                       'dia2-rt speak --quiet --artifacts /artifacts --out /tmp/out.wav "$0" && cat /tmp/out.wav',
                       SCRIPT], env)
        assert inside.returncode == 0, inside.stderr.decode(errors="replace")
        subprocess.run([sys.executable, "-m", "dia2_trt.runtime", "speak", "--quiet", "--artifacts", str(FIXTURE),
                        "--out", str(tmp_path / "host.wav"), SCRIPT], capture_output=True, check=True)
        host = (tmp_path / "host.wav").read_bytes()
        assert inside.stdout[:4] == b"RIFF" and len(inside.stdout) > 24000  # a WAV, over half a second
        assert inside.stdout == host
        # No torch and no onnx in the image: dia2-export's help must still answer (its imports are lazy).
        helped = _run(["podman", "run", "--rm", "--network=none", tag, "dia2-export", "-h"], env)
        assert helped.returncode == 0 and b"Usage: dia2-export" in helped.stdout, helped.stderr
        served = _run(["podman", "image", "inspect", "--format", "{{json .Config.Cmd}} {{.Config.User}}", tag], env)
        assert b'"dia2-rt","serve"' in served.stdout and b"10001" in served.stdout
    finally:
        _run(["podman", "rmi", "-f", tag], env)
