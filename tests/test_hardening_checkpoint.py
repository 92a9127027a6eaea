"""Hostile checkpoints (issue 11): no code that comes with one runs, and every path it names stays inside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hardening_support import _export

# --- no code from a checkpoint ------------------------------------------------


def _checkpoint_with_code(src: Path, dst: Path, tokenizer_class: str) -> Path:
    shutil.copytree(src, dst)
    marker = dst.parent / "PWNED"
    (dst / "evil_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    config["tokenizer_class"] = tokenizer_class
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return marker


@pytest.mark.parametrize("tokenizer_class", ["EvilTokenizer", "PreTrainedTokenizerFast"])
def test_checkpoint_tokenizer_code_never_runs(tmp_path, tiny_checkpoint, tokenizer_class):
    from dia2_trt.models import tokens

    ckpt = tmp_path / "ckpt"
    marker = _checkpoint_with_code(tiny_checkpoint, ckpt, tokenizer_class)
    try:
        tokens.check_tokenizer(ckpt)  # a stock class named beside the auto_map loads as that class
    except tokens.UntrustedTokenizer as exc:
        assert tokenizer_class == "EvilTokenizer" and "never runs code" in str(exc)
    else:
        assert tokenizer_class == "PreTrainedTokenizerFast"
    assert not marker.exists()


def test_build_refuses_checkpoint_code_with_one_line(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    marker = _checkpoint_with_code(tiny_checkpoint, ckpt, "EvilTokenizer")
    done = _export(["build", "--checkpoint", ckpt, "--out", tmp_path / "art"])
    assert done.exit_code == 1 and "Traceback" not in done.output
    assert done.stderr.splitlines()[-1].startswith("Error: ") and "never runs code" in done.stderr.splitlines()[-1]
    assert not marker.exists() and not (tmp_path / "art").exists()


@pytest.mark.parametrize("assets", [
    {"config": "../elsewhere/config.json"},
    {"weights": "/etc/passwd"},
    {"tokenizer": "../"},
    {"mimi": "../../mimi"},
    {"tokenizer": "~/tok"},
])
def test_paths_named_by_a_checkpoint_stay_inside_it(tmp_path, tiny_checkpoint, assets):
    from dia2_trt.models.sources import CheckpointError, resolve_checkpoint

    ckpt = tmp_path / "inner" / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    shutil.copytree(tiny_checkpoint, tmp_path / "elsewhere")
    (ckpt / "dia2_assets.json").write_text(json.dumps(assets))
    with pytest.raises(CheckpointError, match="outside its directory") as info:
        resolve_checkpoint(checkpoint=ckpt)
    assert "\n" not in str(info.value)


def test_config_assets_stay_inside_the_checkpoint(tmp_path, tiny_checkpoint):
    from dia2_trt.models.sources import CheckpointError, resolve_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["assets"]["mimi"] = str(tiny_checkpoint / "mimi")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="outside its directory"):
        resolve_checkpoint(checkpoint=ckpt)
