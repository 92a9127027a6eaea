"""Checkpoint resolution, strict loading, the tiny checkpoint and its tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dia2_trt.models.config import ConfigError, load_config
from dia2_trt.models.sources import CheckpointError, load_mimi, load_model, resolve_checkpoint
from dia2_trt.models.tiny import (
    build_tiny_checkpoint,
    default_topology_path,
    meta_model_from_topology,
    write_random_weights,
)

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, variant="full")


@pytest.fixture()
def tiny_copy(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "copy"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- strict loading -----------------------------------------------------------


def test_tiny_checkpoint_round_trips(tiny):
    files = resolve_checkpoint(checkpoint=tiny)
    assert files.tokenizer_dir == tiny and Path(files.mimi_ref) == (tiny / "mimi").resolve()
    assert files.repo_id is None and files.manifest == {}
    model = load_model(files)
    state = model.state_dict()
    with safe_open(str(files.weights_path), framework="pt") as f:
        assert set(f.keys()) == set(state)
        for name in f.keys():
            assert torch.equal(state[name], f.get_tensor(name)), name


@pytest.mark.parametrize(
    ("variant", "present", "absent"),
    [
        ("default", [], ["depformer.text_embed.embedding.weight"]),
        ("text_embedding", ["depformer.text_embed.embedding.weight"], []),
        ("low_rank", [], ["depformer.text_embed.embedding.weight"]),
    ],
)
def test_variants_build_and_load(tmp_path, variant, present, absent):
    root = build_tiny_checkpoint(tmp_path / variant, variant=variant)
    state = load_model(resolve_checkpoint(checkpoint=root)).state_dict()
    assert all(k in state for k in present) and not any(k in state for k in absent)
    low_rank = load_config(root / "config.json").model.decoder.low_rank_dim
    assert state["transformer.text_embed.embedding.weight"].shape[1] == (low_rank or 64)
    assert (low_rank is not None) == (variant == "low_rank")


def test_tiny_exercises_every_code_path(tiny):
    cfg = load_config(tiny / "config.json")
    d = cfg.data
    schedule = cfg.runtime.weights_schedule
    assert len(set(schedule)) < len(schedule) and d.audio_channels >= 4
    assert max(d.delay_pattern) > 1 and min(d.delay_pattern) >= 1
    assert len(set(d.delay_pattern)) < len(d.delay_pattern)
    assert d.second_stream_ahead == 2 and d.max_pad > 0 and d.first_word_min_start > 0
    assert (d.audio_pad_token_id, d.audio_bos_token_id) == (d.audio_vocab_size - 1, d.audio_vocab_size - 2)
    assert cfg.model.depformer.text_embedding and cfg.model.decoder.low_rank_dim
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        norms = [f.get_tensor(k) for k in f.keys() if k.endswith("norm.weight")]
        assert norms and all(not torch.equal(n, torch.ones_like(n)) for n in norms)
        embeds = [f.get_tensor(f"transformer.audio_embeds.{i}.weight") for i in range(2)]
        assert not torch.equal(embeds[0], embeds[1])


def test_greedy_decoding_reaches_the_end_of_a_script(tiny):
    from tokenizers import Tokenizer

    from dia2_trt.models.reference import ReferenceLoop
    from dia2_trt.models.tokens import resolve_token_ids
    from dia2_trt.runtime.params import GenerationParams

    files = resolve_checkpoint(checkpoint=tiny)
    model = load_model(files)
    tok = Tokenizer.from_file(str(files.tokenizer_dir / "tokenizer.json"))
    loop = ReferenceLoop(model, resolve_token_ids(model.config, files.tokenizer_dir),
                         lambda s: tok.encode(s, add_special_tokens=False).ids, 12.5)
    result = loop.run("[S1] Hello there, how are you? [S2] I'm fine.", GenerationParams(
        text_temperature=0.0, audio_temperature=0.0))
    assert [w for w, _ in result.timestamps] == ["Hello", "there,", "how", "are", "you?", "I'm", "fine."]
    assert result.frames < model.config.runtime.max_context_steps


# --- the 2B topology ----------------------------------------------------------


def test_2b_topology_matches_the_official_parameter_list():
    # The parameter list (names and shapes of the public 2B safetensors) is test data.
    expected = json.loads((DATA / "dia2-2b-parameters.json").read_text())
    model = meta_model_from_topology(default_topology_path())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected
    assert len(shapes) == 450
    assert sum(p.numel() for p in model.state_dict().values()) == 1_919_556_608


# --- errors -------------------------------------------------------------------


def _edit_config(root: Path, edit) -> None:
    raw = json.loads((root / "config.json").read_text())
    edit(raw)
    (root / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda raw: raw["data"].pop("channels"), "missing field 'channels'"),
        (lambda raw: raw["model"]["decoder"].update(n_embd="64"), "decoder.n_embd: expected int"),
        (lambda raw: raw.pop("runtime"), "runtime"),
    ],
)
def test_bad_config_is_one_line(tiny_copy, edit, needle):
    _edit_config(tiny_copy, edit)
    with pytest.raises(ConfigError) as exc:
        resolve_checkpoint(checkpoint=tiny_copy)
    assert needle in _one_line(exc)


@pytest.mark.parametrize(
    ("remove", "needle"),
    [
        (["model.safetensors"], "model.safetensors not found in"),
        (["config.json"], "config.json not found in"),
        (["tokenizer.json", "vocab.json"], "no tokenizer"),
    ],
)
def test_missing_files(tiny_copy, remove, needle):
    for name in remove:
        (tiny_copy / name).unlink()
    with pytest.raises(CheckpointError) as exc:
        resolve_checkpoint(checkpoint=tiny_copy)
    assert needle in _one_line(exc) and str(tiny_copy) in str(exc.value)


def test_bad_arguments(tmp_path):
    for kwargs, needle in [
        ({"size": "3B"}, "valid sizes: tiny, 1B, 2B"),
        ({}, "either"),
        ({"size": "2B", "checkpoint": tmp_path}, "either"),
        ({"checkpoint": tmp_path / "nowhere"}, "checkpoint directory not found"),
    ]:
        with pytest.raises(CheckpointError) as exc:
            resolve_checkpoint(**kwargs)
        assert needle in _one_line(exc)


def test_weights_mismatch_names_every_bad_key(tiny_copy):
    path = tiny_copy / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    del state["transformer.norm.weight"]
    state["transformer.extra.weight"] = torch.zeros(2)
    state["transformer.cb0_head.weight"] = torch.zeros(3, 3)
    save_file(state, str(path))
    files = resolve_checkpoint(checkpoint=tiny_copy)
    with pytest.raises(CheckpointError) as exc:
        load_model(files)
    message = _one_line(exc)
    for needle in ("1 missing: transformer.norm.weight", "1 unexpected: transformer.extra.weight",
                   "1 mis-shaped: transformer.cb0_head.weight (file [3, 3]"):
        assert needle in message


def test_corrupt_weights(tiny_copy):
    (tiny_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError) as exc:
        load_model(resolve_checkpoint(checkpoint=tiny_copy))
    assert "cannot read" in _one_line(exc)


def test_offline_with_empty_cache_is_a_clean_error(tmp_path):
    # A fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_HOME at import.
    script = textwrap.dedent("""
        from dia2_trt.models.sources import CheckpointError, resolve_checkpoint
        try:
            resolve_checkpoint(size="2B")
        except CheckpointError as exc:
            print(exc)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        "config.json of nari-labs/Dia2-2B is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
        "run `hf download nari-labs/Dia2-2B` on a machine with network"
    ]


def test_offline_resolves_from_a_populated_hf_cache(tiny, tmp_path):
    # The hub's cache layout: refs/main names the snapshot holding the repo's files.
    repo_dir = tmp_path / "hf" / "hub" / "models--nari-labs--Dia2-1B"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny, repo_dir / "snapshots" / commit, ignore=shutil.ignore_patterns("mimi", "merges.txt"))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    script = textwrap.dedent("""
        from dia2_trt.models.sources import resolve_checkpoint
        files = resolve_checkpoint(size="1b")
        print(files.repo_id, files.config_path.parent.name, files.tokenizer_dir.name, files.weights_path.name)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["nari-labs/Dia2-1B", commit, commit, "model.safetensors"]


# --- manifest, tiny cache, Mimi -----------------------------------------------


def test_manifest_overrides_file_names(tiny_copy):
    (tiny_copy / "model.safetensors").rename(tiny_copy / "weights-v2.safetensors")
    manifest = {"weights": "weights-v2.safetensors", "mimi": "kyutai/mimi"}
    (tiny_copy / "dia2_assets.json").write_text(json.dumps(manifest))
    files = resolve_checkpoint(checkpoint=tiny_copy)
    assert files.weights_path == tiny_copy / "weights-v2.safetensors"
    assert files.mimi_ref == "kyutai/mimi"
    assert files.manifest["weights"] == "weights-v2.safetensors"


def test_size_tiny_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIA2_TRT_CACHE", str(tmp_path))
    first = resolve_checkpoint(size="tiny")
    stamp = first.weights_path.stat().st_mtime_ns
    second = resolve_checkpoint(size="TINY")
    assert second == first and second.weights_path.stat().st_mtime_ns == stamp
    assert first.config_path.parent.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [first.config_path.parent.name]  # no temp dirs left


def test_load_mimi(tiny):
    files = resolve_checkpoint(checkpoint=tiny)
    mimi = load_mimi(files.mimi_ref)
    assert not mimi.training and next(mimi.parameters()).dtype == torch.float32
    assert mimi.config.num_quantizers == load_config(files.config_path).data.audio_channels
    assert mimi.config.codebook_size + 2 == load_config(files.config_path).data.audio_vocab_size
    with pytest.raises(CheckpointError) as exc:
        load_mimi(str(tiny))  # the Dia2 checkpoint itself is no Mimi
    assert "not a Mimi checkpoint" in _one_line(exc)


# --- determinism and the tokenizer --------------------------------------------


def test_tiny_build_is_deterministic(tiny, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again", seed=0, variant="full")
    assert _file_hashes(again) == _file_hashes(tiny)
    cfg = load_config(tiny / "config.json")
    write_random_weights(cfg, tmp_path / "seed1.safetensors", seed=1)
    assert (tmp_path / "seed1.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


STRINGS = [
    "[S1] hello", "[S2] hello", "[S1] Hello there, how are you?", "[S2] I'm fine, thanks.",
    "hello", "world", "Hello", "HELLO", "don't", "it's", "we'll", "they're", "I'd", "o'clock",
    "10", "2025", "3.14", "5th", "1,000,000", "café", "naïve", "über", "l’été", "don’t", "Zoë",
    "日本語", "emoji 🙂", "tab\tseparated", "  leading spaces", "trailing ", "[S1]", "[S2][S1]",
    "[S1] [S2] x", "hello [S2] world", "<s>", "<pad> <zero>", "question?!", "(parens) and \"quotes\"",
]


def test_tokenizer_libraries_agree(tiny, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(tiny), use_fast=False, trust_remote_code=False)
    # Without tokenizer.json, transformers must rebuild the same tokenizer from vocab.json + merges.txt.
    slow_dir = tmp_path / "slow"
    shutil.copytree(tiny, slow_dir, ignore=shutil.ignore_patterns("tokenizer.json", "mimi", "*.safetensors"))
    slow = AutoTokenizer.from_pretrained(str(slow_dir), use_fast=False, trust_remote_code=False)
    for text in STRINGS:
        ids = fast.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False) == slow.encode(text, add_special_tokens=False), text
    assert ref.bos_token_id == 1 and fast.token_to_id("<s>") == 1
    assert (ref.convert_tokens_to_ids("[S1]"), ref.convert_tokens_to_ids("[S2]")) == (5, 6)
    cfg = load_config(tiny / "config.json").data
    assert [fast.id_to_token(i) for i in (cfg.text_new_word_token_id, cfg.text_pad_token_id, cfg.text_zero_token_id)] \
        == ["<new_word>", "<pad>", "<zero>"]
    assert fast.get_vocab_size() <= cfg.text_vocab_size
