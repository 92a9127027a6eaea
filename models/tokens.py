"""Special token ids, resolved from the checkpoint the way the reference resolves them."""

from __future__ import annotations

from pathlib import Path

from dia2_trt.runtime.state_machine import TokenIds

from .config import Dia2Config


def resolve_token_ids(cfg: Dia2Config, tokenizer_dir: str | Path) -> TokenIds:
    """bos falls back to 1 when the tokenizer has none (or has id 0): the reference's
    ``getattr(tokenizer, "bos_token_id", 1) or 1``; a missing speaker tag maps to new_word."""
    from transformers import AutoTokenizer  # export-time only

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False, trust_remote_code=True)
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
