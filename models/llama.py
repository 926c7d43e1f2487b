"""llama (and the variants that are llama with config switches: mistral, qwen2).

Numerical reference: transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
``Qwen2ForCausalLM``.  Pipeline local keys are the HF suffixes, so the key map is
a pure prefix rename.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .common import (Embed, FinalNorm, GatedMLP, Head, ModelArgs, RMSNorm, RopeCache, StageContext, check_stage_tuple,
                     default_inv_freq, rope_rotate_half, tied_head_forward)
from .family import Family, KeyMap, Layer, init_linear_, layer, tied_layer


@dataclass(kw_only=True)
class LlamaArgs(ModelArgs):
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    rope_theta: float = 10000.0
    #: the transformers config object, for rope types other than the default (llama3, linear, ...)
    hf_config: Any = None

    def make_rope(self) -> RopeCache:
        if self.hf_config is None:
            return RopeCache(default_inv_freq(self.head_dim, self.rope_theta), 1.0)
        params = self.hf_config.rope_parameters or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            return RopeCache(default_inv_freq(self.head_dim, params["rope_theta"]), 1.0)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_type {rope_type!r} is not supported")
        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, torch.device("cpu"))
        return RopeCache(inv, scale)


#: config.json keys the plain path reads; a config without one of them goes through transformers
_PLAIN_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "rms_norm_eps")


def _plain_rope(cfg: dict) -> bool:
    """True when the config asks for the default rope (no scaling): then only rope_theta matters."""
    scaling = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters")
    kind = lambda d: (d or {}).get("rope_type", (d or {}).get("type", "default"))  # noqa: E731
    return kind(scaling) == "default" and kind(params) == "default"


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs, ctx: StageContext):
        super().__init__()
        self.a, self.ctx = a, ctx
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
        cos, sin = self.ctx.memo("rope", a.make_rope).cos_sin(pos_BS)
        q, k = rope_rotate_half(q, cos, sin), rope_rotate_half(k, cos, sin)
        return self.o_proj(self.ctx.attention(q, k, v, doc_BS, window=a.sliding_window))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, ctx: StageContext):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.norm_eps)
        self.self_attn = Attention(a, ctx)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.norm_eps)
        self.mlp = GatedMLP(a, bias=a.mlp_bias)
        init_linear_(self, a.initializer_range)

    def forward(self, inputs):
        x, pos, doc = check_stage_tuple(inputs, "LlamaDecoderLayer")
        h = x + self.self_attn(self.input_layernorm(x), pos, doc)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, pos, doc


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    decoder_class = LlamaDecoderLayer
    default_template = "llama2"

    def parse_config(self, cfg: dict) -> LlamaArgs:
        """A config.json that spells out every field and uses the default rope is read as it stands
        (conversion and planning then need no transformers import, ~3 s); anything else goes
        through transformers' config class, which fills in the model type's defaults.
        tests/test_families.py checks that both readings agree."""
        mt = cfg["model_type"]
        plain = (all(cfg.get(k) is not None for k in _PLAIN_KEYS) and _plain_rope(cfg)
                 and (mt == "llama" or "num_key_value_heads" in cfg)  # mistral/qwen2 defaults differ from N
                 and (mt != "mistral" or "sliding_window" in cfg) and (mt != "qwen2" or "use_sliding_window" in cfg))
        return self._parse_plain(cfg) if plain else self.parse_with_transformers(cfg)

    def _parse_plain(self, cfg: dict) -> LlamaArgs:
        mt, H, N = cfg["model_type"], cfg["hidden_size"], cfg["num_attention_heads"]
        if mt == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
            window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            mlp_bias = bool(cfg.get("mlp_bias", False))
            window = cfg.get("sliding_window") if mt == "mistral" else None
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
        return LlamaArgs(
            model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=H, intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=N, num_kv_heads=cfg.get("num_key_value_heads") or N,
            head_dim=cfg.get("head_dim") or H // N, norm_eps=cfg["rms_norm_eps"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, o_bias=o_bias,
            mlp_bias=mlp_bias, sliding_window=window, initializer_range=cfg.get("initializer_range", 0.02),
            rope_theta=float(theta))

    def parse_with_transformers(self, cfg: dict) -> LlamaArgs:
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
            head_dim=head_dim, norm_eps=hf.rms_norm_eps, tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, sliding_window=window,
            initializer_range=getattr(hf, "initializer_range", 0.02),
            rope_theta=float((hf.rope_parameters or {}).get("rope_theta", 10000.0)), hf_config=hf)

    def is_tied(self, a: LlamaArgs) -> bool:
        return a.tie_word_embeddings

    def layers(self, a: LlamaArgs, ctx: StageContext) -> list[Layer]:
        tied = a.tie_word_embeddings
        return ([tied_layer("embed", Embed, a) if tied else layer(Embed, a)]
                + [layer(LlamaDecoderLayer, a, ctx) for _ in range(a.num_layers)]
                + [layer(FinalNorm, a),
                   tied_layer("embed", Embed, a, forward_fn=tied_head_forward) if tied else layer(Head, a)])

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
