"""Prompt templates: one place renders both training samples and inference prompts.

A rendered sample is a list of ``(ids, trained)`` segments.  ``trained`` marks
the tokens the model must learn to produce (their labels are kept).
"""
from __future__ import annotations

from .tokenizer import Tokenizer

Segments = list[tuple[list[int], bool]]


class Template:
    name = "base"

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    # training -----------------------------------------------------------------------
    def pretrain(self, text: str) -> Segments:
        ids = self.tok.encode(text)
        segs: Segments = []
        if self.tok.bos_id is not None:
            segs.append(([self.tok.bos_id], False))
        segs.append((ids + self._eos(), True))
        return segs

    def instruct(self, instruct: str, input: str | None, output: str) -> Segments:
        return [(self.prompt_ids(self.instruct_prompt(instruct, input)), False),
                (self.tok.encode(output) + self._eos(), True)]

    # inference ----------------------------------------------------------------------
    def instruct_prompt(self, instruct: str, input: str | None = None) -> str:
        raise NotImplementedError

    def prompt_ids(self, prompt: str) -> list[int]:
        bos = [self.tok.bos_id] if self.tok.bos_id is not None else []
        return bos + self.tok.encode(prompt)

    def _eos(self) -> list[int]:
        return [self.tok.eos_id] if self.tok.eos_id is not None else []


class PlainTemplate(Template):
    """A readable format for base models without a chat format of their own."""
    name = "plain"

    def instruct_prompt(self, instruct: str, input: str | None = None) -> str:
        if input:
            return f"### Instruction:\n{instruct}\n\n### Input:\n{input}\n\n### Response:\n"
        return f"### Instruction:\n{instruct}\n\n### Response:\n"


class Llama2Template(Template):
    """llama-2-chat: ``<s>[INST] {user} [/INST] {answer} </s>``; [INST] is plain text."""
    name = "llama2"

    def instruct_prompt(self, instruct: str, input: str | None = None) -> str:
        user = f"{instruct}\n{input}" if input else instruct
        return f"[INST] {user} [/INST]"


TEMPLATES = {t.name: t for t in (PlainTemplate, Llama2Template)}


def get_template(name: str, tok: Tokenizer, model_type: str | None = None) -> Template:
    if name == "auto":
        name = {"llama": "llama2", "mistral": "llama2"}.get(model_type or "", "plain")
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r} is not available; choose one of {sorted(TEMPLATES)} or auto")
    return TEMPLATES[name](tok)
