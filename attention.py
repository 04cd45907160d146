"""Stages 9 and 12 — causal self-attention, from one head to grouped-query with a KV cache.

Attention is how a position reads from earlier positions: each one asks a
question (query), every earlier one offers a label (key) and a content
(value); the answer is the values averaged with softmax(query·key/√D)
weights. A causal mask hides the future, so the model cannot peek at the
token it must predict.

New since stage 6: positions talk to each other. SingleHeadAttention spells
the idea out; MultiHeadAttention runs H heads at once, either explicitly
("manual", the one to read) or through F.scaled_dot_product_attention ("sdpa",
fused and fast), with grouped-query attention (fewer key/value heads), RoPE,
a learnable scale and a KV cache for generation.
Run the demo: `python attention.py`

Shapes: B batch, T new positions, S = positions attended to (cache + new),
C channels, H query heads, G key/value heads (n_kv_head), D head dim.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_IMPLS = ("manual", "sdpa")
ATTN_SCALES = ("fixed", "learnable")


def causal_mask(T, device=None):
    """(T, T) bool, True where query t may look at key s, i.e. s ≤ t.

    causal_mask(3) = [[1, 0, 0],
                      [1, 1, 0],
                      [1, 1, 1]]
    """
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


class SingleHeadAttention(nn.Module):
    """One head, every step explicit: (B, T, C) -> (B, T, D)."""

    def __init__(self, n_embd, head_size, block_size, bias=False):
        super().__init__()
        self.query = nn.Linear(n_embd, head_size, bias=bias)
        self.key = nn.Linear(n_embd, head_size, bias=bias)
        self.value = nn.Linear(n_embd, head_size, bias=bias)
        self.register_buffer("mask", causal_mask(block_size), persistent=False)

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, C) -> (B, T, D) each
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, T, D) @ (B, D, T) -> (B, T, T)
        scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))  # the future gets weight exactly 0
        weights = F.softmax(scores, dim=-1)  # each row sums to 1
        return weights @ v  # (B, T, T) @ (B, T, D) -> (B, T, D)


def manual_attention(q, k, v, mask=None, scale=None, dropout_p=0.0):
    """softmax(q·kᵀ · scale, masked) · v, written out. What F.scaled_dot_product_attention computes.

    q (B, H, T, D), k and v (B, G, S, D) with G dividing H (query head i reads key/value
    head i // (H/G)); mask (T, S) bool, True = may attend, or None. Returns (B, H, T, D).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query: each key/value head serves `groups` query heads
        k = k.repeat_interleave(groups, dim=1)  # (B, G, S, D) -> (B, H, S, D)
        v = v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, T, D) @ (B, H, D, S) -> (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(F.softmax(scores, dim=-1), dropout_p)
    return weights @ v  # (B, H, T, S) @ (B, H, S, D) -> (B, H, T, D)


class KVCache:
    """Keys and values of the positions seen so far, for every layer, so generation feeds one new token per step.

    k, v: one (B, G, capacity, D) tensor per layer, allocated once. `length` positions are
    filled. During one forward every layer writes its T new positions at [length, length+T);
    the model then calls advance(T). Each cache is independent: one per sequence batch.

    static=True is the cache of a compiled step (sample.compile_for_generation): `length` is
    a 0-d tensor and attention reads the whole capacity, `visible` masking the positions not
    filled yet, so every step has the same shapes and reads its position as data. One graph
    then serves every step, where a Python int, or a slice to the current length, would be
    baked into it and compiled anew at each position. The masked keys get weight exactly 0.
    A tensor per layer rather than one (n_layer, …) tensor: a compiled step then writes each
    in place, where a write into a view of one shared tensor makes the compiler copy it whole.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, head_dim, capacity, device=None, dtype=None, static=False):
        self.k = [torch.zeros(batch_size, n_kv_head, capacity, head_dim, device=device, dtype=dtype)
                  for _ in range(n_layer)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.batch_size, self.capacity, self.static = batch_size, capacity, static
        self.length = torch.zeros((), dtype=torch.long, device=device) if static else 0

    def visible(self, T):
        """(T, capacity) bool for T new positions: True where a key is at or before the query (a static cache)."""
        device = self.k[0].device
        queries = self.length + torch.arange(T, device=device)  # (T,) the positions of the new tokens
        return torch.arange(self.capacity, device=device) <= queries[:, None]  # (S,) vs (T, 1) -> (T, S)

    def update(self, layer, k, v):
        """Store k, v (B, G, T, D) of `layer` after the cached ones; return all of them: (B, G, length+T, D),
        or for a static cache the whole capacity (B, G, capacity, D)."""
        if self.static:
            positions = self.length + torch.arange(k.shape[2], device=k.device)  # (T,)
            self.k[layer][:, :, positions] = k
            self.v[layer][:, :, positions] = v
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T):
        self.length += T  # in place for a static cache's tensor

    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v)


class MultiHeadAttention(nn.Module):
    """H heads of causal self-attention from one fused q/k/v projection: (B, T, C) -> (B, T, C).

    n_kv_head G (default H) key/value heads are shared by groups of H/G query heads:
    G = H is classic multi-head, 1 < G < H grouped-query (GQA), G = 1 multi-query (MQA);
    fewer heads make the KV cache smaller. `rotary` (a RotaryEmbedding) rotates q and k
    by position; `attn_scale` "fixed" uses D^−0.5, "learnable" one scale per head that
    starts there. forward(x, cache, layer) also reads and extends a KVCache.
    """

    def __init__(self, n_embd, n_head, block_size, n_kv_head=None, bias=False, dropout=0.0,
                 attn_impl="sdpa", attn_scale="fixed", rotary=None):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if n_embd % n_head or n_head % n_kv_head:
            raise ValueError(f"need n_embd % n_head == 0 and n_head % n_kv_head == 0, "
                             f"got n_embd={n_embd}, n_head={n_head}, n_kv_head={n_kv_head}")
        if attn_impl not in ATTN_IMPLS or attn_scale not in ATTN_SCALES:
            raise ValueError(f"attn_impl {attn_impl!r} / attn_scale {attn_scale!r}: "
                             f"choose from {ATTN_IMPLS} / {ATTN_SCALES}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        self.attn_impl, self.dropout, self.rotary = attn_impl, dropout, rotary
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)  # writes into the residual stream
        self.scale = nn.Parameter(torch.full((n_head,), self.head_dim ** -0.5)) if attn_scale == "learnable" else None
        self.register_buffer("mask", causal_mask(block_size), persistent=False)

    def causal_mask_at(self, start, T):
        """(T, start+T) bool: the queries at start … start+T−1 see every key up to their own position."""
        end = start + T
        if end > self.mask.shape[0]:  # past block_size (RoPE runs longer): build it once for this call
            return causal_mask(end, self.mask.device)[start:]
        return self.mask[start:end, :end]

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        y, _ = self.attend(x, cache, layer)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, H, T, D) -> (B, T, H·D = C)

    def attend(self, x, cache=None, layer=0):
        """The heads' outputs before they are joined: x (B, T, C) -> y (B, H, T, D), and the projections
        (q (B, H, T, D), k and v (B, G, T, D)) of the new positions before RoPE, for a layer built on this one."""
        B, T, C = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        start = 0 if cache is None else cache.length
        qk, v = self.qkv(x).view(B, T, H + 2 * G, D).split([H + G, G], dim=2)  # (B, T, C) -> (B, T, h, D)
        raw = qk
        if self.rotary is not None:
            qk = self.rotary(qk, start)  # queries and keys turned by position, all H + G heads in one call
        q, k = qk.split([H, G], dim=2)  # (B, T, H + G, D) -> (B, T, H, D), (B, T, G, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, h, D) -> (B, h, T, D)
        projections = [t.transpose(1, 2) for t in raw.split([H, G], dim=2)] + [v]  # (B, h, T, D) each
        scale = None  # the default, D^−0.5
        if self.scale is not None:
            q, scale = q * self.scale.view(1, H, 1, 1), 1.0  # (H,) -> (1, H, 1, 1) broadcasts
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, G, T, D) -> (B, G, S, D)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None and cache.static:  # every key position, those not filled yet masked
            # written out: compiled, its few ops fuse into loops, where sdpa's CPU kernel took 4× longer per query
            y = manual_attention(q, k, v, cache.visible(T), scale)
        elif self.attn_impl == "manual":
            mask = self.causal_mask_at(start, T) if T > 1 else None
            y = manual_attention(q, k, v, mask, scale, dropout_p)
        elif start == 0 or T == 1:  # square causal, or one query that may see every key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1, scale=scale,
                                               enable_gqa=G < H)
        else:  # a chunk after a cached prefix: is_causal would align the mask top-left, so pass it
            y = F.scaled_dot_product_attention(q, k, v, self.causal_mask_at(start, T), dropout_p, scale=scale,
                                               enable_gqa=G < H)
        return y, projections


def _demo():
    torch.manual_seed(0)
    print("causal_mask(4):\n", causal_mask(4).int())
    head = SingleHeadAttention(n_embd=16, head_size=8, block_size=8)
    x = torch.randn(1, 4, 16)
    print("SingleHeadAttention", tuple(x.shape), "->", tuple(head(x).shape))
    mha = MultiHeadAttention(n_embd=16, n_head=4, block_size=8, n_kv_head=2, attn_impl="manual")
    y_manual = mha(x)
    mha.attn_impl = "sdpa"
    print(f"MultiHeadAttention (4 query heads, 2 key/value heads) {tuple(x.shape)} -> {tuple(y_manual.shape)}; "
          f"manual vs sdpa max diff {(y_manual - mha(x)).abs().max().item():.1e}")
    cache = KVCache(n_layer=1, batch_size=1, n_kv_head=2, head_dim=4, capacity=8)
    steps = []
    for t in range(4):  # one position at a time, reading the cache
        steps.append(mha(x[:, t:t + 1], cache))
        cache.advance(1)
    print(f"KV cache, one token at a time vs all at once: max diff {(torch.cat(steps, 1) - y_manual).abs().max():.1e}")


if __name__ == "__main__":
    _demo()
