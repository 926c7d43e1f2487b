"""bloom (transformers ``BloomForCausalLM``).

LayerNorm blocks with biases everywhere, a LayerNorm right after the word
embedding, a fused ``query_key_value`` interleaved per head (``[nh, 3, hd]`` rows),
ALiBi instead of rotary positions, gelu (tanh form), and an output head tied to
the word embedding.  In the pipeline the tie is a ``TiedLayerSpec`` shared by the
first and the last stage; DeepSpeed all-reduces the matrix's gradient between them.

ALiBi under packing: the bias of a key is ``slope * (its position inside its own
document)``, taken from the position ids that restart at every packed document.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import ModelArgs, StageContext, check_stage_tuple, tied_head_forward
from .family import Family, KeyMap, Layer, init_linear_, layer, tied_layer


@dataclass(kw_only=True)
class BloomArgs(ModelArgs):
    """bloom: num_kv_heads = num_heads, head_dim = H / N, intermediate_size = 4H."""


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes [N] in fp32.

    For n = the largest power of two <= num_heads the slopes are r**1 .. r**n with
    r = 2**(-8/n).  The remaining heads take the odd powers 1, 3, 5, ... of the
    ratio for 2n heads, i.e. they interleave between the first series.
    """
    n = 2 ** math.floor(math.log2(num_heads))
    ratio = 2.0 ** (-8.0 / n)
    slopes = torch.pow(torch.tensor(ratio, dtype=torch.float32), torch.arange(1, n + 1, dtype=torch.float32))
    if n != num_heads:
        extra_ratio = 2.0 ** (-8.0 / (2 * n))
        k = min(n, num_heads - n)
        extra = torch.pow(torch.tensor(extra_ratio, dtype=torch.float32),
                          torch.arange(1, 2 * k, 2, dtype=torch.float32))
        slopes = torch.cat([slopes, extra])
    return slopes


class BloomEmbed(nn.Module):
    """Word embedding + its LayerNorm. ``weight`` is the matrix the head shares."""

    def __init__(self, a: BloomArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(a.vocab_size, a.hidden_size))
        self.layernorm = nn.LayerNorm(a.hidden_size, eps=a.norm_eps)
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=a.initializer_range)

    def forward(self, inputs):
        ids, pos, doc = check_stage_tuple(inputs, "BloomEmbed")
        return self.layernorm(F.embedding(ids, self.weight)), pos, doc


class BloomAttention(nn.Module):
    def __init__(self, a: BloomArgs, ctx: StageContext):
        super().__init__()
        self.a, self.ctx = a, ctx
        self.query_key_value = nn.Linear(a.hidden_size, 3 * a.hidden_size)
        self.dense = nn.Linear(a.hidden_size, a.hidden_size)

    def forward(self, x_BSH, pos_BS, doc_BS):
        a = self.a
        B, S, _ = x_BSH.shape
        # rows of the fused matrix are grouped per head: [q_h, k_h, v_h] for h = 0..N-1
        qkv = self.query_key_value(x_BSH).view(B, S, a.num_heads, 3, a.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        slopes = self.ctx.memo(("alibi_slopes", q.device), lambda: alibi_slopes(a.num_heads).to(q.device))
        return self.dense(self.ctx.attention(q, k, v, doc_BS, alibi_slopes_N=slopes, pos_BS=pos_BS))


class BloomMLP(nn.Module):
    def __init__(self, a: BloomArgs):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(a.hidden_size, a.intermediate_size)
        self.dense_4h_to_h = nn.Linear(a.intermediate_size, a.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class BloomBlock(nn.Module):
    def __init__(self, a: BloomArgs, ctx: StageContext):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(a.hidden_size, eps=a.norm_eps)
        self.self_attention = BloomAttention(a, ctx)
        self.post_attention_layernorm = nn.LayerNorm(a.hidden_size, eps=a.norm_eps)
        self.mlp = BloomMLP(a)
        init_linear_(self, a.initializer_range)

    def forward(self, inputs):
        x, pos, doc = check_stage_tuple(inputs, "BloomBlock")
        h = x + self.self_attention(self.input_layernorm(x), pos, doc)
        return h + self.mlp(self.post_attention_layernorm(h)), pos, doc


class BloomFinalNorm(nn.LayerNorm):
    def __init__(self, a: BloomArgs):
        super().__init__(a.hidden_size, eps=a.norm_eps)

    def forward(self, inputs):
        h, pos, doc = inputs
        return super().forward(h), pos, doc


class BloomFamily(Family):
    name = "bloom"
    model_types = ("bloom",)
    decoder_class = BloomBlock
    default_template = "plain"

    def parse_config(self, cfg: dict) -> BloomArgs:
        if cfg.get("apply_residual_connection_post_layernorm", False):
            raise ValueError("bloom config switch apply_residual_connection_post_layernorm=true is not supported")
        if cfg.get("pretraining_tp", 1) > 1 and cfg.get("slow_but_exact", False):
            raise ValueError("bloom config switch slow_but_exact=true is not supported")
        if not cfg.get("tie_word_embeddings", True):
            raise ValueError("bloom with tie_word_embeddings=false is not supported")
        H = cfg.get("hidden_size", cfg.get("n_embed"))
        N = cfg.get("n_head", cfg.get("num_attention_heads"))
        L = cfg.get("n_layer", cfg.get("num_hidden_layers"))
        if H is None or N is None or L is None:
            raise ValueError("bloom config.json needs hidden_size (or n_embed), n_head and n_layer")
        if H % N:
            raise ValueError(f"bloom config: hidden_size {H} is not divisible by n_head {N}")
        return BloomArgs(model_type="bloom", vocab_size=cfg["vocab_size"], hidden_size=H, num_layers=L,
                         num_heads=N, num_kv_heads=N, head_dim=H // N, intermediate_size=4 * H,
                         norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                         initializer_range=cfg.get("initializer_range", 0.02))

    def is_tied(self, a: BloomArgs) -> bool:
        return True

    def layers(self, a: BloomArgs, ctx: StageContext) -> list[Layer]:
        return ([tied_layer("embed", BloomEmbed, a)]
                + [layer(BloomBlock, a, ctx) for _ in range(a.num_layers)]
                + [layer(BloomFinalNorm, a), tied_layer("embed", BloomEmbed, a, forward_fn=tied_head_forward)])

    def key_map(self, a: BloomArgs) -> KeyMap:
        # the first rule of a pipeline prefix is used on export; the unprefixed hub names are aliases
        return KeyMap([("transformer.word_embeddings_layernorm.", "embed.layernorm."),
                       ("transformer.word_embeddings.", "embed."),
                       ("transformer.h.{}.", "layers.{}."),
                       ("transformer.ln_f.", "norm."),
                       ("word_embeddings_layernorm.", "embed.layernorm."),
                       ("word_embeddings.", "embed."),
                       ("h.{}.", "layers.{}."),
                       ("ln_f.", "norm.")],
                      drop=[r"lm_head\.weight"])  # tied: the embedding is the head
