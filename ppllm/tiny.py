"""Tiny models and tokenizers made from scratch: the demo's default and the tests' fixtures."""
from __future__ import annotations

import json
import os
import tempfile

from data.dataset import read_records


def sample_texts(path: str) -> list[str]:
    texts = []
    for _, rec in read_records(path):
        for key in ("text", "instruct", "input", "output"):
            if isinstance(rec.get(key), str):
                texts.append(rec[key])
    return texts


def train_sentencepiece(texts: list[str], out_dir: str, vocab_size: int = 384) -> str:
    """Train a real SentencePiece BPE model and save it as a llama-style HF tokenizer folder."""
    import sentencepiece as spm
    from transformers import AutoTokenizer
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts))
        corpus = f.name
    try:
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, character_coverage=1.0,
            byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    finally:
        os.unlink(corpus)
    os.remove(os.path.join(out_dir, "tokenizer.vocab"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}, f)
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.save_pretrained(out_dir)  # adds tokenizer.json for fast loading
    return out_dir


def make_llama(out_dir: str, vocab_size: int, tokenizer_dir: str | None = None, seed: int = 0,
               safetensors: bool = True, **overrides) -> str:
    """A randomly initialised tiny LlamaForCausalLM saved as a HF folder."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    model.save_pretrained(out_dir, safe_serialization=safetensors)
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            shutil.copy2(os.path.join(tokenizer_dir, name), out_dir)
    return out_dir
