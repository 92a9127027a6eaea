"""Text tokenizer over the ``tokenizers`` library (the runtime has no transformers).

Ids must equal the reference's ``AutoTokenizer(use_fast=False)`` ids; the
export step checks that on the real tokenizer files and records the special
token ids in the manifest, so here we only encode.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .files import read_regular

# tokenizer.json of large vocabularies is a few MB (Llama 3's 128k: 9 MB); read within a bound,
# as a regular file, before the tokenizers library parses it.
MAX_TOKENIZER_BYTES = 64 << 20


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"tokenizer.json not found in {path}")
        data = read_regular(file, MAX_TOKENIZER_BYTES, "tokenizer file")  # InputFileError: one line
        return cls(Tokenizer.from_str(data.decode("utf-8", errors="strict").removeprefix("\ufeff")))

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers' words for a str that is not UTF-8 text (a lone surrogate)
            raise ValueError(f"cannot tokenize {text[:40]!r}: not UTF-8 text") from None

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
