"""Where a checkpoint's files come from, and loading them strictly.

A checkpoint is a directory in the Hugging Face repo layout (config.json,
model.safetensors, tokenizer files, optional dia2_assets.json), obtained one of
three ways: ``--size 1B|2B`` (the hub, through its cache), ``--size tiny`` (built
offline by models/tiny.py and cached), or ``--checkpoint DIR``. Its Mimi codec and
tokenizer are the ones it names, or the user's ``--mimi`` / ``--tokenizer`` (a local
directory or a hub id, as in the reference's CLI). A checkpoint may only name paths
inside itself; the user's own options may name any directory.

Every failure is one line saying what is missing and how to get it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dia2_trt.runtime.errors import first_line

from .config import ConfigError, load_config

if TYPE_CHECKING:
    from transformers import MimiModel

HUB_REPOS = {"1B": "nari-labs/Dia2-1B", "2B": "nari-labs/Dia2-2B"}
SIZES = ("tiny", *HUB_REPOS)
ASSETS_FILE = "dia2_assets.json"  # the checkpoint repo's asset list (not an artifact's manifest.json)
DEFAULT_MIMI = "kyutai/mimi"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
# Bump when models/tiny.py changes what it writes, so stale cached builds are not reused.
TINY_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, fetched or loaded."""


@dataclass(frozen=True)
class CheckpointFiles:
    config_path: Path
    weights_path: Path
    tokenizer_dir: Path
    mimi_ref: str  # a hub id or a local directory
    repo_id: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def resolve_checkpoint(size: str | None = None, checkpoint: str | Path | None = None, *,
                       mimi: str | None = None, tokenizer: str | None = None) -> CheckpointFiles:
    """Exactly one of ``size`` ("tiny", "1B", "2B") or ``checkpoint`` (a local directory); ``mimi`` and
    ``tokenizer`` (a directory or a hub id) replace what the checkpoint names, which is then not read."""
    if (size is None) == (checkpoint is None):
        raise CheckpointError("give either a model size or a checkpoint directory, not both or neither")
    overrides = _Overrides(_user_mimi(mimi) if mimi else None, _user_tokenizer(tokenizer) if tokenizer else None)
    if checkpoint is not None:
        return _resolve_local(Path(checkpoint), overrides)
    assert size is not None  # exactly one of the two, checked above
    key = size.upper() if size.lower() != "tiny" else "tiny"
    if key == "tiny":
        return _resolve_local(tiny_checkpoint_dir(), overrides)
    if key not in HUB_REPOS:
        raise CheckpointError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    return _resolve_hub(HUB_REPOS[key], overrides)


@dataclass(frozen=True)
class _Overrides:
    mimi: str | None = None  # a resolved local directory or a hub id
    tokenizer: Path | None = None  # a checked tokenizer directory


def _user_path(ref: str, option: str) -> Path | None:
    """The user's own directory (any path: it is their machine), or None for a hub id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or ref.startswith(("~", "./", "../")) or path.exists():
        raise CheckpointError(f"{option} {ref}: no such directory")
    return None


def _user_mimi(ref: str) -> str:
    path = _user_path(ref, "--mimi")
    return str(path) if path is not None else ref


def _user_tokenizer(ref: str) -> Path:
    path = _user_path(ref, "--tokenizer")
    return _check_tokenizer(path if path is not None else _hub_snapshot_files(ref, TOKENIZER_FILES))


# --- local directories -------------------------------------------------------


def _resolve_local(root: Path, overrides: _Overrides) -> CheckpointFiles:
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    manifest = _read_manifest(root / ASSETS_FILE)
    config_path = _require_file(root, manifest.get("config", "config.json"))
    weights_path = _require_file(root, manifest.get("weights", "model.safetensors"))
    assets = load_config(config_path).assets
    tokenizer_dir = overrides.tokenizer
    if tokenizer_dir is None:
        tokenizer_ref = manifest.get("tokenizer") or assets.tokenizer
        tokenizer_dir = _tokenizer_dir(tokenizer_ref, root) if tokenizer_ref else _check_tokenizer(root)
    mimi_ref = overrides.mimi or _local_or_hub(manifest.get("mimi") or assets.mimi or DEFAULT_MIMI, root, "--mimi")
    return CheckpointFiles(config_path, weights_path, tokenizer_dir, mimi_ref, None, manifest)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise CheckpointError(f"{path}: expected an object of file names and ids")
    return manifest


def _require_file(root: Path, name: str) -> Path:
    path = root / _contained(name, "file")
    if not path.is_file():
        raise CheckpointError(f"{name} not found in {root}")
    return path


def _contained(name: str, what: str, option: str | None = None) -> str:
    """A path named by the checkpoint must stay inside it: no absolute paths, no ``..`` out, no ``~``.

    Checked on the name, not on resolved files: a hub snapshot is made of symlinks into
    the cache's blob store, which is where its files legitimately live. ``option`` is the
    command-line option that names the same thing from the user instead."""
    normal = os.path.normpath(name)
    if Path(name).is_absolute() or name.startswith("~") or normal == ".." or normal.startswith(".." + os.sep):
        hint = f"; pass {option} DIR_OR_REPO to name it yourself" if option else ""
        raise CheckpointError(f"the checkpoint names {what} {name!r}, outside its directory; "
                              f"paths a checkpoint names must stay inside it{hint}")
    return name


def _local_or_hub(ref: str, root: Path, option: str) -> str:
    """An existing directory (relative to the checkpoint) wins; anything else is a hub id."""
    local = root / _contained(ref, "directory", option)
    if local.is_dir():
        return str(local.resolve())
    if ref.startswith("./"):
        raise CheckpointError(f"directory {local} (named by the checkpoint's assets) not found")
    return ref


def _tokenizer_dir(ref: str, root: Path) -> Path:
    resolved = _local_or_hub(ref, root, "--tokenizer")
    if Path(resolved).is_dir():
        return _check_tokenizer(Path(resolved))
    return _check_tokenizer(_hub_snapshot_files(resolved, TOKENIZER_FILES))


def _check_tokenizer(directory: Path) -> Path:
    if not ((directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()):
        raise CheckpointError(f"no tokenizer (tokenizer.json or vocab.json + merges.txt) found in {directory}")
    return directory


# --- the tiny checkpoint -----------------------------------------------------


def tiny_checkpoint_dir(seed: int = 0) -> Path:
    """The cached tiny checkpoint, built on first use.

    Built in a temporary sibling and renamed into place, so concurrent test
    workers never see half a checkpoint; a loser of the race discards its copy.
    """
    target = _cache_root() / f"tiny-v{TINY_FORMAT}-seed{seed}"
    if target.is_dir():
        return target
    from .tiny import build_tiny_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_checkpoint(tmp, seed=seed)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_root() -> Path:
    env = os.environ.get("DIA2_TRT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dia2-trt"


# --- the Hugging Face hub ----------------------------------------------------


def _resolve_hub(repo_id: str, overrides: _Overrides) -> CheckpointFiles:
    manifest = _hub_manifest(repo_id)
    config_name = _contained(manifest.get("config", "config.json"), "file")
    weights_name = _contained(manifest.get("weights", "model.safetensors"), "file")
    config_path = Path(_hub_file(repo_id, config_name))
    weights_path = Path(_hub_file(repo_id, weights_name))
    # Files of one revision share a snapshot directory, which then is the checkpoint root.
    root = config_path.parents[len(Path(config_name).parts) - 1]
    # As in the reference: a hub checkpoint's tokenizer is the manifest's or the repo's own.
    tokenizer_ref = manifest.get("tokenizer") or repo_id
    if overrides.tokenizer is not None:
        tokenizer_dir = overrides.tokenizer
    elif tokenizer_ref == repo_id:
        tokenizer_dir = _check_tokenizer(_hub_snapshot_files(repo_id, TOKENIZER_FILES))
    else:
        tokenizer_dir = _tokenizer_dir(tokenizer_ref, root)
    assets = load_config(config_path).assets
    mimi_ref = overrides.mimi or _local_or_hub(manifest.get("mimi") or assets.mimi or DEFAULT_MIMI, root, "--mimi")
    return CheckpointFiles(config_path, weights_path, tokenizer_dir, mimi_ref, repo_id, manifest)


def _hub_manifest(repo_id: str) -> dict[str, Any]:
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = _download(repo_id, ASSETS_FILE)
    except (EntryNotFoundError, CheckpointError):
        # Absent from the repo, or not cached while offline: both mean "no overrides";
        # if the repo itself is unreachable, fetching config.json says so.
        return {}
    return _read_manifest(Path(path))


def _hub_snapshot_files(repo_id: str, names: tuple[str, ...]) -> Path:
    """Fetch whichever of ``names`` the repo has; returns their snapshot directory."""
    from huggingface_hub.errors import EntryNotFoundError

    found = []
    for name in names:
        try:
            found.append(Path(_download(repo_id, name)))
        except EntryNotFoundError:
            continue
    if not found:
        raise CheckpointError(f"no tokenizer files of {repo_id} are available{_offline_hint(repo_id)}")
    return found[0].parent


def _hub_file(repo_id: str, name: str) -> str:
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return _download(repo_id, name)
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{name} of {repo_id} is not in the Hugging Face cache{_offline_hint(repo_id)}") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{name} not found in Hugging Face repo {repo_id}") from None


# Seconds to wait for a TCP connection to the hub (or the proxy) before treating the machine as offline.
PROBE_TIMEOUT = 3.0


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (no route, no DNS, refused), or None when a connection opens.

    Without this, an offline ``--size 1B`` spent 35-83 s in huggingface_hub's retries (5 per file,
    with backoff, printing a line each) before its one-line error. One TCP connect to the
    endpoint, or to the HTTPS proxy when one is set, answers in at most PROBE_TIMEOUT; when it
    fails the download goes on from the cache only (``local_files_only``), so cached files
    still work offline.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # the hub's own offline mode: it never tries the network
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    return None


def _download(repo_id: str, name: str) -> str:
    """hf_hub_download with the hub's failures other than "no such file" turned into CheckpointError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo_id, name, local_files_only=hub_unreachable() is not None)
    except EntryNotFoundError:
        raise
    except GatedRepoError:
        message = f"{repo_id} is gated: accept its terms on huggingface.co and run `hf auth login`"
        raise CheckpointError(message) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"Hugging Face repo {repo_id} not found (or private: run `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as exc:
        reason = first_line(exc)
        raise CheckpointError(f"could not fetch {name} from {repo_id}: {reason}") from None


def _offline_hint(repo_id: str) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return f" and HF_HUB_OFFLINE is set; run `hf download {repo_id}` on a machine with network"
    reason = hub_unreachable()
    reached = f" ({reason})" if reason else ""
    return f" and the hub could not be reached{reached}; check the network or run `hf download {repo_id}`"


# --- loading -----------------------------------------------------------------


def load_model(files: CheckpointFiles):
    """Dia2Model with every weight from the file: no missing, unexpected or mis-shaped tensors.

    Tensors are copied one at a time, so peak memory is the model plus one
    tensor, not the model plus the whole file.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    from .dia2 import Dia2Model

    cfg = load_config(files.config_path)
    model = Dia2Model.empty(cfg).eval()  # every tensor is overwritten below
    state = model.state_dict()
    path = files.weights_path
    try:
        with safe_open(str(path), framework="pt") as f:
            _check_keys(path, state, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            with torch.no_grad():
                for name, target in state.items():
                    target.copy_(f.get_tensor(name))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return model


def _check_keys(path: Path, state: dict, file_shapes: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(state) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(state))
    misshaped = [
        f"{k} (file {list(file_shapes[k])}, model {list(state[k].shape)})"
        for k in sorted(set(state) & set(file_shapes))
        if tuple(state[k].shape) != file_shapes[k]
    ]
    problems = [
        f"{len(items)} {label}: {', '.join(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if items
    ]
    if problems:
        raise CheckpointError(f"{path} does not match its config: {'; '.join(problems)}")


def load_mimi(ref: str) -> MimiModel:
    """transformers' MimiModel from a hub id or a local directory, float32, eval mode."""
    import torch
    from transformers import MimiModel

    try:
        offline = not Path(ref).is_dir() and hub_unreachable() is not None  # cache only: no minute of retries
        loaded: Any = MimiModel.from_pretrained(ref, dtype=torch.float32, output_loading_info=True,
                                                local_files_only=offline)
        model, info = loaded  # (model, loading info): transformers types the return as the model alone
    except OSError:
        if Path(ref).is_dir():
            raise CheckpointError(f"no Mimi weights (config.json + model.safetensors) in {ref}") from None
        message = f"Mimi {ref} could not be loaded from the Hugging Face cache{_offline_hint(ref)}"
        raise CheckpointError(message) from None
    except RuntimeError as exc:
        raise CheckpointError(f"cannot load Mimi from {ref}: {first_line(exc)}") from None
    # transformers fills missing weights with random ones and only warns; a
    # codebook's "initialized" flag is the one buffer it legitimately recreates.
    missing = [k for k in info["missing_keys"] if not k.endswith(".initialized")]
    if missing:
        example = sorted(missing)[0]
        raise CheckpointError(f"{ref} is not a Mimi checkpoint: {len(missing)} weights missing, e.g. {example}")
    return model.float().eval()


__all__ = [
    "CheckpointError",
    "CheckpointFiles",
    "ConfigError",
    "SIZES",
    "load_mimi",
    "load_model",
    "resolve_checkpoint",
    "tiny_checkpoint_dir",
]
