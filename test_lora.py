"""Tests for lora.py: the adapter against its formula and against peft itself, which must load our adapter files
onto our Hugging Face export and compute our logits, and whose own adapter files we must read back."""
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from char_tokenizer import CharTokenizer
from export import export_hf
from finetune import grow_vocab
from lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, add_lora, load_adapter, lora_modules, matches,
                  merge_lora, read_adapter, save_adapter, train_rows, trainable_parameters)
from test_export import TEXT, make_run
from transformer import PRESETS, Transformer


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def tiny(preset, **overrides):
    """A small model of `preset` whose every tensor matters (norms and biases moved off 1 and 0)."""
    cfg = dataclasses.replace(PRESETS[preset], **{**dict(vocab_size=50, block_size=16, n_layer=2, n_embd=32), **overrides})
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def randomise_adapters(model):
    """Give every lora_B (zero when fresh) and lora_A new random values, as training would."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.normal_(0, 0.2)
            m.lora_B.normal_(0, 0.2)
    return model


IDX = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("preset", ["gpt", "llama", "moe"])
def test_fresh_adapter_leaves_logits_unchanged(preset):
    model = tiny(preset)
    with torch.no_grad():
        before = model(IDX)[0]
        add_lora(model)
        assert torch.equal(model(IDX)[0], before)
    assert lora_modules(model)


def test_lora_linear_is_the_formula():
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, alpha=6, dropout=0.25).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5, 12)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    expected = x @ base.weight.T + base.bias + F.dropout(x, 0.25) @ layer.lora_A.T @ layer.lora_B.T * (6 / 3)
    torch.testing.assert_close(y, expected)
    assert layer.lora_A.abs().max() <= 12 ** -0.5  # Kaiming-uniform with a=√5: U(−1/√C_in, 1/√C_in)
    assert not base.weight.requires_grad and not base.bias.requires_grad


@pytest.mark.parametrize("preset", ["gpt", "llama", "moe"])
def test_merged_logits_equal_unmerged(preset):
    model = randomise_adapters(add_lora(tiny(preset, bias=True, n_kv_head=2 if preset != "gpt" else None)))
    qkv = model.blocks[1].attn.qkv
    expected_weight = qkv.base.weight + qkv.lora_B @ qkv.lora_A * qkv.scaling
    with torch.no_grad():
        unmerged = model(IDX)[0]
        merge_lora(model)
        merged = model(IDX)[0]
    assert not lora_modules(model) and type(model.blocks[1].attn.qkv) is nn.Linear
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, expected_weight)
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (unmerged - tiny(preset, bias=True, n_kv_head=2 if preset != "gpt" else None)(IDX)[0]).abs().max() > 0.1


def test_only_adapter_parameters_receive_gradients():
    model = add_lora(tiny("llama", n_kv_head=2, tie_weights=False), targets=("qkv", "out_proj", "head"))
    _, loss = model(IDX[:, :-1], IDX[:, 1:])
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    adapters = {name for name, _ in model.named_parameters() if name.endswith(("lora_A", "lora_B"))}
    assert with_grad == adapters
    assert len(adapters) == 2 * (2 * 3 + 1)  # A and B of qkv, attention out_proj, feed-forward out_proj; the head
    trainable, total = trainable_parameters(model)
    assert trainable == sum(model.get_parameter(n).numel() for n in adapters) and total == model.num_params()


def test_targets_by_last_names_or_glob():
    assert matches("blocks.1.attn.qkv", ["qkv"]) and matches("blocks.1.attn.out_proj", ["attn.out_proj"])
    assert not matches("blocks.1.ffn.out_proj", ["attn.out_proj"]) and not matches("blocks.1.attn.qkv", ["kv"])
    assert matches("blocks.0.ffn.up", ["blocks.0.*"]) and not matches("blocks.10.ffn.up", ["blocks.0.*"])
    model = add_lora(tiny("llama"), targets=("blocks.0.attn.*",))
    assert sorted(lora_modules(model)) == ["blocks.0.attn.out_proj", "blocks.0.attn.qkv"]


def test_matches_peft_lora_layer():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 9)

        def forward(self, x):
            return self.proj(x)

    net = Net()
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=10, target_modules=["proj"]))
    theirs.base_model.model.proj.base_layer.load_state_dict(net.proj.state_dict())
    ours = add_lora(net, rank=4, alpha=10, targets="proj")
    randomise_adapters(ours)
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.proj.lora_A)
        layer.lora_B["default"].weight.copy_(ours.proj.lora_B)
    x = torch.randn(3, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    assert (ours(x) - net.proj.base(x)).abs().max() > 0.1


PEFT_CASES = {  # name: (preset, overrides, targets)
    "llama-gqa": ("llama", dict(n_kv_head=2), ("qkv", "out_proj")),
    "llama-learnable-scale-bias-untied": ("llama", dict(n_kv_head=2, attn_scale="learnable", bias=True,
                                                        tie_weights=False), ("qkv", "out_proj", "gate", "up", "head")),
    "gpt": ("gpt", dict(bias=True), ("qkv", "out_proj", "fc")),
    "moe-first-attention": ("moe", dict(), ("blocks.0.attn.*",)),
}


def run_and_export(tmp_path, case):
    """(a run of PEFT_CASES[case]'s model, its Hugging Face export's directory)."""
    preset, overrides, _ = PEFT_CASES[case]
    model = make_run(tmp_path / "run", CharTokenizer.train(TEXT), preset, **overrides)
    return model, export_hf(tmp_path / "run", tmp_path / "hf")


def peft_on_export(tmp_path, case):
    """(the run's model with random adapters, saved in tmp_path/adapter; the HF export of the run without them)."""
    model, hf_dir = run_and_export(tmp_path, case)
    randomise_adapters(add_lora(model, rank=4, alpha=8, targets=PEFT_CASES[case][2]))
    save_adapter(model, tmp_path / "adapter")
    return model, hf_dir


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_loads_our_adapter_onto_our_export(tmp_path, case):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model, hf_dir = peft_on_export(tmp_path, case)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = torch.randint(model.config.vocab_size, (2, 32))
    with torch.no_grad():
        ours, base = model(idx)[0], transformers.AutoModelForCausalLM.from_pretrained(hf_dir)(idx).logits
        assert (theirs(idx).logits - ours).abs().max() <= 1e-4
        assert (ours - base).abs().max() > 0.1  # the adapters matter, so a lost one would show
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if case == "llama-gqa":
        assert config["target_modules"] == ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]  # "out_proj": both
        _, tensors = read_adapter(tmp_path / "adapter")
        H, G, D, C = 4, 2, 16, 64
        assert {n: tuple(t.shape) for n, t in tensors.items() if ".layers.0.self_attn." in n} == {
            **{f"model.layers.0.self_attn.{p}.lora_A.weight": (4, C) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "model.layers.0.self_attn.q_proj.lora_B.weight": (H * D, 4), "model.layers.0.self_attn.o_proj.lora_B.weight":
            (C, 4), **{f"model.layers.0.self_attn.{p}.lora_B.weight": (G * D, 4) for p in ("k_proj", "v_proj")}}
    if case == "moe-first-attention":  # layer 1 has no adapter, so the short names would pick too much
        assert config["target_modules"] == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
                                            "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_we_load_an_adapter_peft_saved(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, hf_dir = run_and_export(tmp_path, "llama-learnable-scale-bias-untied")
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf_dir),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "down_proj"]))
    with torch.no_grad():
        for name, m in theirs.named_modules():
            if hasattr(m, "lora_A"):  # peft's LoRA layers: B random, q/k/v sharing q_proj's A as our fused qkv does
                m.lora_B["default"].weight.normal_(0, 0.2)
                if name.endswith(("k_proj", "v_proj")):
                    q = theirs.get_submodule(name.rpartition(".")[0] + ".q_proj")
                    m.lora_A["default"].weight.copy_(q.lora_A["default"].weight)
    theirs.save_pretrained(tmp_path / "theirs")
    load_adapter(base, tmp_path / "theirs")
    assert sorted(lora_modules(base)) == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "ffn.out_proj")]
    idx = torch.randint(base.config.vocab_size, (2, 32))
    with torch.no_grad():
        assert (theirs.eval()(idx).logits - base(idx)[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["gpt", "llama-learnable-scale-bias-untied"])
def test_peft_puts_our_trained_token_rows_on_the_grown_export(tmp_path, case):
    """A chat run's adapter: the base grows by new tokens, and beside the adapters some rows train, old and new.
    peft must compute our logits on the base's export grown alike; we must read back ours and peft's own files."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, hf_dir = run_and_export(tmp_path, case)
    V = base.config.vocab_size
    model = randomise_adapters(add_lora(grow_vocab(base, V + 2).eval(), rank=4, alpha=8))
    rows = torch.tensor([V + 1, 3, V, 0])
    assert train_rows(model, rows) == 4 * model.config.n_embd
    untied = model.head.weight is not model.embed.tok.weight
    with torch.no_grad():  # as training would leave them; an untied head's rows ride along as they are
        for weight in (model.embed.tok.weight, model.head.weight)[:1 + untied]:
            weight[rows] = torch.randn(len(rows), weight.shape[1])
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    ids = [0, 3, V, V + 1]
    assert config["trainable_token_indices"] == ({"embed_tokens": ids, "lm_head": ids} if untied else ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    hf.resize_token_embeddings(V + 2)  # what a user does for the chat tokens, before peft puts the adapter on
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = torch.tensor([[V, V + 1, 0, 3, 5, 7, V, 2, 1, 4]])
    with torch.no_grad():
        ours = model(idx)[0]
        assert (theirs(idx).logits - ours).abs().max() <= 1e-4
        assert (ours - grow_vocab(base, V + 2).eval()(idx)[0]).abs().max() > 0.1
        theirs.save_pretrained(tmp_path / "theirs")
        for adapter in ("adapter", "theirs"):
            again = load_adapter(grow_vocab(base, V + 2).eval(), tmp_path / adapter)
            assert (again(idx)[0] - ours).abs().max() <= 1e-5, adapter
            assert again.embed.tok.weight.requires_grad and torch.equal(again.embed.tok.trained_rows, torch.tensor(ids))
    with pytest.raises(ValueError, match=f"up to token {V + 1}"):
        load_adapter(base, tmp_path / "adapter")  # not grown: the new tokens' rows have nowhere to go
    if untied:  # rows of the head in the file that trainable_token_indices does not name: refused, not dropped
        (tmp_path / "adapter" / ADAPTER_CONFIG).write_text(json.dumps({**config, "trainable_token_indices": ids}),
                                                          encoding="utf-8")
        with pytest.raises(ValueError, match="lm_head.token_adapter"):
            load_adapter(grow_vocab(base, V + 2), tmp_path / "adapter")


def test_save_load_round_trip(tmp_path):
    model = randomise_adapters(add_lora(tiny("llama", n_kv_head=2, attn_scale="learnable"), rank=3, alpha=5,
                                        dropout=0.1, targets=("qkv", "ffn.gate")))
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    torch.manual_seed(0)
    again = load_adapter(tiny("llama", n_kv_head=2, attn_scale="learnable"), tmp_path / "a")
    assert {n: (m.rank, m.alpha, m.dropout.p) for n, m in lora_modules(again).items()} == {
        n: (3, 5, 0.1) for n in lora_modules(model)}
    for (name, p), (name2, q) in zip(model.named_parameters(), again.named_parameters()):
        assert name == name2 and p.requires_grad == q.requires_grad
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(again(IDX)[0], model(IDX)[0], rtol=0, atol=1e-5)


def test_bad_input(tmp_path):
    for rank in (0, -2, 1.5):
        with pytest.raises(ValueError, match="rank"):
            add_lora(tiny("llama"), rank=rank)
    with pytest.raises(ValueError, match=r"this model's are: blocks\.\*\.attn\.out_proj, blocks\.\*\.attn\.qkv"):
        add_lora(tiny("llama"), targets=("q_proj",))
    with pytest.raises(ValueError, match="head shares its weight"):
        add_lora(tiny("llama"), targets=("head",))
    model = add_lora(tiny("moe"))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.experts\.0\.out_proj has no Hugging Face module"):
        save_adapter(model, tmp_path / "moe")
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_adapter(tiny("llama"), tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        load_adapter(tiny("llama"), tmp_path / "missing")
    save_adapter(add_lora(tiny("llama")), tmp_path / "a")
    with pytest.raises(ValueError, match="needs"):
        load_adapter(tiny("llama", n_embd=64), tmp_path / "a")
    with pytest.raises(ValueError, match="holds adapters this model has no layer for"):
        load_adapter(tiny("llama", n_layer=1), tmp_path / "a")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}), encoding="utf-8")
    with pytest.raises(ValueError, match="no plain LoRA adapter of one rank and alpha .peft_type 'LORA', use_dora"):
        load_adapter(tiny("llama"), tmp_path / "a")
