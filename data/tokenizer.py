"""A small tokenizer interface the data pipeline and templates rely on.

HF tokenizers (``tokenizer.json`` / ``tokenizer.model`` folders) are loaded
with ``AutoTokenizer``.  Segments are always encoded without special tokens;
templates add BOS/EOS and role tokens explicitly, so training and inference
render the exact same ids.
"""
from __future__ import annotations

import os


class Tokenizer:
    def __init__(self, hf):
        self.hf = hf
        self.bos_id = hf.bos_token_id
        self.eos_id = hf.eos_token_id
        pad = hf.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(hf)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        return None if tid == self.hf.unk_token_id and token != self.hf.unk_token else tid


def load_tokenizer(path: str) -> Tokenizer:
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    return Tokenizer(AutoTokenizer.from_pretrained(path))
