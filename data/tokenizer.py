"""The small tokenizer interface the data pipeline and templates rely on.

Two implementations share it:
  * ``Tokenizer`` wraps a HF tokenizer (``tokenizer.json`` folders: llama, llama3, bloom, ...);
  * ``SPTokenizer`` drives a SentencePiece ``tokenizer.model`` with the ``sentencepiece``
    package directly and appends special tokens after the piece vocabulary.  chatglm3 and
    baichuan2 ship remote tokenizer classes that do not load under transformers 5.x, so
    their folders are read this way (REFERENCE §2).

Text is always encoded without special tokens; templates add BOS/EOS and role tokens
themselves, so training and inference render the exact same ids.
"""
from __future__ import annotations

import hashlib
import json
import os

# appended after the 64789 SentencePiece pieces, in this order (ids 64789..64797)
CHATGLM3_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|observation|>")


def _fingerprint(folder: str | None, extra: str = "") -> str:
    """A content hash of the tokenizer files: part of the data cache key."""
    h = hashlib.sha256(extra.encode())
    if folder and os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "generation_config.json"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


class Tokenizer:
    """A HF tokenizer. ``adds_bos`` is the tokenizer's own convention (probed, not guessed)."""
    kind = "hf"

    def __init__(self, hf, fingerprint: str | None = None, generation_config: dict | None = None):
        self.hf = hf
        self.bos_id = hf.bos_token_id
        self.eos_id = hf.eos_token_id
        pad = hf.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(hf)
        self.fingerprint = fingerprint or _fingerprint(getattr(hf, "name_or_path", None), type(hf).__name__)
        self.generation_config = generation_config or {}
        self._fast = getattr(hf, "backend_tokenizer", None)
        try:
            with_specials = hf("a", add_special_tokens=True)["input_ids"]
            self.adds_bos = bool(with_specials) and self.bos_id is not None and with_specials[0] == self.bos_id
        except Exception:
            self.adds_bos = self.bos_id is not None

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def id_to_token(self, tid: int) -> str:
        return self.hf.convert_ids_to_tokens(int(tid))

    def encode_with_specials(self, text: str) -> list[int]:
        """A rendered string (special tokens written as text) -> ids, as ``apply_chat_template`` does."""
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def token_to_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        if tid is None or (tid == self.hf.unk_token_id and token != self.hf.unk_token):
            return None
        return tid


class SPTokenizer:
    """SentencePiece driven directly; ``specials`` get ids right after the piece vocabulary."""
    kind = "sentencepiece"

    def __init__(self, model_file: str, specials: tuple[str, ...] = (), adds_bos: bool = True,
                 generation_config: dict | None = None, fingerprint: str | None = None):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        n = self.sp.get_piece_size()
        self.n_pieces = n
        self.specials = {name: n + i for i, name in enumerate(specials)}
        self._special_names = {i: name for name, i in self.specials.items()}
        self.vocab_size = n + len(specials)
        self._split_re = None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else max(self.sp.unk_id(), 0)
        self.adds_bos = adds_bos and self.bos_id is not None
        self.generation_config = generation_config or {}
        self.fingerprint = fingerprint or _fingerprint(os.path.dirname(os.path.abspath(model_file)),
                                                       "sp" + ",".join(specials))
        self.threads = -1  # encode_batch threads (-1: all cores); a data-preparation worker sets 1

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=self.threads) if texts else []

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self._special_names or (i < self.n_pieces and (self.sp.is_control(i) or self.sp.is_unknown(i))):
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self._special_names.get(i) or self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_token(self, tid: int) -> str:
        return self._special_names.get(int(tid)) or self.sp.id_to_piece(int(tid))

    def encode_with_specials(self, text: str) -> list[int]:
        """A rendered string (special tokens written as text) -> ids: split at the appended special
        tokens and at the model's control pieces (``<s>``, ``</s>``), and each text piece
        SentencePiece-encoded on its own, as the original remote tokenizers of chatglm3 and
        baichuan2 do (SentencePiece itself matches user-defined pieces such as baichuan2's
        ``<reserved_106>``)."""
        import re
        if self._split_re is None:
            names = list(self.specials) + [self.sp.id_to_piece(i) for i in range(self.n_pieces)
                                           if self.sp.is_control(i)]
            names = sorted({n for n in names if n}, key=len, reverse=True)
            self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        ids: list[int] = []
        for i, piece in enumerate(self._split_re.split(text)):
            if i % 2:
                ids.append(self.token_to_id(piece))
            elif piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        tid = self.sp.piece_to_id(token)
        return None if tid == self.sp.unk_id() and token != self.sp.id_to_piece(self.sp.unk_id()) else tid


def load_tokenizer(path: str, model_type: str | None = None) -> Tokenizer | SPTokenizer:
    """The tokenizer of a model folder, following the family's own conventions."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    gen = _read_json(os.path.join(path, "generation_config.json"))
    cls = str(cfg.get("tokenizer_class", ""))
    sp_file = os.path.join(path, "tokenizer.model")
    if "ChatGLM" in cls or model_type == "chatglm":
        _need(sp_file, "chatglm3")
        return SPTokenizer(sp_file, CHATGLM3_SPECIALS, adds_bos=False, generation_config=gen)
    if "Baichuan" in cls or model_type == "baichuan":
        _need(sp_file, "baichuan2")
        return SPTokenizer(sp_file, (), adds_bos=bool(cfg.get("add_bos_token", False)), generation_config=gen)
    from transformers import AutoTokenizer
    try:
        hf = AutoTokenizer.from_pretrained(path)
    except Exception:
        if os.path.isfile(sp_file):
            return SPTokenizer(sp_file, (), adds_bos=True, generation_config=gen)
        raise
    if hf.bos_token_id is None and hf.eos_token_id is None and os.path.isfile(sp_file):
        # a bare llama folder (tokenizer.json + tokenizer.model, no tokenizer_config.json): HF
        # cannot tell which tokens are BOS/EOS, the SentencePiece model can
        return SPTokenizer(sp_file, (), adds_bos=True, generation_config=gen)
    return Tokenizer(hf, _fingerprint(path, "hf"), gen)


def _need(path: str, family: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the {family} tokenizer is read from its SentencePiece "
                                f"tokenizer.model")
