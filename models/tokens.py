"""Special token ids, resolved from the checkpoint the way the reference resolves them."""

from __future__ import annotations

import json
from pathlib import Path

from dia2_trt.runtime.state_machine import TokenIds
from dia2_trt.runtime.tokenizer import TextTokenizer

from .config import Dia2Config

# Strings the runtime's tokenizer must encode exactly like the reference's (speaker tags
# glued to words, apostrophes, digits, accents, typographic quotes, CJK).
PROBES = ("[S1] Hello", "[S2] well,", "don't", "10 o'clock", "café", "naïve", "\u2019tis", "(laughs)", "東京",
          "[S1]", "e-mail", "U.S.A.", "hmm...", "\u201cquoted\u201d")


class TokenizerMismatch(ValueError):
    """The tokenizers-library tokenizer would not give the reference's ids."""


class UntrustedTokenizer(ValueError):
    """The tokenizer can only be loaded by running Python that came with the checkpoint."""


def _auto_tokenizer(tokenizer_dir: str | Path):
    """The reference's tokenizer, never with the checkpoint's own code: an ``auto_map`` in
    tokenizer_config.json names Python that ``trust_remote_code=True`` would import and run.
    Dia2's tokenizer is a stock class, which transformers loads without it."""
    from transformers import AutoTokenizer  # export-time only

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False, trust_remote_code=False)
    except ValueError:
        if not _names_code(Path(tokenizer_dir)):
            raise
        raise UntrustedTokenizer(f"the tokenizer in {tokenizer_dir} names its own Python code (auto_map in "
                                 f"tokenizer_config.json); dia2-trt never runs code from a checkpoint") from None


def _names_code(tokenizer_dir: Path) -> bool:
    for name in ("tokenizer_config.json", "config.json"):
        try:
            raw = json.loads((tokenizer_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and "auto_map" in raw:
            return True
    return False


def check_tokenizer(tokenizer_dir: str | Path) -> None:
    """The runtime encodes with ``tokenizers``; the reference with transformers' AutoTokenizer.
    Refuse to build artifacts whose runtime would tokenise differently."""
    reference = _auto_tokenizer(tokenizer_dir)
    ours = TextTokenizer.from_dir(tokenizer_dir)
    for text in PROBES:
        expected = reference.encode(text, add_special_tokens=False)
        if ours.encode(text) != expected:
            raise TokenizerMismatch(f"tokenizer.json encodes {text!r} as {ours.encode(text)}, the reference's "
                                    f"tokenizer as {expected}: the runtime would not match the reference")


def resolve_token_ids(cfg: Dia2Config, tokenizer_dir: str | Path) -> TokenIds:
    """bos falls back to 1 when the tokenizer has none (or has id 0): the reference's
    ``getattr(tokenizer, "bos_token_id", 1) or 1``; a missing speaker tag maps to new_word."""
    tok = _auto_tokenizer(tokenizer_dir)
    vocab = tok.get_vocab()
    d = cfg.data

    def speaker(tag: str) -> int:
        return tok.convert_tokens_to_ids(tag) if tag in vocab else d.text_new_word_token_id

    return TokenIds(
        new_word=d.text_new_word_token_id,
        pad=d.text_pad_token_id,
        bos=getattr(tok, "bos_token_id", 1) or 1,
        zero=d.text_zero_token_id,
        spk1=speaker("[S1]"),
        spk2=speaker("[S2]"),
        audio_pad=d.audio_pad_token_id,
        audio_bos=d.audio_bos_token_id,
    )
