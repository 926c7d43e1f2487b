"""chatglm3-6b (remote code ``modeling_chatglm.py``, ``model_type: chatglm``).

Pre-norm RMSNorm blocks (weight applied in fp32), multi-query attention with
``multi_query_group_num`` kv groups, a fused ``query_key_value`` with bias (all q,
then all k, then all v), rope on the first half of each head in interleaved pairs
with base 10000 * rope_ratio, and a fused ``dense_h_to_4h`` whose first half is the
gate.  The original is seq-first; we stay batch-first inside the pipeline.
Numerical reference: ``GlmForCausalLM`` with partial_rotary_factor 0.5 and rope_theta 10000 * rope_ratio;
the weight and config mapping is written out in tests/test_families.py (chatglm3 parity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import (Embed, FinalNorm, Head, ModelArgs, RMSNorm, RopeCache, StageContext, check_stage_tuple,
                     default_inv_freq, rope_interleaved_partial)
from .family import Family, KeyMap, Layer, init_linear_, layer


@dataclass(kw_only=True)
class ChatGLMArgs(ModelArgs):
    rope_ratio: float
    qkv_bias: bool
    linear_bias: bool

    @property
    def rotary_dim(self) -> int:
        return self.head_dim // 2

    def make_rope(self) -> RopeCache:
        return RopeCache(default_inv_freq(self.rotary_dim, 10000.0 * self.rope_ratio))


class ChatGLMAttention(nn.Module):
    def __init__(self, a: ChatGLMArgs, ctx: StageContext):
        super().__init__()
        self.a, self.ctx = a, ctx
        out = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
        self.query_key_value = nn.Linear(a.hidden_size, out, bias=a.qkv_bias or a.linear_bias)
        self.dense = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.linear_bias)

    def forward(self, x_BSH, pos_BS, doc_BS):
        a = self.a
        B, S, _ = x_BSH.shape
        q, k, v = self.query_key_value(x_BSH).split(
            [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim], dim=-1)
        q = q.view(B, S, a.num_heads, a.head_dim).transpose(1, 2)
        k = k.view(B, S, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = v.view(B, S, a.num_kv_heads, a.head_dim).transpose(1, 2)
        cos, sin = self.ctx.memo("rope", a.make_rope).cos_sin(pos_BS)
        q, k = rope_interleaved_partial(q, cos, sin), rope_interleaved_partial(k, cos, sin)
        return self.dense(self.ctx.attention(q, k, v, doc_BS))


class ChatGLMMLP(nn.Module):
    def __init__(self, a: ChatGLMArgs):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.linear_bias)
        self.dense_4h_to_h = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.linear_bias)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, a: ChatGLMArgs, ctx: StageContext):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.norm_eps, weight_in_fp32=True)
        self.self_attention = ChatGLMAttention(a, ctx)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.norm_eps, weight_in_fp32=True)
        self.mlp = ChatGLMMLP(a)
        init_linear_(self, a.initializer_range)

    def forward(self, inputs):
        x, pos, doc = check_stage_tuple(inputs, "GLMBlock")
        h = x + self.self_attention(self.input_layernorm(x), pos, doc)
        return h + self.mlp(self.post_attention_layernorm(h)), pos, doc


class GLMFinalNorm(FinalNorm):
    weight_in_fp32 = True


class OutputLayer(Head):
    """chatglm3's name for its untied output projection."""


class ChatGLM3Family(Family):
    name = "chatglm3"
    model_types = ("chatglm",)
    decoder_class = GLMBlock
    default_template = "chatglm3"

    def parse_config(self, cfg: dict) -> ChatGLMArgs:
        unsupported = {k: cfg.get(k) for k, ok in (("rmsnorm", True), ("post_layer_norm", True),
                                                    ("apply_residual_connection_post_layernorm", False),
                                                    ("original_rope", True)) if cfg.get(k, ok) != ok}
        if unsupported:
            raise ValueError(f"chatglm config switches not supported: {unsupported}")
        H, N = cfg["hidden_size"], cfg["num_attention_heads"]
        groups = cfg.get("multi_query_group_num", N) if cfg.get("multi_query_attention", False) else N
        return ChatGLMArgs(
            model_type="chatglm", vocab_size=cfg["padded_vocab_size"], hidden_size=H,
            intermediate_size=cfg["ffn_hidden_size"], num_layers=cfg["num_layers"], num_heads=N,
            num_kv_heads=groups, head_dim=cfg.get("kv_channels", H // N), norm_eps=cfg.get("layernorm_epsilon", 1e-5),
            rope_ratio=float(cfg.get("rope_ratio", 1.0)), qkv_bias=bool(cfg.get("add_qkv_bias", False)),
            linear_bias=bool(cfg.get("add_bias_linear", False)), initializer_range=cfg.get("initializer_range", 0.02))

    def layers(self, a: ChatGLMArgs, ctx: StageContext) -> list[Layer]:
        return ([layer(Embed, a)] + [layer(GLMBlock, a, ctx) for _ in range(a.num_layers)]
                + [layer(GLMFinalNorm, a), layer(OutputLayer, a)])

    def key_map(self, a: ChatGLMArgs) -> KeyMap:
        return KeyMap([("transformer.embedding.word_embeddings.", "embed."),
                       ("transformer.encoder.layers.{}.", "layers.{}."),
                       ("transformer.encoder.final_layernorm.", "norm."),
                       ("transformer.output_layer.", "head.")],
                      drop=[r"transformer\.rotary_pos_emb\.inv_freq"])

    def export_extra(self, a: ChatGLMArgs, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        # a persistent buffer the original's forward ignores; it uses base 10000 without rope_ratio
        dim = a.rotary_dim
        inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        return {"transformer.rotary_pos_emb.inv_freq": inv.to(dtype)}

    def export_layout(self, a) -> str:
        return "bin"
