"""baichuan2-7b (remote code ``modeling_baichuan.py``, ``model_type: baichuan``).

llama-shaped, with a fused ``W_pack`` ([q; k; v] rows), rope computed in fp32, and a
NormHead: logits = h @ normalize(W, dim=-1)^T.  The raw W is kept and normalised in
every forward, so an exported W behaves identically in the original code.
Numerical reference: ``LlamaForCausalLM`` with W_pack split and a row-normalised head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from .common import (Embed, FinalNorm, GatedMLP, HeadOutput, RMSNorm, StageContext, TokenLoss, check_stage_tuple,
                     rope_rotate_half_fp32)
from .family import Family, KeyMap, Layer, init_linear_, layer
from .llama import LlamaArgs


@dataclass(kw_only=True)
class BaichuanArgs(LlamaArgs):
    z_loss_weight: float = 0.0


class BaichuanAttention(nn.Module):
    def __init__(self, a: BaichuanArgs, ctx: StageContext):
        super().__init__()
        self.a, self.ctx = a, ctx
        self.W_pack = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=False)
        self.o_proj = nn.Linear(a.hidden_size, a.hidden_size, bias=False)

    def forward(self, x_BSH, pos_BS, doc_BS):
        a = self.a
        B, S, H = x_BSH.shape
        q, k, v = self.W_pack(x_BSH).split(H, dim=-1)
        q, k, v = (t.view(B, S, a.num_heads, a.head_dim).transpose(1, 2) for t in (q, k, v))
        cos, sin = self.ctx.memo("rope", a.make_rope).cos_sin(pos_BS)
        q, k = rope_rotate_half_fp32(q, cos, sin), rope_rotate_half_fp32(k, cos, sin)
        return self.o_proj(self.ctx.attention(q, k, v, doc_BS))


class BaichuanDecoderLayer(nn.Module):
    def __init__(self, a: BaichuanArgs, ctx: StageContext):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.norm_eps)
        self.self_attn = BaichuanAttention(a, ctx)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.norm_eps)
        self.mlp = GatedMLP(a)
        init_linear_(self, a.initializer_range)

    def forward(self, inputs):
        x, pos, doc = check_stage_tuple(inputs, "BaichuanDecoderLayer")
        h = x + self.self_attn(self.input_layernorm(x), pos, doc)
        return h + self.mlp(self.post_attention_layernorm(h)), pos, doc


class NormHead(Embed):
    """Output projection with rows normalised in every forward (gradient flows through it)."""

    def forward(self, inputs):
        h, _, _ = inputs
        return HeadOutput(h, F.normalize(self.weight, dim=-1))


class Baichuan2Family(Family):
    name = "baichuan2"
    model_types = ("baichuan",)
    decoder_class = BaichuanDecoderLayer
    default_template = "baichuan2"

    def parse_config(self, cfg: dict) -> BaichuanArgs:
        H, N = cfg["hidden_size"], cfg["num_attention_heads"]
        return BaichuanArgs(  # rope: theta 10000 over the full head dim
            model_type="baichuan", vocab_size=cfg["vocab_size"], hidden_size=H,
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=N,
            num_kv_heads=N, head_dim=H // N, norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False, sliding_window=None,
            initializer_range=cfg.get("initializer_range", 0.02), rope_theta=10000.0,
            z_loss_weight=float(cfg.get("z_loss_weight", 0.0) or 0.0))

    def layers(self, a: BaichuanArgs, ctx: StageContext) -> list[Layer]:
        return ([layer(Embed, a)] + [layer(BaichuanDecoderLayer, a, ctx) for _ in range(a.num_layers)]
                + [layer(FinalNorm, a), layer(NormHead, a)])

    def key_map(self, a: BaichuanArgs) -> KeyMap:
        return KeyMap([("model.embed_tokens.", "embed."), ("model.layers.{}.", "layers.{}."),
                       ("model.norm.", "norm."), ("lm_head.", "head.")])

    def loss_fn(self, a: BaichuanArgs):
        return TokenLoss(z_loss_weight=a.z_loss_weight)

    def export_layout(self, a) -> str:
        return "bin"
