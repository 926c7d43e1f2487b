"""llama (and the variants that are llama with config switches: mistral, qwen2).

Numerical reference: transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
``Qwen2ForCausalLM``.  Pipeline local keys are the HF suffixes, so the key map is
a pure prefix rename.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import RMSNorm, RopeCache, check_stage_tuple, default_inv_freq, rope_rotate_half, sdpa_attention
from .family import Family, KeyMap, LayerSpec, TiedLayerSpec, init_linear_


@dataclass
class LlamaArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    initializer_range: float
    hf_config: Any  # the transformers config object, used for rope parameters

    def rope(self) -> RopeCache:
        # shared by all layers of the process so cos/sin are computed once per micro-batch
        cache = self.__dict__.get("_rope")
        if cache is None:
            params = self.hf_config.rope_parameters or {}
            rope_type = params.get("rope_type", "default")
            if rope_type == "default":
                inv, scale = default_inv_freq(self.head_dim, params["rope_theta"]), 1.0
            else:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
                if rope_type not in ROPE_INIT_FUNCTIONS:
                    raise ValueError(f"rope_type {rope_type!r} is not supported")
                inv, scale = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, torch.device("cpu"))
            cache = RopeCache(inv, scale)
            self.__dict__["_rope"] = cache
        return cache


class Embed(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(a.vocab_size, a.hidden_size))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=a.initializer_range)

    def forward(self, inputs):
        ids, pos, doc = check_stage_tuple(inputs, "embed")
        return F.embedding(ids, self.weight), pos, doc


def tied_head_forward(embed: Embed, inputs):
    h, _, _ = inputs
    return F.linear(h, embed.weight)


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.a = a
        N, K, D, H = a.num_heads, a.num_kv_heads, a.head_dim, a.hidden_size
        self.q_proj = nn.Linear(H, N * D, bias=a.qkv_bias)
        self.k_proj = nn.Linear(H, K * D, bias=a.qkv_bias)
        self.v_proj = nn.Linear(H, K * D, bias=a.qkv_bias)
        self.o_proj = nn.Linear(N * D, H, bias=a.o_bias)

    def forward(self, x_BSH, pos_BS, doc_BS):
        a = self.a
        B, S, _ = x_BSH.shape
        q = self.q_proj(x_BSH).view(B, S, a.num_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSH).view(B, S, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSH).view(B, S, a.num_kv_heads, a.head_dim).transpose(1, 2)
        cos, sin = a.rope().cos_sin(pos_BS)
        q, k = rope_rotate_half(q, cos, sin), rope_rotate_half(k, cos, sin)
        out = sdpa_attention(q, k, v, doc_BS, window=a.sliding_window)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)
        init_linear_(self, a.initializer_range)

    def forward(self, inputs):
        x, pos, doc = check_stage_tuple(inputs, "LlamaDecoderLayer")
        h = x + self.self_attn(self.input_layernorm(x), pos, doc)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, pos, doc


class FinalNorm(RMSNorm):
    def __init__(self, a: LlamaArgs):
        super().__init__(a.hidden_size, a.rms_norm_eps)

    def forward(self, inputs):
        h, pos, doc = inputs
        return super().forward(h), pos, doc


class Head(Embed):
    """Untied output projection: the same [V, H] matrix shape as the embedding."""

    def forward(self, inputs):
        h, _, _ = inputs
        return F.linear(h, self.weight)


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    decoder_class = LlamaDecoderLayer
    default_template = "llama2"

    def parse_config(self, cfg: dict) -> LlamaArgs:
        from transformers import AutoConfig
        clean = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "model_type")}
        hf = AutoConfig.for_model(cfg["model_type"], **clean)
        mt = cfg["model_type"]
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if mt == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
            window = hf.sliding_window if getattr(hf, "use_sliding_window", False) else None
        else:
            qkv_bias = o_bias = bool(getattr(hf, "attention_bias", False))
            mlp_bias = bool(getattr(hf, "mlp_bias", False))
            window = getattr(hf, "sliding_window", None) if mt == "mistral" else None
        return LlamaArgs(
            model_type=mt, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps, tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, sliding_window=window,
            initializer_range=getattr(hf, "initializer_range", 0.02), hf_config=hf)

    def is_tied(self, a: LlamaArgs) -> bool:
        return a.tie_word_embeddings

    def build_specs(self, a: LlamaArgs) -> list:
        specs: list = []
        if a.tie_word_embeddings:
            specs.append(TiedLayerSpec("embed", Embed, a, tied_weight_attr="weight"))
        else:
            specs.append(LayerSpec(Embed, a))
        specs += [LayerSpec(LlamaDecoderLayer, a) for _ in range(a.num_layers)]
        specs.append(LayerSpec(FinalNorm, a))
        if a.tie_word_embeddings:
            specs.append(TiedLayerSpec("embed", Embed, a, forward_fn=tied_head_forward, tied_weight_attr="weight"))
        else:
            specs.append(LayerSpec(Head, a))
        return specs

    def key_map(self, a: LlamaArgs) -> KeyMap:
        rules = [
            ("model.embed_tokens.", "embed."),
            ("model.layers.{}.", "layers.{}."),
            ("model.norm.", "norm."),
            ("lm_head.", "head."),
        ]
        drop = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
        if a.tie_word_embeddings:
            drop.append(r"lm_head\.weight")  # tied: the embedding is the head
        return KeyMap(rules, drop)
