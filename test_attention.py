"""Tests for attention.py (and the attention of every preset): mask, causality, manual vs SDPA, GQA, KV cache."""
import dataclasses

import pytest
import torch

from attention import KVCache, MultiHeadAttention, SingleHeadAttention, causal_mask, manual_attention
from components import RotaryEmbedding
from transformer import PRESETS, Transformer

VOCAB = 23


def tiny(name, **overrides):
    """A preset shrunk to test size, keeping its kind of norm, feed-forward and positions."""
    small = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=32)
    if PRESETS[name].ffn_hidden:
        small["ffn_hidden"] = 48
    return dataclasses.replace(PRESETS[name], **{**small, **overrides})


VARIANTS = {
    **{name: tiny(name) for name in PRESETS if PRESETS[name].layers is None},  # layer mixes: test_memory.py
    "gpt-manual": tiny("gpt", attn_impl="manual", bias=True),
    "llama-manual-gqa": tiny("llama", attn_impl="manual", n_kv_head=2),
    "llama-mqa-learnable": tiny("llama", n_kv_head=1, attn_scale="learnable"),
    "moe-top1-manual": tiny("moe", moe_top_k=1, attn_impl="manual", rope_scaling="ntk:2"),
}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def reference_attention(q, k, v):
    """softmax(QKᵀ/√d + M)V with M = −inf above the diagonal: q, k, v (…, T, D)."""
    T, D = q.shape[-2:]
    M = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    return torch.softmax(q @ k.transpose(-2, -1) / D ** 0.5 + M, dim=-1) @ v


def test_causal_mask_values():
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(4), expected)
    assert causal_mask(1).tolist() == [[True]]


def test_single_head_matches_reference():
    head = SingleHeadAttention(n_embd=12, head_size=6, block_size=10)
    x = torch.randn(2, 7, 12)
    expected = reference_attention(head.query(x), head.key(x), head.value(x))
    torch.testing.assert_close(head(x), expected)


def test_manual_attention_matches_reference():
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)  # (B, H, T, D) each
    torch.testing.assert_close(manual_attention(q, k, v, causal_mask(9)), reference_attention(q, k, v))


def test_one_head_multihead_equals_single_head():
    single = SingleHeadAttention(n_embd=16, head_size=16, block_size=8)
    for impl in ("manual", "sdpa"):
        mha = MultiHeadAttention(n_embd=16, n_head=1, block_size=8, attn_impl=impl)
        with torch.no_grad():
            mha.qkv.weight.copy_(torch.cat([single.query.weight, single.key.weight, single.value.weight]))
        x = torch.randn(2, 8, 16)
        torch.testing.assert_close(mha(x), mha.out_proj(single(x)))


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("attn_scale", ["fixed", "learnable"])
def test_manual_and_sdpa_agree(n_kv_head, rope, attn_scale):
    rotary = RotaryEmbedding(8, max_len=4) if rope else None
    mha = MultiHeadAttention(32, 4, block_size=12, n_kv_head=n_kv_head, attn_scale=attn_scale, rotary=rotary)
    if mha.scale is not None:
        torch.nn.init.uniform_(mha.scale, 0.1, 0.6)
    x = torch.randn(3, 12, 32)
    mha.attn_impl = "manual"
    manual = mha(x)
    mha.attn_impl = "sdpa"
    assert (manual - mha(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_grouped_query_equals_multihead_with_shared_weights(n_kv_head):
    """GQA (G key/value heads) == ordinary MHA whose query head h uses copies of kv head h // (H/G)."""
    H, D, C = 4, 8, 32
    gqa = MultiHeadAttention(C, H, 10, n_kv_head=n_kv_head, rotary=RotaryEmbedding(D))
    mha = MultiHeadAttention(C, H, 10, n_kv_head=H, rotary=RotaryEmbedding(D))
    q, k, v = gqa.qkv.weight.split([H * D, n_kv_head * D, n_kv_head * D])
    repeat = lambda w: w.view(n_kv_head, D, C).repeat_interleave(H // n_kv_head, dim=0).reshape(H * D, C)
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
    x = torch.randn(2, 10, C)
    for impl in ("manual", "sdpa"):
        gqa.attn_impl = mha.attn_impl = impl
        torch.testing.assert_close(gqa(x), mha(x))
    assert gqa.qkv.out_features < mha.qkv.out_features


def test_n_kv_head_none_is_n_head():
    assert MultiHeadAttention(32, 4, 8).n_kv_head == MultiHeadAttention(32, 4, 8, n_kv_head=4).n_kv_head == 4
    with pytest.raises(ValueError, match="n_kv_head"):
        MultiHeadAttention(32, 4, 8, n_kv_head=3)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name):
    """Changing tokens after position t never changes the logits at positions ≤ t."""
    model = Transformer(VARIANTS[name]).eval()
    idx = torch.randint(VOCAB, (2, 16))
    logits, _ = model(idx)
    for t in (0, 6, 14):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(VOCAB, (2, 15 - t))
        model.reset_memory()  # a new text: a stateful layer (recurrent preset) starts afresh
        torch.testing.assert_close(model(changed)[0][:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-6)


def test_manual_and_sdpa_agree_in_eval_with_dropout_configured():
    cfg = tiny("llama", dropout=0.2, n_kv_head=2)
    model = Transformer(cfg).eval()
    manual = Transformer(dataclasses.replace(cfg, attn_impl="manual")).eval()
    manual.load_state_dict(model.state_dict())
    idx = torch.randint(VOCAB, (2, 16))
    assert (model(idx)[0] - manual(idx)[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("static", [False, True], ids=["sliced", "static"])
@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_equals_full_recomputation(name, static):
    """static: the cache of a compiled step, read whole with the unfilled positions masked."""
    model = Transformer(VARIANTS[name]).eval()
    idx = torch.randint(VOCAB, (2, 16))
    full, _ = model(idx)
    with torch.no_grad():
        model.reset_memory()  # each pass below reads the text anew
        cache = model.new_kv_cache(batch_size=2, static=static)
        steps = [model(idx[:, :5], cache=cache)[0]]  # prefill, then one token at a time
        steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
        assert cache.length == 16
        assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
        model.reset_memory()
        cache = model.new_kv_cache(batch_size=2, static=static)
        bounds = [0, 3, 4, 9, 16]  # chunks of 3, 1, 5 and 7 positions
        chunks = [model(idx[:, a:b], cache=cache)[0] for a, b in zip(bounds, bounds[1:])]
        assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-5


def test_separate_caches_do_not_interfere():
    model = Transformer(tiny("llama")).eval()
    a, b = torch.randint(VOCAB, (2, 1, 8))
    cache_a, cache_b = model.new_kv_cache(1), model.new_kv_cache(1)
    with torch.no_grad():
        out_a = [model(a[:, t:t + 1], cache=cache_a)[0] for t in range(4)]
        out_b = [model(b[:, t:t + 1], cache=cache_b)[0] for t in range(8)]
        out_a += [model(a[:, t:t + 1], cache=cache_a)[0] for t in range(4, 8)]
    assert (cache_a.length, cache_b.length) == (8, 8)
    assert (torch.cat(out_a, 1) - model(a)[0]).abs().max() <= 1e-5
    assert (torch.cat(out_b, 1) - model(b)[0]).abs().max() <= 1e-5


def test_cache_overflow_is_a_clear_error():
    model = Transformer(tiny("gpt")).eval()
    cache = model.new_kv_cache(batch_size=1)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="new cache"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="learned positions"):
        model.new_kv_cache(1, capacity=32)


@pytest.mark.parametrize("static", [False, True], ids=["sliced", "static"])
def test_rope_model_runs_past_block_size_with_a_longer_cache(static):
    model = Transformer(tiny("llama", block_size=8, rope_scaling="linear:2")).eval()
    idx = torch.randint(VOCAB, (1, 20))
    full, _ = model(idx)  # RoPE has no position table, so 20 > block_size positions work
    with torch.no_grad():
        cache = model.new_kv_cache(1, capacity=24, static=static)  # a static one grows the RoPE tables up front
        chunks = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 6), (6, 13), (13, 14), (14, 20)]]
    assert (torch.cat(chunks, 1) - full).abs().max() <= 1e-5


def test_kv_cache_update_returns_everything_so_far():
    cache = KVCache(n_layer=2, batch_size=1, n_kv_head=2, head_dim=4, capacity=6)
    k1, v1 = torch.randn(2, 1, 2, 3, 4)
    cache.update(1, k1, v1)
    cache.advance(3)
    k2, v2 = torch.randn(2, 1, 2, 2, 4)
    k_all, v_all = cache.update(1, k2, v2)
    assert torch.equal(k_all, torch.cat([k1, k2], dim=2)) and torch.equal(v_all, torch.cat([v1, v2], dim=2))


def test_static_kv_cache_returns_the_whole_capacity_and_masks_what_is_not_filled():
    cache = KVCache(n_layer=2, batch_size=1, n_kv_head=2, head_dim=4, capacity=6, static=True)
    k1, v1 = torch.randn(2, 1, 2, 3, 4)
    cache.update(1, k1, v1)
    cache.advance(3)
    k2, v2 = torch.randn(2, 1, 2, 2, 4)
    k_all, v_all = cache.update(1, k2, v2)
    assert k_all.shape == (1, 2, 6, 4) and torch.equal(k_all[:, :, :5], torch.cat([k1, k2], dim=2))
    assert torch.equal(v_all[:, :, :5], torch.cat([v1, v2], dim=2)) and not k_all[:, :, 5:].any()
    assert torch.equal(cache.visible(2), torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool))
