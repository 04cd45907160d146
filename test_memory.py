"""memory.py: Infini-attention against the paper's equations, per-sequence memory, gradients through it,
layer composition, generation with memory, memory transfer between processes, and the document pipeline."""
import dataclasses
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import sample

from attention import MultiHeadAttention
from char_tokenizer import CharTokenizer
from memory import MEMORY_EPS, InfiniAttention, document_batches, document_starts, memory_read, memory_update
from sample import generate
from training_loop import TrainConfig, make_optimizer, train_loop
from transformer import PRESETS, ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent
TESTED_KINDS = ("attn", "infini", "recurrent")


def tiny(**overrides):
    base = dict(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=16, layers="infini,attn")
    return dataclasses.replace(PRESETS["infini"], **{**base, **overrides})


def sigma(x):
    return F.elu(x) + 1


def naive_infini(layer, segments, rule, banks=1):
    """The paper's equations position by position, for one sequence: segments is a list of (T, C) tensors.

    Per head h: local softmax attention over the segment, memory read σ(q)M/(σ(q)z), gate mix, then the write of
    the whole segment from the memory at its start; with banks, segment s writes bank s mod N and a read mixes
    the banks by relevance σ(q)·z_b/Σz_b.
    """
    H, D = layer.n_head, layer.head_dim
    Wq, Wk, Wv = layer.qkv.weight.split(H * D)
    M = [[torch.zeros(D, D) for _ in range(banks)] for _ in range(H)]
    z = [[torch.zeros(D) for _ in range(banks)] for _ in range(H)]
    outputs = []
    for s, x in enumerate(segments):
        q, k, v = x @ Wq.T, x @ Wk.T, x @ Wv.T  # (T, H·D)
        T = x.shape[0]
        y = torch.zeros(T, H * D)
        for h in range(H):
            cols = slice(h * D, (h + 1) * D)
            g = torch.sigmoid(layer.gate[h])
            for t in range(T):
                qt = q[t, cols]
                scores = torch.stack([qt @ k[j, cols] / math.sqrt(D) for j in range(t + 1)])
                local = sum(w * v[j, cols] for j, w in enumerate(torch.softmax(scores, 0)))
                reads = [sigma(qt) @ M[h][b] / (sigma(qt) @ z[h][b] + MEMORY_EPS) for b in range(banks)]
                if banks == 1:
                    mem = reads[0]
                else:
                    rel = [sigma(qt) @ (z[h][b] / (z[h][b].sum() + MEMORY_EPS)) for b in range(banks)]
                    mem = sum(r / (sum(rel) + MEMORY_EPS) * a for r, a in zip(rel, reads))
                y[t, cols] = g * mem + (1 - g) * local
            b = s % banks
            M0, z0 = M[h][b].clone(), z[h][b].clone()
            for t in range(T):
                sk, vt = sigma(k[t, cols]), v[t, cols]
                if rule == "delta":
                    vt = vt - sk @ M0 / (sk @ z0 + MEMORY_EPS)
                M[h][b] = M[h][b] + torch.outer(sk, vt)
                z[h][b] = z[h][b] + sk
        outputs.append(y @ layer.out_proj.weight.T)
    return outputs


@pytest.mark.parametrize("rule, banks", [("linear", 1), ("delta", 1), ("delta", 2), ("linear", 3)])
def test_read_write_and_gate_match_the_papers_equations(rule, banks):
    torch.manual_seed(0)
    layer = InfiniAttention(16, 2, 8, update=rule, banks=banks)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.7, -0.4]))  # two different mixes
    x = torch.randn(2, 4 * 6, 16)  # two sequences, four segments of 6
    got = [layer(x[:, s:s + 6]) for s in range(0, 24, 6)]
    for row in range(2):
        want = naive_infini(layer, [x[row, s:s + 6] for s in range(0, 24, 6)], rule, banks)
        for g, w in zip(got, want):
            torch.testing.assert_close(g[row], w, atol=1e-5, rtol=1e-5)


def test_a_read_is_an_average_not_scaled_by_how_much_was_read():
    """The origin project divided reads by the sequence length; here σ(q)M/(σ(q)z) of one value written n times is
    that value, whatever n (the linear rule), and a delta-rule memory that already holds a value adds nothing."""
    torch.manual_seed(0)
    k, v, q = torch.randn(1, 5), torch.randn(1, 5), torch.randn(3, 5)
    for n in (1, 10, 1000):
        dM, dz = memory_update(sigma(k).expand(n, 5), v.expand(n, 5), torch.zeros(5, 5), torch.zeros(5), "linear")
        torch.testing.assert_close(memory_read(sigma(q), dM, dz), v.expand(3, 5), atol=1e-4, rtol=1e-4)  # ε aside
    added, _ = memory_update(sigma(k), v, dM, dz, "delta")
    assert added.abs().max() < 1e-3 * dM.abs().max()


def test_rope_turns_the_local_path_only():
    torch.manual_seed(0)
    from components import RotaryEmbedding
    plain, rotary = InfiniAttention(16, 2, 8), InfiniAttention(16, 2, 8, rotary=RotaryEmbedding(8, max_len=8))
    rotary.load_state_dict(plain.state_dict())
    reference = MultiHeadAttention(16, 2, 8, rotary=RotaryEmbedding(8, max_len=8))
    reference.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "gate"})
    x = torch.randn(1, 16, 16)
    with torch.no_grad():
        for layer in (plain, rotary):
            layer.gate.fill_(30.0)  # all memory
            layer(x[:, :8])
        torch.testing.assert_close(plain(x[:, 8:]), rotary(x[:, 8:]), atol=1e-5, rtol=0)  # memory: no positions
        rotary.gate.fill_(-30.0)  # all local: RoPE attention over the segment
        torch.testing.assert_close(rotary(x[:, 8:]), reference(x[:, 8:]), atol=1e-5, rtol=0)


def test_each_row_of_a_batch_has_its_own_memory():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    idx = torch.randint(23, (2, 32))  # four segments
    both, _ = model(idx)
    for row in range(2):
        model.reset_memory()
        alone, _ = model(idx[row:row + 1])
        torch.testing.assert_close(both[row:row + 1], alone, atol=1e-5, rtol=0)
    model.reset_memory(torch.tensor([False, True]))  # row 1 forgets, row 0 keeps its memory
    state = model.get_memory_state()
    assert state["blocks.0.attn.M"][1].abs().max() == 0 and state["blocks.0.attn.M"][0].abs().max() > 0


def test_gradient_reaches_the_write_projections_through_the_memory_across_segments():
    """The origin project detached the memory right after each write, so the layers writing it never learned."""
    torch.manual_seed(0)
    layer = InfiniAttention(16, 2, 8, segments=2)
    first = torch.randn(1, 8, 16, requires_grad=True)
    layer(first)  # segment 1 writes
    layer(torch.randn(1, 8, 16)).square().sum().backward()  # segment 2's loss reads it
    assert first.grad.abs().max() > 0  # reached segment 1's input only through the memory
    kv_rows = slice(16, 48)  # the key and value rows of the fused projection
    with_memory = layer.qkv.weight.grad[kv_rows].clone()
    layer.reset_memory()
    layer.qkv.weight.grad = None
    layer(first.detach())
    layer.load_memory_state(layer.memory_state())  # the same memory, cut from segment 1's graph
    layer(torch.randn(1, 8, 16)).square().sum().backward()
    assert (with_memory - layer.qkv.weight.grad[kv_rows]).abs().max() > 1e-6


@pytest.mark.parametrize("segments, reaches", [(1, False), (2, True)])
def test_memory_segments_sets_how_far_back_the_gradient_flows(segments, reaches):
    torch.manual_seed(0)
    layer = InfiniAttention(16, 2, 8, segments=segments)
    xs = [torch.randn(1, 8, 16, requires_grad=True) for _ in range(3)]
    outs = [layer(x) for x in xs]
    outs[1].sum().backward(retain_graph=True)
    assert (xs[0].grad is not None and xs[0].grad.abs().max() > 0) == reaches
    xs[0].grad = xs[1].grad = None
    outs[2].sum().backward()  # segment 3 starts a new span: segments 1 and 2 get nothing from it
    assert xs[0].grad is None and xs[1].grad is None


def test_state_bytes_do_not_grow_with_the_tokens_read():
    torch.manual_seed(0)
    model = Transformer(tiny(memory_banks=2)).eval()
    sizes = []
    for n in (8, 80, 800):
        model.reset_memory()
        with torch.no_grad():
            model(torch.randint(23, (1, n)))
        sizes.append({k: tuple(t.shape) for k, t in model.get_memory_state().items()})
    assert sizes[0] == sizes[1] == sizes[2]
    assert sizes[0]["blocks.0.attn.M"] == (1, 2, 2, 8, 8)  # (B, G, N, D, D)


@pytest.mark.parametrize("layers", [",".join(p) for p in itertools.product(TESTED_KINDS, repeat=2)])
def test_every_kind_in_every_position_trains_and_generates(layers):
    torch.manual_seed(0)
    model = Transformer(tiny(layers=layers))
    x = torch.randint(23, (4, 16))  # two segments per row
    cfg = TrainConfig(steps=40, batch_size=4, lr=1e-2, warmup_steps=0, eval_interval=40, eval_iters=1)
    before = model(x, torch.roll(x, -1, 1))[1].item()
    train_loop(model, make_optimizer(model, cfg), cfg, lambda: (x, torch.roll(x, -1, 1)),
               [(x, torch.roll(x, -1, 1))])
    model.reset_memory()
    assert model(x, torch.roll(x, -1, 1))[1].item() < before - 1.0
    model.reset_memory()
    out = generate(model.eval(), x[:1, :3], 20, temperature=0)
    assert out.shape == (1, 23)


@pytest.mark.parametrize("layers", ["infini,attn", "attn,infini"])
def test_kv_cache_and_memory_in_generation_equal_recomputation(layers):
    torch.manual_seed(0)
    model = Transformer(tiny(layers=layers, n_kv_head=1, memory_banks=2)).eval()
    prompt = torch.randint(23, (2, 11))  # more than a segment: its first 8 go to the memory before generating
    cached = generate(model, prompt, 30, temperature=0, kv_cache=True)
    recomputed = generate(model, prompt, 30, temperature=0, kv_cache=False)
    assert torch.equal(cached, recomputed)
    assert model.get_memory_state() == {}  # generating leaves the memory as it found it: the next text is unrelated
    model.reset_memory()
    whole, _ = model(cached)  # one pass, segment by segment
    model.reset_memory()
    steps, cache = [], None
    for t in range(cached.shape[1]):  # one token at a time; a fresh KV cache at each segment's start
        if t % 8 == 0:
            cache = model.new_kv_cache(2)
        steps.append(model(cached[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=0)


def test_memory_moved_to_a_fresh_model_continues_the_document():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    doc = torch.randint(23, (1, 48))
    whole, _ = model(doc)
    model.reset_memory()
    model(doc[:, :24])
    state = {k: v.clone() for k, v in model.get_memory_state().items()}
    torch.manual_seed(1)
    fresh = Transformer(tiny()).eval()
    fresh.load_state_dict(model.state_dict())
    fresh.set_memory_state(state)
    second, _ = fresh(doc[:, 24:])
    torch.testing.assert_close(second, whole[:, 24:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="matches no stateful layer"):
        Transformer(tiny(layers="attn,infini")).set_memory_state(state)


def make_run(tmp_path, text, preset_args=()):
    from train import run
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    run(["--data", str(path), "--preset", "infini", "--block-size", "8", "--n-layer", "2", "--n-embd", "16",
         "--n-head", "2", "--layers", "infini,attn", "--steps", "4", "--batch-size", "2", "--eval-interval", "4",
         "--eval-iters", "1", "--out", str(tmp_path / "run"), *preset_args])
    return tmp_path / "run"


def test_sample_saves_a_memory_that_another_process_continues_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the token cache goes under out/
    from checkpoint import load_run
    text = "".join(chr(ord("a") + (i * 7) % 13) for i in range(4000))
    run_dir = make_run(tmp_path, text)
    first, second = text[:64], text[64:128]  # 64 characters = 8 whole segments
    (tmp_path / "first.txt").write_text(first, encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "sample.py"), "--run", str(run_dir), "--prompt-file",
                    str(tmp_path / "first.txt"), "--max-new-tokens", "0", "--memory-out", str(tmp_path / "m.st")],
                   check=True, capture_output=True, cwd=tmp_path)
    model, tok, _ = load_run(run_dir)
    model.set_memory_state(load_file(tmp_path / "m.st"))
    continued, _ = model(torch.tensor([tok.encode(second)]))
    model.reset_memory()
    whole, _ = model(torch.tensor([tok.encode(first + second)]))
    torch.testing.assert_close(continued, whole[:, 64:], atol=1e-5, rtol=0)
    save_file({"blocks.0.attn.M": torch.zeros(1, 2, 1, 4, 4)}, tmp_path / "other.st")  # another model's shape
    for bad in ("missing.st", "other.st"):
        with pytest.raises(SystemExit) as exit_info:
            sample.main(["--run", str(run_dir), "--memory-in", str(tmp_path / bad), "--max-new-tokens", "1"])
        assert exit_info.value.code == 2


def test_evaluate_carries_memory_within_a_document_and_resets_between(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from checkpoint import load_run
    from evaluate import evaluate_text
    text = "".join(chr(ord("a") + (i * 7) % 13) for i in range(4000)) + "\n\n"
    model, tok, _ = load_run(make_run(tmp_path, "\n" + text))  # the tokenizer knows the newline
    with torch.no_grad():  # four training steps leave the memory's part small: make it count
        model.blocks[0].attn.gate.fill_(3.0)
        model.blocks[0].attn.out_proj.weight.mul_(30.0)
    doc_a, doc_b = text[:40], text[500:540]
    carried = evaluate_text(model, tok, doc_a, 8)
    model.reset_memory()
    ids = torch.tensor([tok.encode(doc_a)])
    logits, _ = model(ids[:, :-1])  # one pass over the document, memory carried through its segments
    want = F.cross_entropy(logits[0], ids[0, 1:]).item()
    assert carried["loss"] == pytest.approx(want, abs=1e-5)
    assert evaluate_text(model, tok, doc_a, 8, reset_memory=True)["loss"] != pytest.approx(want, abs=1e-3)
    # a new document starts from a reset memory: what was read before it does not leak into its score
    both = evaluate_text(model, tok, doc_a + "\n\n" + doc_b, 8)
    first = evaluate_text(model, tok, doc_a + "\n\n" + doc_b[0], 8)  # document 1 scores doc_b's first character
    second = evaluate_text(model, tok, doc_b, 8)
    assert first["tokens"] + second["tokens"] == both["tokens"]
    assert both["loss"] * both["tokens"] == pytest.approx(
        first["loss"] * first["tokens"] + second["loss"] * second["tokens"], abs=1e-4)


def test_document_starts_and_batches():
    tok = CharTokenizer.train("ab\ncd")
    ids = np.array(tok.encode("ab\n\ncd\n\n\nefgh"))
    assert document_starts(ids, tok).tolist() == [0, 4, 8, 9]
    text = "\n\n".join("".join(chr(97 + (d + i) % 26) for i in range(10 * (d + 2))) for d in range(6))
    tok = CharTokenizer.train(text)
    ids = np.array(tok.encode(text))
    starts = document_starts(ids, tok)
    stream = document_batches(ids, starts, 8, 2, seed=3)
    batches = [next(stream) for _ in range(12)]
    for x, y, new_rows in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])
    for row in range(2):  # a row continues its document piece after piece until a new one starts
        for (x0, y0, _), (x1, _, new1) in zip(batches, batches[1:]):
            if not new1[row]:
                assert x1[row, 0].item() == y0[row, -1].item()
    again = document_batches(ids, starts, 8, 2, seed=3, start=5)  # batch i is a function of i: resume exactly
    for i in range(5, 12):
        assert all(torch.equal(a, b) for a, b in zip(next(again), batches[i]))
    with pytest.raises(ValueError, match="fewer than the 7 batch rows"):
        next(document_batches(ids, starts, 8, 7))


def test_ranks_read_disjoint_documents_that_cover_the_corpus():
    text = "\n\n".join(chr(97 + d) * (20 + 7 * d) for d in range(6))  # document d is one letter, repeated
    tok = CharTokenizer.train(text)
    ids = np.array(tok.encode(text))
    read = []
    for rank in range(2):
        stream = document_batches(ids, document_starts(ids, tok), 8, 1, seed=3, rank=rank, world=2)
        read.append({tok.decode(x[0].tolist()).strip("\n")[0] for x, _, _ in (next(stream) for _ in range(40))})
    assert not read[0] & read[1]  # no document is trained on twice per step
    assert read[0] | read[1] == set("abcdef")


def test_documents_training_resumes_exactly(tmp_path, monkeypatch, ctrl_c_at_batch):
    monkeypatch.chdir(tmp_path)
    import train
    from checkpoint import read_metrics
    text = "\n\n".join("".join(chr(97 + (d * 3 + i * 5) % 26) for i in range(300)) for d in range(12))
    path = tmp_path / "docs.txt"
    path.write_text(text, encoding="utf-8")
    flags = ["--data", str(path), "--preset", "infini", "--block-size", "8", "--n-layer", "2", "--n-embd", "16",
             "--n-head", "2", "--layers", "infini,attn", "--steps", "10", "--batch-size", "2", "--eval-interval",
             "5", "--eval-iters", "1", "--log-interval", "1", "--sampler", "documents"]
    train.run([*flags, "--out", str(tmp_path / "straight")])
    disarm = ctrl_c_at_batch(train, 7)
    with pytest.raises(KeyboardInterrupt):
        train.run([*flags, "--out", str(tmp_path / "cut")])
    disarm()
    train.run(["--resume", str(tmp_path / "cut")])
    straight = [r["train_loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "train_loss" in r]
    resumed = [r["train_loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "train_loss" in r]
    assert straight == resumed
    assert torch.equal(load_file(tmp_path / "straight" / "model.safetensors")["blocks.0.attn.gate"],
                       load_file(tmp_path / "cut" / "model.safetensors")["blocks.0.attn.gate"])


def test_config_checks_layers():
    with pytest.raises(ValueError, match="give one kind for every layer or 2"):
        ModelConfig(n_layer=2, layers="infini,attn,attn")
    with pytest.raises(ValueError, match="give one kind for every layer or 2"):
        ModelConfig(n_layer=2, layers="infini,lstm")
    assert ModelConfig(n_layer=2, layers="infini").layer_kinds == ("infini", "infini")
    assert ModelConfig(n_layer=2, layers="infini, attn").layer_kinds == ("infini", "attn")
    assert ModelConfig(n_layer=3).layer_kinds == ("attn",) * 3


def test_no_export_format_takes_a_layer_with_memory():
    import export
    with pytest.raises(ValueError, match="no export format has a layer with memory"):
        export.hf_kind(tiny())
    assert export.hf_kind(tiny(layers=None)) == "llama"
