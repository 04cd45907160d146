"""The recurrent mixer: scan against the step loop, LCT against exact, carried state, the attractor check."""
import dataclasses
import math
import warnings

import pytest
import torch

import train
from checkpoint import load_run
from recurrent import SCAN_CHUNK, Recurrent, attractor_stats, model_attractor_stats
from sample import generate
from transformer import PRESETS, ModelConfig, Transformer

C, T = 8, 12
TEXT = "the cat sat on the mat and the dog sat on the log; " * 60


def reference_loop(layer, x, h):
    """Feng et al.'s minGRU / minLSTM written out, one step at a time, in plain (not log) space."""
    out = []
    for t in range(x.shape[1]):
        if layer.cell == "mingru":
            k_z, k_h = layer.in_proj(x[:, t]).chunk(2, dim=-1)
            z = torch.sigmoid(k_z)
            h = (1 - z) * h + z * torch.where(k_h >= 0, k_h + 0.5, torch.sigmoid(k_h))
        else:
            k_f, k_i, k_h = layer.in_proj(x[:, t]).chunk(3, dim=-1)
            f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
            h = f / (f + i) * h + i / (f + i) * torch.where(k_h >= 0, k_h + 0.5, torch.sigmoid(k_h))
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
@pytest.mark.parametrize("start", ["zero", "carried"])
@pytest.mark.parametrize("length", [T, 3 * SCAN_CHUNK + 5])  # one chunk; several and a part
def test_scan_equals_the_step_by_step_loop(cell, start, length):
    torch.manual_seed(0)
    layer = Recurrent(C, cell)
    with torch.no_grad():
        layer.in_proj.weight.mul_(4)  # gates far from ½ and candidates on both branches of g
    x = torch.randn(2, length, C)
    h0 = torch.zeros(2, C) if start == "zero" else 3 * torch.randn(2, C)  # any sign: not a g(·) output
    layer.load_memory_state({"c": h0} if start == "carried" else {})
    got = layer.contexts(x, layer.start_context(x))
    want = reference_loop(layer, x, h0)
    assert (got - want).abs().max() <= 1e-5
    weights = torch.randn_like(want)  # the gradients of the scan are the loop's too
    grad_got = torch.autograd.grad((got * weights).sum(), layer.in_proj.weight)[0]
    grad_want = torch.autograd.grad((want * weights).sum(), layer.in_proj.weight)[0]
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(x), layer.out_proj(want), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.memory["c"], want[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", ["mingru", "minlstm", "gated"])
def test_one_token_at_a_time_equals_the_window_with_a_constant_state(cell):
    torch.manual_seed(1)
    layer = Recurrent(C, cell).eval()
    x = torch.randn(2, T, C)
    with torch.no_grad():
        whole = layer(x)
        layer.reset_memory()
        steps, sizes = [], set()
        for t in range(T):
            steps.append(layer(x[:, t:t + 1]))
            sizes.add(sum(v.numel() * v.element_size() for v in layer.memory_state().values()))
    assert (torch.cat(steps, dim=1) - whole).abs().max() <= 1e-5
    assert sizes == {2 * C * 4}  # one float32 context per row and channel, at every length


def test_generation_state_of_the_recurrent_preset_does_not_grow():
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS["recurrent"], vocab_size=11, n_layer=2, n_embd=16)).eval()
    sizes = {}
    with torch.no_grad():
        for n in (10, 300):
            model.reset_memory()
            for t in range(n):  # past block_size: no positions, no cache, nothing to crop
                model(torch.tensor([[t % 11]]))
            sizes[n] = sum(v.numel() * v.element_size() for m in model.modules() if hasattr(m, "memory_state")
                           for v in m.memory_state().values())
    assert sizes[10] == sizes[300] == 2 * 16 * 4


def test_lct_reaches_the_exact_recurrence_one_position_per_pass():
    torch.manual_seed(2)
    layer = Recurrent(C, "gated", "lct")
    pre, c0 = layer.in_proj(torch.randn(2, T, C)), torch.randn(2, C)
    with torch.no_grad():
        exact = layer.gated_exact(pre, c0)
        for passes in (1, 3, 5):
            err = (layer.gated_lct(pre, c0, passes) - exact).abs().amax(dim=(0, 2))  # (T,)
            assert (err[:passes] <= 1e-6).all() and err[passes] > 1e-4  # positions < passes are exact, the next not
        assert (layer.gated_lct(pre, c0, T) - exact).abs().max() <= 1e-6  # the fixed point: the exact recurrence


def test_lct_trains_every_weight_with_no_gradient_through_time():
    grads = {}
    for mode in ("exact", "lct"):
        torch.manual_seed(3)  # the same weights and input for both
        layer = Recurrent(C, "gated", mode, lct_passes=4).train()
        x = torch.randn(1, T, C, requires_grad=True)
        layer(x)[0, -1].sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
        grads[mode] = x.grad[0].abs().sum(dim=-1)  # (T,): how much the last output depends on each input
    assert (grads["exact"][:-1] > 0).all()  # back through time
    assert (grads["lct"][:-1] == 0).all() and grads["lct"][-1] > 0  # the cached context carries no gradient


def test_attractor_check_flags_a_collapsing_overwrite_updater_only():
    torch.manual_seed(4)
    w_c, w_x = 0.5 * torch.randn(C, C) / math.sqrt(C), 1e-6 * torch.randn(C, C)
    prefix, tokens = torch.randn(40, C), torch.randn(8, C)  # 8 different tokens after a shared text
    collapsed = []
    for token in tokens:
        c = torch.zeros(C)
        for x in torch.cat([prefix, token[None]]):
            c = torch.tanh(w_c @ c + w_x @ x + 1.0)  # overwrite: the new context forgets the old one's input
        collapsed.append(c)
    with pytest.warns(RuntimeWarning, match="attractor"):
        stats = attractor_stats(torch.stack(collapsed))
    assert stats["collapsed"] and stats["l2"] < 1e-3 and stats["cosine"] > 0.999
    layer = Recurrent(C, "gated").eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy updater raises no warning
        ends = layer.contexts(torch.cat([prefix.expand(8, -1, -1), tokens[:, None]], dim=1), torch.zeros(8, C))
        healthy = attractor_stats(ends[:, -1])
    pairs = torch.cdist(ends[:, -1], ends[:, -1])[torch.triu_indices(8, 8, 1).unbind()]
    assert not healthy["collapsed"] and healthy["l2"] == pytest.approx(pairs.mean().item(), rel=1e-5)


@pytest.mark.parametrize("cell", ["minlstm", "gated"])
def test_each_row_carries_its_own_state(cell):
    torch.manual_seed(5)
    layer = Recurrent(C, cell).eval()
    x = torch.randn(2, 2 * T, C)
    with torch.no_grad():
        both = torch.cat([layer(x[:, :T]), layer(x[:, T:])], dim=1)  # two calls: the state carries over
        for b in range(2):
            layer.reset_memory()
            alone = torch.cat([layer(x[b:b + 1, :T]), layer(x[b:b + 1, T:])], dim=1)
            assert (alone[0] - both[b]).abs().max() <= 1e-6
        layer.load_memory_state({"c": torch.ones(2, C)})
        layer.reset_memory(torch.tensor([True, False]))
        assert (layer.memory["c"][0] == 0).all() and (layer.memory["c"][1] == 1).all()


@pytest.mark.parametrize("segments", [1, 2])
def test_carried_state_keeps_its_graph_for_memory_segments_calls(segments):
    torch.manual_seed(6)
    layer = Recurrent(C, "minlstm", memory_segments=segments).train()
    xs = [torch.randn(1, 4, C, requires_grad=True) for _ in range(3)]
    outs = [layer(x).sum() for x in xs]
    back = torch.autograd.grad(outs[1], xs[0], allow_unused=True, retain_graph=True)[0]
    assert (back is not None and back.abs().sum() > 0) == (segments == 2)  # the 2nd call reaches into the 1st
    assert torch.autograd.grad(outs[2], xs[:2], allow_unused=True) == (None, None)  # the 3rd starts detached


def test_config_checks_the_layer_kinds():
    assert ModelConfig(n_layer=3, layers="attn,recurrent,attn").layer_kinds == ("attn", "recurrent", "attn")
    assert ModelConfig(n_layer=2, layers="recurrent").layer_kinds == ("recurrent", "recurrent")
    for bad in ("attn,attn", "attn,lstm,attn,attn"):
        with pytest.raises(ValueError, match="layers="):
            ModelConfig(layers=bad)
    with pytest.raises(ValueError, match="recurrent_train"):
        ModelConfig(recurrent_train="jacobi")


def test_mixed_layers_keep_attention_parameter_names():
    mixed = Transformer(ModelConfig(n_layer=2, layers="recurrent,attn"))
    names = {n for n, _ in mixed.named_parameters()}
    assert "blocks.1.attn.qkv.weight" in names and "blocks.0.attn.in_proj.weight" in names
    assert {n for n, _ in Transformer(ModelConfig()).named_parameters()} == \
        {n for n, _ in Transformer(ModelConfig(layers="attn")).named_parameters()}


@pytest.mark.parametrize("extra", [[], ["--recurrent-cell", "gated", "--recurrent-train", "lct"]])
def test_recurrent_preset_trains_and_generates(tmp_path, monkeypatch, extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    state = train.run(["--preset", "recurrent", "--data", "text.txt", "--out", "run", "--block-size", "16",
                       "--batch-size", "8", "--n-layer", "1", "--n-embd", "32", "--steps", "40", "--lr", "3e-3",
                       "--eval-interval", "20", "--eval-iters", "2", *extra])
    assert state.step == 40
    model, tok, _ = load_run(tmp_path / "run")
    ids = torch.tensor([tok.encode("the cat ")])
    with torch.no_grad():
        model.reset_memory()
        _, loss = model(ids[:, :-1], ids[:, 1:])
    assert loss.item() < math.log(tok.vocab_size) - 0.5  # learnt something about the text
    model.reset_memory()
    out = generate(model, ids, 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, ids.shape[1] + 10) and torch.equal(out[:, :ids.shape[1]], ids)


def test_model_attractor_stats_checks_every_recurrent_layer_and_leaves_no_state():
    torch.manual_seed(7)
    model = Transformer(ModelConfig(vocab_size=11, n_layer=3, n_embd=16, layers="recurrent,attn,recurrent")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = model_attractor_stats(model, torch.zeros(6, dtype=torch.long), torch.arange(1, 6))
    assert set(stats) == {"blocks.0.attn", "blocks.2.attn"} and not any(s["collapsed"] for s in stats.values())
    assert all(m.memory is None for m in model.modules() if isinstance(m, Recurrent))
