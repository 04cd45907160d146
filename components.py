"""Stages 10–11 — the parts a Transformer is built from.

Everything here acts on one position at a time (attention, the only part that
mixes positions, is the next stage): embeddings turn ids into vectors, a norm
keeps their scale steady, and a feed-forward layer transforms each one. Two
families are side by side: GPT-2's (learned positions, LayerNorm, a GELU MLP)
and Llama's (RoPE, RMSNorm, SwiGLU), plus a Mixture-of-Experts feed-forward.

New since stage 6: vectors instead of a lookup table of logits; RoPE encodes
position by rotating query/key pairs; MoE sends each token to k of E experts.
Run the demo: `python components.py`

Shapes: B batch, T time, C channels (n_embd), F feed-forward width, D head
dim, h some number of heads, N = B·T tokens, E experts, K experts per token.

Glossary, for reading Llama or Hugging Face code next to this one:
    here        Meta's Llama     Hugging Face
    n_layer     n_layers         num_hidden_layers
    n_head      n_heads          num_attention_heads
    n_kv_head   n_kv_heads       num_key_value_heads
    n_embd      dim              hidden_size
    ffn_hidden  hidden_dim       intermediate_size
    block_size  max_seq_len      max_position_embeddings
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-5  # the small constant that keeps a norm finite for an all-zero vector
ROPE_SCALINGS = ("linear", "ntk")


class Embeddings(nn.Module):
    """Token embedding plus, when `block_size` is given, a learned position embedding (GPT-2).

    idx (B, T) int64 at positions start … start+T−1 -> (B, T, C). With RoPE the
    position enters inside attention instead, so no position table is made.
    """

    def __init__(self, vocab_size, dim, block_size=None):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim) if block_size else None

    def forward(self, idx, start=0):
        x = self.tok(idx)  # (B, T) -> (B, T, C)
        if self.pos is not None:
            positions = start + torch.arange(idx.shape[1], device=idx.device)  # start: an int or a 0-d tensor
            x = x + self.pos(positions)  # (T, C) broadcasts over B
        return x


class LayerNorm(nn.Module):
    """y = (x − mean(x)) / sqrt(var(x) + eps) · weight + bias, over the last dim; bias optional.

    (torch's nn.LayerNorm cannot drop the bias alone; GPT-2 presets here run without it.)
    """

    def __init__(self, dim, bias=True, eps=NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """y = x · rsqrt(mean(x²) + eps) · weight, over the last dim (Llama's norm).

    No mean subtraction and no bias: cheaper than LayerNorm and as good in practice.
    F.rms_norm computes exactly this formula in one fused kernel.
    """

    def __init__(self, dim, eps=NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(kind, dim, bias=False):
    """"layernorm" -> LayerNorm(dim, bias); "rmsnorm" -> RMSNorm(dim)."""
    if kind == "layernorm":
        return LayerNorm(dim, bias)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"unknown norm {kind!r}: use 'layernorm' or 'rmsnorm'")


class MLP(nn.Module):
    """GPT-2's feed-forward: widen to F = 4·C, GELU, project back. (B, T, C) -> (B, T, C)."""

    def __init__(self, dim, hidden=None, bias=False):
        super().__init__()
        hidden = hidden or 4 * dim
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, dim, bias=bias)  # writes into the residual stream

    def forward(self, x):
        return self.out_proj(F.gelu(self.fc(x)))  # (B, T, C) -> (B, T, F) -> (B, T, C)


def swiglu_hidden(dim, multiple_of=64):
    """SwiGLU width F whose three C×F matrices cost about what a GELU MLP's two C×4C cost.

    The rule (Llama's): ⅔ of 4·dim, rounded up to a multiple of 64 so matmuls tile well.
    Example: dim 128 -> 8·128 // 3 = 341 -> 384 (3·128·384 = 147,456 weights vs 131,072).
    """
    hidden = 8 * dim // 3
    return multiple_of * -(-hidden // multiple_of)


class SwiGLU(nn.Module):
    """Llama's feed-forward: out_proj(silu(gate(x)) ⊙ up(x)), no biases. (…, C) -> (…, C).

    In the paper's letters W3(silu(W1 x) ⊙ W2 x) with W1 = gate, W2 = up, W3 = out_proj
    (Hugging Face: gate_proj, up_proj, down_proj). The gate decides, per hidden unit,
    how much of `up` passes: a learned, smooth on/off switch.
    """

    def __init__(self, dim, hidden=None):
        super().__init__()
        hidden = hidden or swiglu_hidden(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.out_proj = nn.Linear(hidden, dim, bias=False)  # writes into the residual stream

    def forward(self, x, scale=None):
        """scale (…, 1), optional: multiplies the hidden units (MoE's routing weight, F wide not C)."""
        hidden = F.silu(self.gate(x)) * self.up(x)  # (…, C) -> (…, F)
        return self.out_proj(hidden if scale is None else hidden * scale)  # (…, F) -> (…, C)


def parse_rope_scaling(spec):
    """rope_scaling as written in a config: None, "linear:S" or "ntk:S" with a factor S ≥ 1.

    parse_rope_scaling("linear:4") == ("linear", 4.0); parse_rope_scaling(None) == (None, 1.0).
    """
    if spec is None:
        return None, 1.0
    kind, _, factor = str(spec).partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = float("nan")
    if kind not in ROPE_SCALINGS or not value >= 1.0:
        raise ValueError(f"rope_scaling {spec!r} is not understood: write 'linear:S' or 'ntk:S' with a factor S >= 1, "
                         "e.g. 'linear:2.0' to run at twice the trained context")
    return kind, value


def rope_frequencies(head_dim, theta=10000.0, scaling=None):
    """Rotation speed of each of the D/2 pairs, in radians per position: (D/2,) float64.

    Pair i turns by theta^(−2i/D) per position: fast pairs see nearby order, slow ones far.
    Scaling, to run past the trained context by a factor S:
      "linear:S" (position interpolation) divides every speed by S, i.e. position p acts as p/S;
      "ntk:S" (NTK-aware) raises the base to theta·S^(D/(D−2)): the fastest pair is unchanged,
      the slowest slows by exactly S.
    """
    kind, factor = parse_rope_scaling(scaling)
    if kind == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    return freqs / factor if kind == "linear" else freqs


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[i], x[i + D/2]) of x (…, D) by the angle whose cos/sin (…, D/2) are given.

    The half-split pairing of GPT-NeoX and Hugging Face; Meta's Llama pairs neighbours
    (x[2i], x[2i+1]) instead, which is the same up to a fixed reordering of the D channels.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (…, D) -> 2 × (…, D/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # -> (…, D)


class RotaryEmbedding(nn.Module):
    """RoPE: rotates queries and keys by an angle proportional to their position.

    Then q·k depends only on the content and on the *offset* between the two positions.
    forward(x (B, T, h, D), start) -> (B, T, h, D) for positions start … start+T−1.
    cos/sin tables are cached for `max_len` positions and grow if a longer run asks.
    """

    def __init__(self, head_dim, theta=10000.0, scaling=None, max_len=256):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of channels: head_dim must be even, got {head_dim}")
        self.freqs = rope_frequencies(head_dim, theta, scaling)  # float64 on CPU, a constant
        self.register_buffer("cos", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim // 2), persistent=False)
        self._build(max_len)

    def reach(self, length):
        """Make the tables cover at least `length` positions (doubling, so a growing run rebuilds them rarely)."""
        if length > self.cos.shape[0]:
            self._build(max(length, 2 * self.cos.shape[0]))

    def _build(self, length):
        angles = torch.outer(torch.arange(length, dtype=torch.float64), self.freqs)  # (L,) x (D/2,) -> (L, D/2)
        self.cos = angles.cos().to(self.cos.device, self.cos.dtype)
        self.sin = angles.sin().to(self.sin.device, self.sin.dtype)

    def forward(self, x, start=0):
        if torch.is_tensor(start):  # a static KV cache's position (attention.KVCache): look the rows up
            rows = start + torch.arange(x.shape[1], device=start.device)  # (T,)
            cos, sin = self.cos[rows, None, :], self.sin[rows, None, :]  # (T, 1, D/2): broadcast over B, h
        else:
            end = start + x.shape[1]
            self.reach(end)
            cos, sin = self.cos[start:end, None, :], self.sin[start:end, None, :]
        if cos.dtype != x.dtype:  # e.g. under bfloat16 autocast
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return apply_rotary(x, cos, sin)


def expert_counts(experts, n_experts):
    """How many of the N·K routing slots went to each expert: experts (N, K) -> (E,) int64."""
    return torch.bincount(experts.flatten(), minlength=n_experts)


def load_balancing_loss(counts, probs):
    """Switch Transformer's auxiliary loss: E · Σ_e fraction_e · mean_prob_e.

    counts (E,) routing slots per expert (fraction_e = counts / N·K, no gradient);
    probs (N, E) the router's full softmax (mean_prob_e carries the gradient).
    Exactly 1.0 when the router is uniform; up to E when all traffic goes to one expert.
    """
    fraction = counts.to(probs.dtype) / counts.sum()  # (E,), sums to 1
    return probs.shape[1] * (fraction * probs.mean(dim=0)).sum()  # (N, E) -> (E,) -> ()


class MoE(nn.Module):
    """Mixture of Experts: a router sends each token to its top-k of E SwiGLU experts.

    forward(x (B, T, C)) -> (y (B, T, C), aux loss scalar). A token's output is the
    weighted sum of its k experts, weights = softmax over its k chosen router logits
    (for k = 1 the router probability itself, see `route`).
    Each expert runs only on the tokens sent to it: the routing slots are sorted by expert,
    the tokens gathered once in that order, and each expert's outputs added back to their
    tokens with index_add_, so compute grows with k, not with E.
    """

    def __init__(self, dim, hidden=None, n_experts=4, top_k=2):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(n_experts))

    def route(self, x):
        """x (N, C) -> weights (N, K), experts (N, K) int64, probs (N, E).

        k ≥ 2: the weights are the softmax over the k chosen logits and sum to 1. k = 1: the weight
        is the chosen expert's router probability (Switch Transformer's gate), because renormalised
        it would be exactly 1 and the language-model loss would send no gradient to the router.
        """
        # softmax over the E experts, taken along dim 0 of the (E, N) transposed view: on a CPU a
        # softmax along a last dim as short as 8 is ~7x slower (fwd+bwd at N=2048: 470 µs vs 94 µs)
        probs = F.softmax(self.router(x).t(), dim=0).t()  # (N, C) -> (N, E)
        top_probs, experts = probs.topk(self.top_k, dim=-1)  # (N, E) -> (N, K)
        if self.top_k == 1:
            return top_probs, experts, probs
        # softmax over the k chosen logits, computed from the full softmax: e^l_i / Σ_chosen e^l_j
        return top_probs / top_probs.sum(dim=-1, keepdim=True), experts, probs

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (B, T, C) -> (N, C)
        weights, experts, probs = self.route(x)
        counts = expert_counts(experts, len(self.experts))
        slots = experts.flatten().argsort()  # (N·K,) slot ids grouped by expert (order within one is free)
        tokens = slots // self.top_k  # slot n·K + j belongs to token n
        inputs = x.index_select(0, tokens)  # (N·K, C): one gather (x[tokens] per expert would
        # cost a zero-filled (N, C) gradient per expert in the backward pass)
        slot_weights = weights.flatten()[slots, None]  # (N·K, 1)
        sizes = counts.tolist()  # consecutive runs of slots belong to expert 0, 1, …
        y = torch.zeros_like(x)
        # every expert runs, an idle one on its empty slice: its weights then get a zero gradient rather
        # than none, since DistributedDataParallel expects a gradient for every parameter at every step
        for expert, xe, idx, w in zip(self.experts, *(t.split(sizes) for t in (inputs, tokens, slot_weights))):
            y.index_add_(0, idx, expert(xe, scale=w))
        return y.view(B, T, C), load_balancing_loss(counts, probs)  # (N, C) -> (B, T, C)


def _demo():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    rms = RMSNorm(64)(x).pow(2).mean(-1).sqrt()  # (B, T, C) -> (B, T)
    before = x.pow(2).mean(-1).sqrt()
    print(f"x {tuple(x.shape)}: rms of the first vectors {[round(r, 3) for r in before[0, :3].tolist()]} -> "
          f"after RMSNorm {[round(r, 3) for r in rms[0, :3].tolist()]}")
    print(f"GELU MLP {sum(p.numel() for p in MLP(64).parameters()):,} weights; "
          f"SwiGLU (hidden {swiglu_hidden(64)}) {sum(p.numel() for p in SwiGLU(64).parameters()):,}")
    rope = RotaryEmbedding(head_dim=8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    for p, s in [(3, 1), (10, 8)]:
        score = (rope(q, start=p) * rope(k, start=s)).sum().item()
        print(f"RoPE score q@{p}·k@{s} = {score:+.4f} (offset {p - s})")
    moe = MoE(64, hidden=128, n_experts=4, top_k=2)
    y, aux = moe(x)
    _, experts, _ = moe.route(x.reshape(-1, 64))
    print(f"MoE {tuple(x.shape)} -> {tuple(y.shape)}, routing slots per expert {expert_counts(experts, 4).tolist()}, "
          f"aux loss {aux.item():.3f} (1.0 = balanced)")


if __name__ == "__main__":
    _demo()
