"""Tests for components.py: each part against the formula it claims to compute."""
import math

import pytest
import torch
import torch.nn as nn

from components import (MLP, Embeddings, LayerNorm, MoE, RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary,
                        expert_counts, load_balancing_loss, make_norm, parse_rope_scaling, rope_frequencies,
                        swiglu_hidden)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_embeddings_positions_follow_start():
    emb = Embeddings(vocab_size=11, dim=8, block_size=16)
    idx = torch.randint(11, (2, 16))
    full = emb(idx)
    assert full.shape == (2, 16, 8)
    assert torch.equal(emb(idx[:, 5:9], start=5), full[:, 5:9])
    assert torch.equal(full, emb.tok.weight[idx] + emb.pos.weight[:16])
    assert Embeddings(11, 8).pos is None  # RoPE models have no position table


def test_rmsnorm_matches_formula():
    norm = RMSNorm(16, eps=1e-5)
    nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 16) * 3
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(bias):
    ours, ref = LayerNorm(16, bias=bias), nn.LayerNorm(16, bias=bias)
    with torch.no_grad():
        nn.init.normal_(ours.weight)
        ref.weight.copy_(ours.weight)
        if bias:
            nn.init.normal_(ours.bias)
            ref.bias.copy_(ours.bias)
    x = torch.randn(4, 7, 16)
    torch.testing.assert_close(ours(x), ref(x))
    assert (ours.bias is None) != bias


def test_make_norm_rejects_unknown_kind():
    assert isinstance(make_norm("rmsnorm", 8), RMSNorm)
    with pytest.raises(ValueError, match="batchnorm"):
        make_norm("batchnorm", 8)


def test_mlp_matches_reference():
    mlp = MLP(8, bias=True)
    x = torch.randn(2, 3, 8)
    h = x @ mlp.fc.weight.T + mlp.fc.bias
    expected = 0.5 * h * (1 + torch.erf(h / math.sqrt(2))) @ mlp.out_proj.weight.T + mlp.out_proj.bias
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.fc.out_features == 32


def test_swiglu_matches_reference():
    f = SwiGLU(16, hidden=24)
    x = torch.randn(2, 3, 16)
    a, b = x @ f.gate.weight.T, x @ f.up.weight.T
    expected = (a / (1 + torch.exp(-a)) * b) @ f.out_proj.weight.T  # W3(silu(W1 x) ⊙ W2 x)
    torch.testing.assert_close(f(x), expected)
    assert all(m.bias is None for m in (f.gate, f.up, f.out_proj))


def test_swiglu_hidden_rule():
    assert [swiglu_hidden(d) for d in (64, 100, 128, 192)] == [192, 320, 384, 512]
    for dim in (64, 128, 192, 256):
        hidden = SwiGLU(dim).gate.out_features
        assert hidden % 64 == 0 and hidden >= 8 * dim / 3
        ratio = sum(p.numel() for p in SwiGLU(dim).parameters()) / sum(p.numel() for p in MLP(dim).parameters())
        assert 0.95 <= ratio <= 1.15  # about the cost of the GELU MLP it replaces


def reference_rope(x, positions, head_dim, theta):
    """RoPE from its definition: pair (x[i], x[i+D/2]) turned by angle p·theta^(−2i/D). x (T, D)."""
    out = x.clone()
    for t, p in enumerate(positions.tolist()):
        for i in range(head_dim // 2):
            angle = p * theta ** (-2 * i / head_dim)
            a, b = x[t, i].item(), x[t, i + head_dim // 2].item()
            out[t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[t, i + head_dim // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_rope_matches_definition_and_preserves_norms():
    rope = RotaryEmbedding(8, theta=100.0)
    x = torch.randn(1, 6, 3, 8)  # (B, T, h, D)
    y = rope(x, start=2)
    torch.testing.assert_close(y[0, :, 1], reference_rope(x[0, :, 1], torch.arange(2, 8), 8, 100.0))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(rope(x[:, :1]), x[:, :1])  # position 0: no rotation


def test_rope_score_depends_only_on_offset():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    scores = [(rope(q, start=p + 3) * rope(k, start=p)).sum() for p in (0, 7, 100)]  # offset 3 each time
    torch.testing.assert_close(torch.stack(scores), scores[0].expand(3), atol=1e-4, rtol=1e-5)
    assert not torch.allclose((rope(q, start=5) * rope(k)).sum(), scores[0])  # a different offset differs


def test_rope_linear_scaling_divides_positions():
    s, D = 4.0, 8
    rope = RotaryEmbedding(D, theta=10000.0, scaling=f"linear:{s}")
    x = torch.randn(1, 9, 1, D)
    expected = reference_rope(x[0, :, 0], torch.arange(9) / s, D, 10000.0)
    torch.testing.assert_close(rope(x)[0, :, 0], expected)


def test_rope_ntk_scaling_raises_the_base():
    s, D, theta = 8.0, 16, 10000.0
    ntk = rope_frequencies(D, theta, f"ntk:{s}")
    assert torch.allclose(ntk, rope_frequencies(D, theta * s ** (D / (D - 2))))
    plain = rope_frequencies(D, theta)
    assert ntk[0] == plain[0] and torch.isclose(ntk[-1], plain[-1] / s)  # fastest pair kept, slowest slowed by s
    x = torch.randn(1, 5, 2, D)
    assert torch.allclose(RotaryEmbedding(D, theta, f"ntk:{s}")(x), RotaryEmbedding(D, theta * s ** (D / (D - 2)))(x))


def test_rope_tables_grow_past_max_len():
    rope = RotaryEmbedding(8, max_len=4)
    x = torch.randn(1, 3, 1, 8)
    torch.testing.assert_close(rope(x, start=10)[0, :, 0], reference_rope(x[0, :, 0], torch.arange(10, 13), 8, 1e4))


@pytest.mark.parametrize("spec", ["linear", "cubic:2", "ntk:0.5", "linear:x"])
def test_parse_rope_scaling_rejects(spec):
    with pytest.raises(ValueError, match="linear:S"):
        parse_rope_scaling(spec)
    assert parse_rope_scaling("ntk:2") == ("ntk", 2.0)
    assert parse_rope_scaling(None) == (None, 1.0)


def test_apply_rotary_inverse_is_negative_angle():
    x, angle = torch.randn(4, 6), torch.randn(4, 3)
    back = apply_rotary(apply_rotary(x, angle.cos(), angle.sin()), angle.cos(), -angle.sin())
    torch.testing.assert_close(back, x)


def dense_moe(moe, x):
    """Reference MoE: every expert on every token, each output scaled by that token's routing weight (0 if unchosen)."""
    flat = x.reshape(-1, x.shape[-1])
    weights, experts, _ = moe.route(flat)
    gate = torch.zeros(flat.shape[0], len(moe.experts)).scatter(1, experts, weights)  # (N, E)
    y = sum(gate[:, e:e + 1] * expert(flat) for e, expert in enumerate(moe.experts))
    return y.view_as(x)


def test_moe_one_expert_top1_is_that_swiglu():
    moe = MoE(16, hidden=32, n_experts=1, top_k=1)
    x = torch.randn(2, 5, 16)
    y, aux = moe(x)
    torch.testing.assert_close(y, moe.experts[0](x))
    assert aux.item() == pytest.approx(1.0)


def test_moe_routes_each_token_to_k_distinct_experts():
    moe = MoE(16, hidden=32, n_experts=5, top_k=3)
    weights, experts, probs = moe.route(torch.randn(40, 16))
    assert experts.shape == weights.shape == (40, 3)
    assert all(len(set(row)) == 3 for row in experts.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(40))
    torch.testing.assert_close(probs.sum(-1), torch.ones(40))
    assert expert_counts(experts, 5).sum() == 40 * 3


def test_moe_weights_are_softmax_over_the_chosen_logits():
    moe = MoE(16, hidden=32, n_experts=6, top_k=2)
    x = torch.randn(30, 16)
    weights, experts, _ = moe.route(x)
    logits = x @ moe.router.weight.T  # (N, E), the router by hand
    chosen = logits.gather(1, experts)  # (N, K)
    assert (chosen.min(-1).values >= logits.topk(3, -1).values[:, 1] - 1e-6).all()  # the two largest
    torch.testing.assert_close(weights, chosen.exp() / chosen.exp().sum(-1, keepdim=True))


def test_moe_top1_weight_is_the_router_probability():
    moe = MoE(16, hidden=32, n_experts=6, top_k=1)
    x = torch.randn(30, 16)
    weights, experts, _ = moe.route(x)
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)  # (N, E), the router by hand
    torch.testing.assert_close(experts[:, 0], probs.argmax(-1))
    torch.testing.assert_close(weights[:, 0], probs.max(-1).values)  # not renormalised to 1


def test_idle_experts_take_part_with_a_zero_gradient():
    moe = MoE(8, hidden=16, n_experts=6, top_k=2)
    x = torch.randn(1, 1, 8)  # one token: 2 experts chosen, 4 idle
    y, _ = moe(x)
    y.sum().backward()
    _, experts, _ = moe.route(x.reshape(1, 8))
    for e, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        assert all(g is not None for g in grads), e  # DistributedDataParallel needs every gradient
        assert all(g.abs().sum() > 0 for g in grads) == (e in experts.flatten().tolist()), e


def test_moe_dispatch_equals_dense_loop_with_gradients():
    moe = MoE(16, hidden=24, n_experts=4, top_k=2)
    x = torch.randn(3, 7, 16)
    y, _ = moe(x)
    y_ref = dense_moe(moe, x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(moe.parameters()), g)
    grads_ref = torch.autograd.grad(y_ref, list(moe.parameters()), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_aux_loss_is_one_for_a_uniform_router():
    moe = MoE(8, hidden=16, n_experts=4, top_k=2)
    nn.init.zeros_(moe.router.weight)  # every router probability exactly 1/E
    _, aux = moe(torch.randn(2, 6, 8))
    assert aux.item() == pytest.approx(1.0)
    # uniform probabilities and a perfectly even assignment, built by hand: 8 tokens, each expert twice per slot
    probs = torch.full((8, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3], [2, 0], [3, 1]])
    counts = expert_counts(experts, 4)
    assert counts.tolist() == [4, 4, 4, 4]
    assert load_balancing_loss(counts, probs).item() == pytest.approx(1.0)


def test_aux_loss_formula_on_a_skewed_router():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    counts = torch.tensor([2, 0, 0])  # top-1: both tokens to expert 0
    expected = 3 * (1.0 * 0.65 + 0 * 0.25 + 0 * 0.1)
    assert load_balancing_loss(counts, probs).item() == pytest.approx(expected)


def test_aux_loss_gradient_reaches_router():
    moe = MoE(8, hidden=16, n_experts=4, top_k=1)
    _, aux = moe(torch.randn(2, 6, 8))
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_moe_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, n_experts=2, top_k=3)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)

