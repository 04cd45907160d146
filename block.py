"""Stage 11 — the Transformer block: attention, then a feed-forward layer, each on a residual path.

A block is two sub-layers that each *add* to a running vector per position,
the residual stream: first attention (positions read from each other), then
a feed-forward layer (each position thinks on its own). Each sub-layer sees
a normalised copy of the stream ("pre-norm"), which keeps deep stacks
trainable without warm-up tricks; the stream itself is never normalised.

New since stage 10: the parts are wired together; one config picks GPT-2's
or Llama's parts, or a Mixture of Experts as the feed-forward layer.
Run the demo: `python block.py`

Shapes: B batch, T time, C channels (n_embd).
"""
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import MultiHeadAttention
from components import MLP, MoE, RotaryEmbedding, SwiGLU, make_norm
from memory import InfiniAttention
from recurrent import Recurrent

FFN_KINDS = ("gelu", "swiglu", "moe")
LAYER_KINDS = ("attn", "infini", "recurrent")  # the token mixers a block can hold (ModelConfig.layers)


def make_ffn(cfg):
    """The feed-forward layer cfg.mlp names: "gelu" -> MLP, "swiglu" -> SwiGLU, "moe" -> MoE of SwiGLUs."""
    if cfg.mlp == "gelu":
        return MLP(cfg.n_embd, cfg.ffn_hidden, cfg.bias)
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.n_embd, cfg.ffn_hidden)
    if cfg.mlp == "moe":
        return MoE(cfg.n_embd, cfg.ffn_hidden, cfg.n_experts, cfg.moe_top_k)
    raise ValueError(f"unknown mlp {cfg.mlp!r}: choose from {FFN_KINDS}")


def make_mixer(cfg, kind="attn"):
    """The token-mixing sub-layer of a block: "attn" -> MultiHeadAttention, "infini" -> InfiniAttention
    (attention plus a memory of earlier segments, memory.py), "recurrent" -> Recurrent (a fixed-size state
    instead of attention, recurrent.py). Each maps (B, T, C) -> (B, T, C)."""
    if kind == "recurrent":
        return Recurrent(cfg.n_embd, cfg.recurrent_cell, cfg.recurrent_train, cfg.lct_passes, cfg.memory_segments,
                         cfg.bias)
    rotary = None
    if cfg.pos == "rope":
        rotary = RotaryEmbedding(cfg.n_embd // cfg.n_head, cfg.rope_theta, cfg.rope_scaling, max_len=cfg.block_size)
    args = (cfg.n_embd, cfg.n_head, cfg.block_size, cfg.n_kv_head, cfg.bias, cfg.dropout, cfg.attn_impl,
            cfg.attn_scale, rotary)
    if kind == "attn":
        return MultiHeadAttention(*args)
    if kind == "infini":
        return InfiniAttention(*args, cfg.memory_banks, cfg.memory_update, cfg.memory_segments)
    raise ValueError(f"unknown layer kind {kind!r}: choose from {LAYER_KINDS}")


class Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += ffn(norm(x)).

    cfg is a transformer.ModelConfig (any object with its fields: n_embd, n_head,
    n_kv_head, block_size, bias, dropout, norm, mlp, pos, rope_theta, rope_scaling,
    attn_impl, attn_scale, ffn_hidden, n_experts, moe_top_k; memory_* for an "infini" kind; recurrent_cell,
    recurrent_train, lct_passes, memory_segments for a "recurrent" kind). `kind` picks the token mixer (make_mixer).
    forward(x (B, T, C), cache, layer) -> (x (B, T, C), aux) where aux is the MoE
    load-balancing loss (a scalar tensor) or None for a dense feed-forward.
    """

    def __init__(self, cfg, kind="attn"):
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.n_embd, cfg.bias)
        self.attn = make_mixer(cfg, kind)  # named attn whatever its kind: the parameter names stay put
        self.ffn_norm = make_norm(cfg.norm, cfg.n_embd, cfg.bias)
        self.ffn = make_ffn(cfg)
        self.dropout = cfg.dropout  # on each sub-layer's output, before it joins the stream

    def forward(self, x, cache=None, layer=0):
        x = x + self.drop(self.attn(self.attn_norm(x), cache, layer))  # (B, T, C)
        aux = None
        h = self.ffn(self.ffn_norm(x))
        if isinstance(self.ffn, MoE):
            h, aux = h
        return x + self.drop(h), aux  # (B, T, C)

    def drop(self, h):
        """Dropout on a sub-layer's output while training; not even a call otherwise (generation)."""
        return F.dropout(h, self.dropout) if self.training and self.dropout > 0 else h


def _demo():
    torch.manual_seed(0)
    cfg = types.SimpleNamespace(n_embd=32, n_head=4, n_kv_head=2, block_size=16, bias=False, dropout=0.0,
                                norm="rmsnorm", mlp="moe", pos="rope", rope_theta=10000.0, rope_scaling=None,
                                attn_impl="sdpa", attn_scale="fixed", ffn_hidden=64, n_experts=4, moe_top_k=2)
    x = torch.randn(2, 8, 32)
    for mlp in FFN_KINDS:
        cfg.mlp = mlp
        block = Block(cfg)
        y, aux = block(x)
        n = sum(p.numel() for p in block.parameters())
        aux_text = "" if aux is None else f", MoE aux loss {aux.item():.3f}"
        print(f"Block({mlp:6s}) {n:6,} params: {tuple(x.shape)} -> {tuple(y.shape)}{aux_text}")


if __name__ == "__main__":
    _demo()
