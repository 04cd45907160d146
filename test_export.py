"""Tests for export.py, checked by the real reader: transformers loads every exported directory
(AutoModelForCausalLM, AutoTokenizer, pipeline) and must compute our logits, ids and greedy text;
an import gives back a run that every loader here reads, with the same logits and ids."""
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bigram_lm import BigramLM
from bpe_tokenizer import BPETokenizer, SentencePieceTokenizer
from char_tokenizer import CharTokenizer
from chat_format import add_chat_tokens, chat_ids, encode_chat, render_chat
from checkpoint import WEIGHTS, load_run, model_config_dict, save_run_files, save_weights
from export import export_hf, hf_tokenizer, import_hf, main
from sample import generate
from sample import main as sample_main
from transformer import PRESETS, Transformer

transformers = pytest.importorskip("transformers")

ENGLISH = "The quick brown fox jumps over the lazy dog. It's 2024; isn't it?  Two spaces,\nthen a new line."
JAPANESE = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
EMOJI = "emoji 😀 👍🏽 🇯🇵 family 👨‍👩‍👧 ok"
TEXT = "\n".join(f"{ENGLISH} {JAPANESE} line {i}: the king and the queen sing {i * 7}." for i in range(40)) + EMOJI


@pytest.fixture(scope="module")
def tokenizers():
    return {"char": CharTokenizer.train(TEXT), "bpe": BPETokenizer.train(TEXT, 400, verbose=False),
            "spm": SentencePieceTokenizer.train(TEXT, 360)}


def make_run(path, tok, preset, train_steps=0, **overrides):
    """A run directory holding a small model of `preset`: random weights (norms and biases too), or trained briefly."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS[preset], vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_embd=64,
                              **overrides)
    model = Transformer(cfg)
    if train_steps:
        ids = torch.tensor(tok.encode(TEXT))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(train_steps):
            start = torch.randint(len(ids) - 33, (8,))
            batch = torch.stack([ids[s:s + 33] for s in start])  # 8 × (T + 1)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        with torch.no_grad():
            for p in model.parameters():  # norms start at 1 and biases at 0: make every tensor matter
                p.add_(torch.randn_like(p) * 0.05)
    kind = "spm" if isinstance(tok, SentencePieceTokenizer) else tok.kind
    file = "tokenizer.model" if kind == "spm" else "tokenizer.json"
    save_run_files(path, {"model": model_config_dict(model), "block_size": 32, "tokenizer": kind,
                          "tokenizer_file": file, "args": {}}, tok, file)
    save_weights(model, path / WEIGHTS)
    return model.eval()


def hf_logits(hf_dir, idx):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return hf, hf(idx).logits


CASES = {  # name: (preset, overrides, the class transformers must build)
    "gpt-biases": ("gpt", dict(bias=True), "GPT2LMHeadModel"),
    "gpt-untied": ("gpt", dict(tie_weights=False), "GPT2LMHeadModel"),
    "llama-gqa-linear": ("llama", dict(n_kv_head=2, rope_theta=500.0, rope_scaling="linear:2"), "LlamaForCausalLM"),
    "llama-ntk-scale-bias": ("llama", dict(rope_scaling="ntk:4", attn_scale="learnable", bias=True, tie_weights=False),
                             "LlamaForCausalLM"),
    "moe": ("moe", dict(), "MixtralForCausalLM"),
}


@pytest.mark.parametrize("case, trained", [(case, False) for case in CASES] +
                         [(case, True) for case in ("gpt-biases", "llama-gqa-linear", "moe")])  # one per architecture
def test_transformers_logits_match_ours(tmp_path, tokenizers, case, trained):
    preset, overrides, cls = CASES[case]
    tok = tokenizers["bpe"]
    model = make_run(tmp_path / "run", tok, preset, train_steps=30 if trained else 0, **overrides)
    export_hf(tmp_path / "run", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    idx = torch.tensor([tok.encode(TEXT)[:32], tok.encode(TEXT)[100:132]])
    hf, logits = hf_logits(tmp_path / "hf", idx)
    assert type(hf).__name__ == cls
    with torch.no_grad():
        assert (logits - model(idx)[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["char", "bpe", "spm"])
def test_transformers_tokenizer_gives_our_ids(tmp_path, tokenizers, kind):
    tok = tokenizers[kind]
    make_run(tmp_path / "run", tok, "llama")
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (ENGLISH, JAPANESE, EMOJI, "猫 and 犬 🐈\n\n  x", "spaced , as in ' s and do n't ."):
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text
        if kind != "char":  # a char vocabulary maps unseen characters to <unk>: HF prints its name, we print U+FFFD
            assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert hf_tok.decode(tok.encode(ENGLISH)) == ENGLISH
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf_tok.unk_token_id == tok.unk_id


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "猫 or dogs?"},
        {"role": "assistant", "content": "Cats, the king says."}, {"role": "user", "content": "Why?\n"}]


@pytest.mark.parametrize("kind", ["char", "bpe", "spm"])
def test_a_chat_run_exports_its_template_and_stops_at_the_end_of_a_turn(tmp_path, tokenizers, kind):
    tok = add_chat_tokens(tokenizers[kind])
    make_run(tmp_path / "run", tok, "llama")
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for prompt in (False, True):
        assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == \
            render_chat(CHAT, add_generation_prompt=prompt)
        ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=prompt, return_dict=True)["input_ids"]
        assert ids == encode_chat(tok, CHAT, add_generation_prompt=prompt)[0]
    end = chat_ids(tok)["<|end|>"]
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == [end]
    assert hf_tok.decode([end]) == "<|end|>"


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\u2581"), max_size=24)
       | st.text(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000'sllVE1234猫.,!?", max_size=16))
def test_tokenizer_json_gives_our_ids_on_any_text(tokenizers, text):
    """Property: any text, whitespace of every kind included. (Known exceptions: a special token's name, which
    transformers matches in text and we do not, and, for spm, a literal "▁" or "<0x41>", read as pieces.)"""
    for tok in tokenizers.values():
        hf = hf_tokenizer(tok)
        specials = [t.content for t in hf.get_added_tokens_decoder().values() if t.special]
        if any(name in text for name in specials) or tok.kind == "spm" and "<0x" in text:
            continue  # the known exceptions
        assert hf.encode(text).ids == tok.encode(text), (tok.kind, text)


@pytest.mark.parametrize("preset", ["gpt", "llama"])
def test_pipeline_greedy_text_equals_our_generate(tmp_path, tokenizers, preset):
    tok = tokenizers["bpe"]
    model = make_run(tmp_path / "run", tok, preset, train_steps=30)
    export_hf(tmp_path / "run", tmp_path / "hf")
    generator = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    prompt = "The king and"
    theirs = generator(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    ours = generate(model, torch.tensor([tok.encode(prompt)]), 20, temperature=0, stop_ids=[tok.eos_id])
    assert theirs == tok.decode(ours[0].tolist())
    assert len(theirs) > len(prompt) + 10


@pytest.mark.parametrize("preset, kind", [("gpt", "char"), ("llama", "bpe"), ("moe", "spm")])
def test_round_trip_gives_back_the_same_run(tmp_path, tokenizers, preset, kind):
    tok = tokenizers[kind]
    model = make_run(tmp_path / "run", tok, preset, attn_scale="learnable")
    export_hf(tmp_path / "run", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    back, back_tok, config = load_run(tmp_path / "back")
    assert config["tokenizer"] == "hf" and back.config.mlp == model.config.mlp
    idx = torch.tensor([tok.encode(TEXT)[:32]])
    with torch.no_grad():
        assert (back(idx)[0] - model(idx)[0]).abs().max() <= 1e-5
    for text in (ENGLISH, JAPANESE, EMOJI):
        assert back_tok.encode(text) == tok.encode(text)
        assert back_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (back_tok.bos_id, back_tok.eos_id, back_tok.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)


def test_imported_tokenizer_adds_the_bos_transformers_adds(tmp_path, tokenizers):
    """A Llama-style tokenizer.json whose post-processor prepends BOS: our encode gives the same ids, BOS first."""
    tok = tokenizers["bpe"]
    make_run(tmp_path / "run", tok, "llama")
    export_hf(tmp_path / "run", tmp_path / "hf")
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
                                                                      {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [tok.bos_id], "tokens": ["<|bos|>"]}}}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    import_hf(tmp_path / "hf", tmp_path / "back")
    _, ours, _ = load_run(tmp_path / "back")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (ENGLISH, JAPANESE, EMOJI):
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"] == [tok.bos_id] + tok.encode(text)
        assert ours.decode(ids) == text  # BOS prints nothing


def test_sample_reads_an_imported_run_as_the_original(tmp_path, tokenizers, capsys):
    make_run(tmp_path / "run", tokenizers["bpe"], "llama", train_steps=30)
    export_hf(tmp_path / "run", tmp_path / "hf")
    main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    capsys.readouterr()
    outputs = []
    for run in ("run", "back"):
        sample_main(["--run", str(tmp_path / run), "--prompt", "The 猫", "--temperature", "0", "--max-new-tokens", "30"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) > 20


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_import_of_a_model_transformers_built(tmp_path, tokenizers, arch):
    """The import alone, against a model transformers initialised and saved itself: GQA, attention biases,
    an untied head, weights in shards (Llama); biases and learned positions, stored as the original GPT-2
    checkpoint is, without the "transformer." prefix and with its causal-mask buffers (GPT-2)."""
    tok = tokenizers["bpe"]
    make_run(tmp_path / "run", tok, "llama")
    export_hf(tmp_path / "run", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.manual_seed(1)
    if arch == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=1e-5, attention_bias=True,
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000.0}))
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=tok.vocab_size, n_positions=32, n_embd=64, n_layer=2, n_head=4, activation_function="gelu"))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.eval().save_pretrained(tmp_path / "hf", max_shard_size="100KB" if arch == "llama" else "1GB")
    (tmp_path / "hf" / "tokenizer_config.json").unlink()  # special ids from config.json, GPT-2's 50256 included
    if arch == "gpt2":
        path = tmp_path / "hf" / "model.safetensors"
        tensors = {name.removeprefix("transformer."): t for name, t in load_file(path).items()}
        tensors |= {f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)}
        save_file(tensors, path, metadata={"format": "pt"})
    else:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "hf", tmp_path / "run2")
    ours, our_tok, _ = load_run(tmp_path / "run2")
    assert ours.config.bias and ours.config.kv_heads == (1 if arch == "llama" else 4)
    assert our_tok.eos_id == (2 if arch == "llama" else None)  # Llama's default eos 2; GPT-2's 50256 is no id here
    idx = torch.randint(tok.vocab_size, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max() <= 1e-4


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_refusals_write_nothing(tmp_path, tokenizers, capsys):
    tok = tokenizers["char"]
    out = tmp_path / "hf"
    assert "not a run directory" in run_main([tmp_path, "--format", "hf", "--out", out], capsys)
    make_run(tmp_path / "mixed", tok, "llama", norm="layernorm")
    assert "no Hugging Face architecture" in run_main([tmp_path / "mixed", "--format", "hf", "--out", out], capsys)
    make_run(tmp_path / "gqa", tok, "gpt", n_kv_head=2)
    assert "grouped-query" in run_main([tmp_path / "gqa", "--format", "hf", "--out", out], capsys)
    bigram = BigramLM(tok.vocab_size)
    save_run_files(tmp_path / "bigram", {"model": model_config_dict(bigram), "tokenizer_file": "tokenizer.json"},
                   tok, "tokenizer.json")
    save_weights(bigram, tmp_path / "bigram" / WEIGHTS)
    assert "bigram" in run_main([tmp_path / "bigram", "--format", "hf", "--out", out], capsys)
    assert not out.exists()
    make_run(tmp_path / "run", tok, "gpt")
    assert "not empty" in run_main([tmp_path / "run", "--format", "hf", "--out", tmp_path / "gqa"], capsys)
    assert "--format" in run_main(["--out", out], capsys)


def test_import_refuses_what_ours_cannot_represent(tmp_path, tokenizers, capsys):
    make_run(tmp_path / "run", tokenizers["bpe"], "gpt")
    export_hf(tmp_path / "run", tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    original = json.loads(config_path.read_text(encoding="utf-8"))
    for change, message in [({"architectures": ["BertForMaskedLM"]}, "BertForMaskedLM is not supported"),
                            ({"activation_function": "gelu_new"}, "'gelu_new'"),
                            ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon")]:
        config_path.write_text(json.dumps({**original, **change}), encoding="utf-8")
        assert message in run_main(["--from-hf", tmp_path / "hf", "--out", tmp_path / "back"], capsys)
    assert "no config.json" in run_main(["--from-hf", tmp_path / "run2", "--out", tmp_path / "back"], capsys)
    assert "names no architecture" in run_main(["--from-hf", tmp_path / "run", "--out", tmp_path / "back"], capsys)
    assert not (tmp_path / "back").exists()


def test_import_refuses_llama_settings_ours_lacks(tmp_path, tokenizers, capsys):
    make_run(tmp_path / "run", tokenizers["bpe"], "llama")
    export_hf(tmp_path / "run", tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    original = json.loads(config_path.read_text(encoding="utf-8"))
    for change, message in [({"rms_norm_eps": 1e-6}, "rms_norm_eps"),
                            ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
                            ({"hidden_act": "gelu"}, "hidden_act")]:
        config_path.write_text(json.dumps({**original, **change}), encoding="utf-8")
        assert message in run_main(["--from-hf", tmp_path / "hf", "--out", tmp_path / "back"], capsys)
