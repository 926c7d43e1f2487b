"""Model families as DeepSpeed pipeline layer lists.

``get_family(model_type)`` returns the family object that knows how to parse the
HF config, describe the pipeline layers (DeepSpeed ``LayerSpec`` lists for training) and map checkpoint keys.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .baichuan2 import Baichuan2Family
from .bloom import BloomFamily
from .chatglm3 import ChatGLM3Family
from .family import Family
from .llama import LlamaFamily

FAMILIES: list[Family] = [LlamaFamily(), BloomFamily(), Baichuan2Family(), ChatGLM3Family()]


def get_family(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unknown model_type {model_type!r}; supported: {', '.join(known)}")


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a model folder needs the HF config.json")
    with open(path) as f:
        cfg = json.load(f)
    if "model_type" not in cfg:
        raise ValueError(f"{path}: no 'model_type' key")
    return cfg


def load_family(model_dir: str) -> tuple[Family, Any]:
    """(family, parsed args) for a HF folder or a pipeline folder."""
    cfg = read_config(model_dir)
    fam = get_family(cfg["model_type"])
    return fam, fam.parse_config(cfg)
