"""Tests for transformer.py: parameter counts, tying, init, config checks, overfitting, round trip.
That the gpt, llama and moe models compute what Hugging Face's GPT-2, Llama and Mixtral compute on the
same weights is tested in test_export.py, through export.py's one mapping of names."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bigram_lm import next_token_loss
from transformer import PRESETS, ModelConfig, Transformer


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def small_llama(**overrides):
    base = dict(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return dataclasses.replace(PRESETS["llama"], **{**base, **overrides})


def test_gpt_preset_is_nanogpts_cpu_model():
    V, T, L, C = 65, 64, 4, 128
    per_layer = 2 * C + 3 * C * C + C * C + 2 * 4 * C * C  # two norms, q/k/v, out, MLP in and out
    expected = V * C + T * C + L * per_layer + C  # tied head adds nothing; final norm C
    assert expected == 804_096
    assert Transformer(PRESETS["gpt"]).num_params() == expected


def test_llama_param_count_closed_form():
    V, L, C, H, G, D, F = 65, 2, 64, 4, 2, 16, 192  # F: 8·64//3 = 170 rounded up to 192
    per_layer = 2 * C + C * (H + 2 * G) * D + C * C + 3 * C * F
    assert Transformer(small_llama()).num_params() == V * C + L * per_layer + C == 102_784
    untied = Transformer(small_llama(tie_weights=False)).num_params()
    assert untied == 102_784 + V * C


def test_moe_param_count_closed_form():
    V, L, C, E, F = 65, 2, 64, 4, 96
    per_layer = 2 * C + 4 * C * C + C * E + E * 3 * C * F  # router + E SwiGLU experts
    assert Transformer(small_llama(n_kv_head=None, mlp="moe", n_experts=E, ffn_hidden=F)).num_params() \
        == V * C + L * per_layer + C


def test_tied_weights_share_storage():
    model = Transformer(PRESETS["gpt"])
    assert model.head.weight.data_ptr() == model.embed.tok.weight.data_ptr()
    untied = Transformer(dataclasses.replace(PRESETS["gpt"], tie_weights=False))
    assert untied.head.weight.data_ptr() != untied.embed.tok.weight.data_ptr()


def test_gpt2_style_init():
    model = Transformer(dataclasses.replace(PRESETS["gpt"], bias=True))
    residual_std = 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert torch.all(p == 1), name  # norm weights
    assert abs(model.embed.tok.weight.mean().item()) < 0.002


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=130), "n_embd=130 is not divisible by n_head=4"),
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(norm="batchnorm"), "unknown norm 'batchnorm'"),
    (dict(mlp="relu"), "unknown mlp"),
    (dict(pos="alibi"), "unknown pos"),
    (dict(attn_impl="flash"), "unknown attn_impl"),
    (dict(attn_scale="auto"), "unknown attn_scale"),
    (dict(n_layer=0), "n_layer=0"),
    (dict(dropout=1.0), "dropout"),
    (dict(moe_top_k=5), "moe_top_k=5 exceeds n_experts=4"),
    (dict(rope_scaling="linear:2"), "needs pos='rope'"),
    (dict(pos="rope", rope_scaling="yarn:2"), "linear:S"),
    (dict(pos="rope", n_embd=12, n_head=4), "must be even"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


def test_config_defaults_and_resolved_fields():
    cfg = ModelConfig()
    assert cfg == PRESETS["gpt"] and cfg.kv_heads == 4 and cfg.head_dim == 32
    assert ModelConfig(n_kv_head=0).kv_heads == 4
    assert set(PRESETS) >= {"gpt", "llama", "moe"}


def test_asdict_round_trip_rebuilds_the_same_model(tmp_path):
    cfg = small_llama(mlp="moe", ffn_hidden=32, rope_scaling="ntk:2", attn_scale="learnable")
    model = Transformer(cfg).eval()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)), encoding="utf-8")
    rebuilt = Transformer(ModelConfig(**json.loads(path.read_text(encoding="utf-8")))).eval()
    assert rebuilt.config == cfg
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes, no hidden buffers
    idx = torch.randint(65, (2, 32))
    assert torch.equal(rebuilt(idx)[0], model(idx)[0])


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_overfits_one_batch(name):
    cfg = dataclasses.replace(PRESETS[name], vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = Transformer(cfg)
    idx = torch.randint(16, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_forward_shapes_and_position_limit():
    model = Transformer(dataclasses.replace(PRESETS["gpt"], block_size=8))
    logits, loss = model(torch.zeros(3, 8, dtype=torch.long))
    assert logits.shape == (3, 8, 65) and loss is None
    with pytest.raises(ValueError, match="block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_moe_aux_loss_added_only_while_training():
    model = Transformer(small_llama(mlp="moe", ffn_hidden=32, moe_aux_weight=0.5))
    idx = torch.randint(65, (2, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    logits, loss = model(x, y)
    report = model.moe_report(x)
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert loss.item() == pytest.approx(cross_entropy + 0.5 * report["aux_loss"], rel=1e-5)
    # the two terms, kept apart for the metrics
    assert model.loss_terms["train_loss"].item() == pytest.approx(cross_entropy, rel=1e-6)
    assert model.loss_terms["aux_loss"].item() == pytest.approx(report["aux_loss"], rel=1e-6)
    logits, loss = model.eval()(x, y)
    assert loss.item() == pytest.approx(next_token_loss(logits, y).item())


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_learns_from_the_cross_entropy_alone(top_k):
    model = Transformer(small_llama(mlp="moe", ffn_hidden=32, moe_top_k=top_k, moe_aux_weight=0.0)).double()
    idx = torch.randint(65, (2, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    _, loss = model(x, y)
    loss.backward()
    for block in model.blocks:
        router = block.ffn.router.weight
        grad = router.grad.clone()
        assert grad.norm() > 1e-6  # top-1 renormalised to exactly 1 left only rounding here (~1e-19)
        # the gradient is the cross-entropy's own: a central difference along it agrees (in float64,
        # which the model's loss, taken in float32, would not resolve)
        step = 1e-6 * grad / grad.norm()
        with torch.no_grad():
            router += step
            up = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
            router -= 2 * step
            down = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
            router += step
        assert (up - down) / 2e-6 == pytest.approx(grad.norm().item(), rel=1e-4)


def test_moe_report():
    model = Transformer(small_llama(mlp="moe", ffn_hidden=32, n_experts=3, moe_top_k=2))
    report = model.moe_report(torch.randint(65, (2, 32)))
    assert len(report["expert_fraction"]) == 2 and all(len(row) == 3 for row in report["expert_fraction"])
    assert all(sum(row) == pytest.approx(1.0) for row in report["expert_fraction"])
    assert 1.0 <= report["aux_loss"] <= 3.0
    assert Transformer(small_llama()).moe_report(torch.zeros(1, 4, dtype=torch.long)) == {}
