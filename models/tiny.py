"""Random-weight Dia2 checkpoints in the official layout, built offline.

* ``build_tiny_checkpoint``: a small, seeded checkpoint (config.json,
  model.safetensors, a byte-level BPE tokenizer at the root, a tiny Mimi in
  ``mimi/``) that every test and dry run can use without the hub.  Variants and
  overrides switch on the optional code paths one checkpoint cannot cover at once.
* ``build_real_vocab_checkpoint``: the tiny widths with Dia2's real vocabularies,
  32 codebooks, delay pattern and context: a benchmark checkpoint whose per-frame
  overhead (sampling over 2050 audio ids, 32 depformer stages, a 32-codebook
  codec) is the real model's, while its weight reads stay negligible.
* ``build_2b_topology_checkpoint``: the 2B shapes with random weights, for
  export dry runs and benchmarks (7.7 GB, written tensor by tensor).
* ``meta_model_from_topology``: the 2B model on the meta device, for shape checks.

Weights are written straight to safetensors one tensor at a time, so neither
builder holds the model and its serialized copy together.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from dia2_trt.runtime.files import write_atomic

from .config import Dia2Config, parse_config
from .dia2 import Dia2Model

TINY_BASE: dict[str, Any] = {
    "data": {
        "channels": 7,
        "action_vocab_size": 2,
        "text_pad_token_id": 3,
        "text_new_word_token_id": 2,
        "text_zero_token_id": 7,
        "action_pad_token_id": 0,
        "action_new_word_token_id": 1,
        # max delay > 1 and repeated delays, like the real [16, 18, 18, ...]; no 0:
        # at frame 0 nothing has been generated, so every channel must still read bos
        "delay_pattern": [1, 2, 3, 3, 3],
        "first_word_min_start": 2,
        "max_pad": 4,
        "second_stream_ahead": 2,
    },
    "model": {
        "decoder": {"n_layer": 2, "n_embd": 64, "n_hidden": 128, "gqa_query_heads": 4, "kv_heads": 2,
                    "gqa_head_dim": 16},
        "depformer": {"n_layer": 2, "n_embd": 32, "n_hidden": 64, "gqa_query_heads": 2, "kv_heads": 2,
                      "gqa_head_dim": 16, "apply_rope": True, "text_embedding": False,
                      "mlp_activations": ["silu", "linear"]},
        "linear": {"mlp_activations": ["silu", "linear"]},
        "dropout": 0.0,
        "rope_min_timescale": 1,
        "rope_max_timescale": 10000,
        "normalization_layer_epsilon": 1e-6,
    },
    # repeated ids, as in the real schedule [0, 1, 2, 3, 4, 4, ...]
    "runtime": {"max_context_steps": 160, "weights_schedule": [0, 1, 1, 2]},
    "assets": {"tokenizer": ".", "mimi": "mimi"},
}

# Dotted-key overrides; None deletes the key.  "default" mirrors the 2B's
# switches (no depformer text embedding, no low-rank text embedding).
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "text_embedding": {"model.depformer.text_embedding": True},
    "low_rank": {"model.decoder.low_rank_dim": 16},
    "full": {"model.depformer.text_embedding": True, "model.decoder.low_rank_dim": 16},
    # 16 codebooks (the batch engine's exactness tests), with delays like the real 16/18 in kind: the
    # first columns lie inside every codebook's delay (dead), as the real delays leave 15
    "codebooks16": {"data.channels": 18, "data.delay_pattern": [4, 5] + [6] * 14,
                    "runtime.weights_schedule": [0, 1, 1] + [2] * 12},
}

# Dia2-2B's data section and context (the confirmed entries of its config.json), on
# the tiny widths: the per-frame work that is not weight reads scales with these.
REAL_VOCAB_OVERRIDES: dict[str, Any] = {
    "data.channels": 34,
    "data.delay_pattern": [16] + [18] * 31,
    "data.first_word_min_start": 3,
    "data.max_pad": 8,
    "runtime.max_context_steps": 1500,
    "runtime.weights_schedule": [0, 1, 2, 3] + [4] * 27,
}
REAL_TEXT_VOCAB = 49280
REAL_CODEBOOK = 2048  # audio vocabulary 2050 = 2048 codes + bos + pad

# Low ids reserved like the real tokenizer's; 2, 3 and 7 are the config's
# new_word, pad and zero ids, so the text stream's control ids are named tokens.
SPECIAL_TOKENS = ["<unk>", "<s>", "<new_word>", "<pad>", "</s>", "[S1]", "[S2]", "<zero>"]
TOKENIZER_VOCAB = 384

_CORPUS = """\
Hello there, how are you doing today? I'm fine, thanks for asking.
We'll meet at 10 o'clock near the old station, it's only 3 minutes away.
She said she'd bring the coffee, but he didn't believe her at all.
The quick brown fox jumps over the lazy dog, again and again and again.
Would you like to hear a story about a café on the corner of 5th street?
They're going to build a new bridge in 2025, or maybe in 2026, who knows.
It was a bright cold day in April, and the clocks were striking thirteen.
Speak slowly, please; the recording starts in one, two, three seconds.
Oh no! What happened to the dog? Nothing, he's just sleeping in the sun.
You can't be serious. Yes I can, and I'm telling you it's true.
Good morning, good evening, good night, and see you tomorrow my friend.
Dialogue needs two speakers: one asks a question, the other one answers it.
"""


def tiny_config(*, variant: str = "default", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny config.json before the vocabulary sizes that the tokenizer and Mimi decide."""
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {', '.join(TINY_VARIANTS)}")
    raw = copy.deepcopy(TINY_BASE)
    for key, value in {**TINY_VARIANTS[variant], **(overrides or {})}.items():
        _set_dotted(raw, key, value)
    return raw


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value


def build_tiny_checkpoint(
    out_dir: str | Path, *, seed: int = 0, variant: str = "default", overrides: dict[str, Any] | None = None
) -> Path:
    """Write a deterministic tiny checkpoint into ``out_dir``; returns it.

    ``overrides`` maps dotted config keys (``"data.delay_pattern"``) to values and
    is applied last, so it can also replace the derived vocabulary sizes.
    """
    from .mimi_stream import make_tiny_mimi  # transformers is only needed here

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = tiny_config(variant=variant)
    mimi = make_tiny_mimi(seed, num_quantizers=raw["data"]["channels"] - 2)
    tokenizer_size = write_tiny_tokenizer(out)
    codebook = mimi.config.codebook_size
    raw["data"].update(
        text_vocab_size=_round_up(tokenizer_size, 64),
        audio_vocab_size=codebook + 2,
        audio_pad_token_id=codebook + 1,
        audio_bos_token_id=codebook,
    )
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    cfg = parse_config(raw, source="tiny config")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_random_weights(cfg, out / "model.safetensors", seed=seed)
    mimi.save_pretrained(out / "mimi")
    return out


def build_real_vocab_checkpoint(out_dir: str | Path, *, seed: int = 0) -> Path:
    """The tiny widths with the real vocabularies (text 49280, audio 2050), 32 codebooks and delays.

    Its Mimi is the tiny one with the real 32 x 2048 codebooks; the decoder's widths
    stay small (the codec's real-size cost is measured on the 2B benchmark checkpoint).
    """
    from .mimi_stream import tiny_mimi_config

    raw = tiny_config(overrides=REAL_VOCAB_OVERRIDES)
    quantizers = raw["data"]["channels"] - 2
    mimi = randomize_mimi_model(tiny_mimi_config(quantizers, codebook_size=REAL_CODEBOOK), seed)
    return _write_checkpoint(Path(out_dir), raw, mimi, seed, text_vocab=REAL_TEXT_VOCAB)


def randomize_mimi_model(config, seed: int):
    from transformers import MimiModel

    from .mimi_stream import randomize_mimi

    return randomize_mimi(MimiModel(config).eval(), seed)


def _write_checkpoint(out: Path, raw: dict[str, Any], mimi, seed: int, *, text_vocab: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_size = write_tiny_tokenizer(out)
    if tokenizer_size > text_vocab:
        raise ValueError(f"the tokenizer's {tokenizer_size} ids do not fit a text vocabulary of {text_vocab}")
    codebook = mimi.config.codebook_size
    raw["data"].update(text_vocab_size=text_vocab, audio_vocab_size=codebook + 2,
                       audio_pad_token_id=codebook + 1, audio_bos_token_id=codebook)
    cfg = parse_config(raw, source="tiny config")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_random_weights(cfg, out / "model.safetensors", seed=seed)
    mimi.save_pretrained(out / "mimi")
    return out


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def write_tiny_tokenizer(out_dir: str | Path) -> int:
    """Train the byte-level BPE on the built-in corpus and save it in both layouts; returns its size.

    tokenizer.json serves the ``tokenizers`` library (the torch-free runtime);
    vocab.json + merges.txt + tokenizer_config.json serve
    ``AutoTokenizer.from_pretrained(use_fast=False)``, as the reference loads it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 1_000_000,
        "added_tokens_decoder": added,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return tok.get_vocab_size()


def write_random_weights(cfg: Dia2Config, path: str | Path, *, seed: int = 0) -> None:
    """Seeded random weights for ``Dia2Model(cfg)``'s exact state dict, streamed to safetensors."""
    with torch.device("meta"):
        specs = {name: tuple(t.shape) for name, t in Dia2Model(cfg).state_dict().items()}
    names = sorted(specs)
    index = {name: i for i, name in enumerate(names)}

    def make(name: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index[name])
        return _init_tensor(cfg, name, specs[name], gen)

    write_safetensors_streaming(path, [(n, specs[n]) for n in names], make)


def _init_tensor(cfg: Dia2Config, name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        # not all ones, so a missed norm shows up in parity tests
        return 1.0 + 0.2 * torch.randn(shape, generator=gen)
    if "embed" in name:
        table = torch.randn(shape, generator=gen)
        if name.startswith("transformer.audio_embeds."):
            # A shared positive offset in feature 0 gives the backbone output a
            # steady direction the action head can read as a bias (it has none).
            table[:, 0] += 2.0
        return table
    weight = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
    if name == "transformer.action_head.weight":
        _favour_new_word(cfg, weight)
    return weight


def _favour_new_word(cfg: Dia2Config, weight: torch.Tensor) -> None:
    """Make the random model pick "new word" most of the time, so a script is consumed
    and greedy decoding reaches its end well within max_context_steps."""
    new_word, pad = cfg.data.action_new_word_token_id, cfg.data.action_pad_token_id
    weight[new_word, 0] += 1.0
    weight[pad, 0] -= 1.0


def write_safetensors_streaming(
    path: str | Path, specs: Iterable[tuple[str, tuple[int, ...]]], make: Callable[[str], torch.Tensor]
) -> None:
    """Write float32 tensors one at a time in the safetensors format (atomically, via a temp file).

    ``safetensors.torch.save_file`` needs every tensor in memory at once; the
    format itself is just a JSON header of offsets followed by raw data, so it
    can be produced incrementally.
    """
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape in specs:
                tensor = make(name).to(torch.float32).contiguous()
                if tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: made shape {list(tensor.shape)}, declared {list(shape)}")
                f.write(tensor.numpy().tobytes())
                del tensor

    write_atomic(Path(path), write)


def load_topology(path: str | Path) -> dict[str, Any]:
    """A topology file is a config.json plus notes under keys starting with '_'."""
    raw = json.loads(Path(path).read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def meta_model_from_topology(path: str | Path) -> Dia2Model:
    with torch.device("meta"):
        return Dia2Model(parse_config(load_topology(path), source=str(path)))


def build_2b_topology_checkpoint(out_dir: str | Path, seed: int = 0, *, topology: str | Path | None = None) -> Path:
    """Random weights in the exact 2B shapes, plus the tiny tokenizer (its ids fit the 2B vocabulary).

    Mimi is left to the default hub id (kyutai/mimi), whose codebook matches the
    2B audio vocabulary; a tiny Mimi would not.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = load_topology(topology or default_topology_path())
    raw["assets"] = {"tokenizer": "."}
    cfg = parse_config(raw, source="2B topology")
    write_tiny_tokenizer(out)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_random_weights(cfg, out / "model.safetensors", seed=seed)
    return out


TOPOLOGIES = Path(__file__).resolve().parent / "topologies"  # package data: config.json shapes of the real sizes


def default_topology_path() -> Path:
    """The Dia2-2B topology shipped with the package (see its "_about" for what is confirmed)."""
    return TOPOLOGIES / "dia2-2b.json"
