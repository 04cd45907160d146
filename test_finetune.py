"""Tests for finetune.py (stage 25): the masked loss, the grown vocabulary, full and LoRA runs end to end,
resume, the synthetic set, and bad input."""
import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bench_chat
import evaluate
import finetune
import sample
import train
from chat_format import add_chat_tokens, chat_ids
from checkpoint import load_run

ROOT = Path(__file__).resolve().parent
TEXT = ("Hi! Hello there, how are you today? I am fine, thank you. What is your name? My name is Sam. "
        "Name a pet. The cat sat on the mat. Be kind, you are kind.\n") * 30
CHATS = [  # the three shapes of DESIGN §9; each conversation fits in one window of 33 tokens (char tokenizer)
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there."}]},
    {"instruction": "Name a pet.", "input": "", "output": "The cat."},
    {"prompt": "How are you?", "completion": "I am fine."},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Name?"},
                  {"role": "assistant", "content": "Sam."}]},
]
TINY = ["--batch-size", "4", "--eval-iters", "1", "--log-interval", "1", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny gpt-preset run (char tokenizer, block 32) trained for two steps, and a chat file beside it."""
    root = tmp_path_factory.mktemp("finetune")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS * 10), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # train.py's token cache goes to ./out/cache
        train.run(["--data", "text.txt", "--out", "base", "--block-size", "32", "--n-layer", "1", "--n-head", "2",
                   "--n-embd", "16", "--steps", "2", "--eval-interval", "2", *TINY])
    return root / "base"


def finetune_run(base_run, out, *extra):
    return finetune.run([str(base_run), "--data", str(base_run.parent / "chats.jsonl"), "--out", str(out),
                         "--steps", "6", "--eval-interval", "3", "--lr", "3e-3", *TINY, *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_the_loss_is_the_cross_entropy_of_exactly_the_assistant_targets(base_run):
    model, tok, _ = finetune.load_base(base_run, "cpu")
    tok = add_chat_tokens(tok)
    model = finetune.grow_vocab(model, tok.vocab_size)
    chats, _ = finetune.load_chats({"data": [base_run.parent / "chats.jsonl"], "synthetic": 0, "max_chats": 4,
                                    "heldout": 0, "seed": 0})
    x, y = finetune.target_blocks(tok, chats, 32)
    _, loss = model(x, y)
    # By hand: the template's tokens one conversation after another, and which of them an assistant turn owns.
    ids_of, stream, owned = chat_ids(tok), [], []
    for messages in chats:
        for m in messages:
            content = tok.encode(m["content"])
            stream += [ids_of[f"<|{m['role']}|>"], *content, ids_of["<|end|>"]]
            owned += [False] + [m["role"] == "assistant"] * (len(content) + 1)
    n_blocks = (len(stream) - 1) // 32
    assert len(x) == n_blocks  # every block of these short chats holds a reply
    log_probs = model(x)[0].log_softmax(dim=-1)
    picked, expected_mask = [], torch.zeros(n_blocks, 32, dtype=torch.bool)
    for b in range(n_blocks):
        assert x[b].tolist() == stream[b * 32:b * 32 + 32]
        for t in range(32):
            if owned[b * 32 + t + 1]:
                picked.append(-log_probs[b, t, stream[b * 32 + t + 1]])
                expected_mask[b, t] = True
    assert torch.equal(y >= 0, expected_mask)  # no token of a user or system turn, no role token, is a target
    assert 0 < len(picked) < y.numel()
    torch.testing.assert_close(loss, torch.stack(picked).mean(), rtol=1e-6, atol=1e-6)


def test_growing_the_vocabulary_keeps_every_old_logit(base_run):
    model, tok, _ = finetune.load_base(base_run, "cpu")
    V = tok.vocab_size
    grown = finetune.grow_vocab(model, V + 4)
    idx = torch.randint(V, (3, 32), generator=torch.Generator().manual_seed(0))
    old, new = model(idx)[0], grown(idx)[0]
    assert new.shape == (3, 32, V + 4)
    torch.testing.assert_close(new[..., :V], old, rtol=0, atol=1e-6)
    # a new row is the mean of the old ones, so its logit (tied head) is the mean of the old logits
    torch.testing.assert_close(new[..., V:], old.mean(dim=-1, keepdim=True).expand(3, 32, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 4])
def test_a_finetune_writes_a_run_that_every_loader_accepts(base_run, tmp_path, monkeypatch, capsys, rank):
    monkeypatch.chdir(base_run.parent)
    out = tmp_path / "chat"
    finetune_run(base_run, out, "--lora-rank", str(rank))
    model, tok, config = load_run(out)
    assert chat_ids(tok) is not None and model.config.vocab_size == tok.vocab_size == config["model"]["vocab_size"]
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [3, 6]
    sample.main(["--model-checkpoint", str(out), "--prompt", "Hi", "--max-new-tokens", "5"])
    assert evaluate.main([str(out), "--no-samples"])["tokens"] > 0  # scored on the base's held-out text
    base, tuned = load_file(base_run / "model.safetensors"), load_file(out / "model.safetensors")
    V = base["embed.tok.weight"].shape[0]
    assert not torch.equal(tuned["embed.tok.weight"][V:], base["embed.tok.weight"].mean(0).expand(4, -1))
    if rank:  # the adapters merged into qkv and out_proj; every other base weight and old row untouched
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
        assert torch.equal(tuned["embed.tok.weight"][:V], base["embed.tok.weight"])
        assert torch.equal(tuned["blocks.0.ffn.fc.weight"], base["blocks.0.ffn.fc.weight"])
    else:
        assert not (out / "adapter").exists()
        assert not torch.equal(tuned["blocks.0.ffn.fc.weight"], base["blocks.0.ffn.fc.weight"])


def test_trained_rows_are_the_most_frequent_then_the_chat_tokens():
    assert finetune.trained_rows(torch.tensor([[5, 5, 2, 7, 2, 5]]), 8, 12, 2).tolist() == [5, 2, 8, 9, 10, 11]
    # counted by hand: 2 and 5 three times each (a tie: the lower id first), 1 and 7 once; 9 is a chat token
    x = torch.tensor([[5, 5, 2, 7, 2, 5], [1, 9, 9, 9, 9, 2]])
    assert finetune.trained_rows(x, 8, 12, 3).tolist() == [2, 5, 1, 8, 9, 10, 11]
    assert finetune.trained_rows(x, 8, 12, 0).tolist() == [8, 9, 10, 11]


def test_lora_rows_train_exactly_the_most_frequent_rows(base_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(base_run.parent)
    out = tmp_path / "chat"
    finetune_run(base_run, out, "--lora-rank", "4", "--lora-rows", "3")
    _, tok, _ = finetune.load_base(base_run, "cpu")
    chats, _ = finetune.load_chats({"data": [base_run.parent / "chats.jsonl"], "synthetic": 0, "max_chats": [0],
                                    "reply_lines": [0], "heldout": 0.05, "seed": 1337})
    x, _ = finetune.target_blocks(add_chat_tokens(tok), chats, 32)
    counts = collections.Counter(i for i in x.flatten().tolist() if i < tok.vocab_size)
    top3 = {i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]}
    base, tuned = load_file(base_run / "model.safetensors"), load_file(out / "model.safetensors")
    V, C = base["embed.tok.weight"].shape
    changed = {i for i in range(V) if not torch.equal(tuned["embed.tok.weight"][i], base["embed.tok.weight"][i])}
    assert changed == top3
    # qkv: A (4, C), B (3C, 4); attention's out_proj: A (4, C), B (C, 4); the feed-forward's: A (4, 4C), B (C, 4)
    adapters = 4 * (C + 3 * C) + 4 * (C + C) + 4 * (4 * C + C)
    assert f"LoRA rank 4: {adapters + (3 + 4) * C:,} of" in capsys.readouterr().out


@pytest.mark.parametrize("rank", [0, 4])
def test_resume_continues_exactly(base_run, tmp_path, monkeypatch, ctrl_c_at_batch, rank):
    """A fine-tuning interrupted at step 4 (Ctrl-C) and resumed matches an uninterrupted one."""
    monkeypatch.chdir(base_run.parent)
    finetune_run(base_run, tmp_path / "straight", "--lora-rank", str(rank), "--lora-dropout", "0.1")
    disarm = ctrl_c_at_batch(finetune, 5)
    with pytest.raises(KeyboardInterrupt):
        finetune_run(base_run, tmp_path / "resumed", "--lora-rank", str(rank), "--lora-dropout", "0.1")
    disarm()
    finetune.run(["--resume", str(tmp_path / "resumed")])
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a.get("train_loss") == b.get("train_loss") and a.get("val_loss") == b.get("val_loss"), (a, b)


def test_synthetic_probes_ask_seen_facts_in_phrasings_training_never_uses():
    train_chats = finetune.synthetic_chats(2000, seed=1)
    assert train_chats == finetune.synthetic_chats(2000, seed=1) != finetune.synthetic_chats(2000, seed=2)
    asked = {m["content"] for chat in train_chats for m in chat if m["role"] == "user"}
    answered = {m["content"] for chat in train_chats for m in chat if m["role"] == "assistant"}
    for lang in finetune.LANGS:
        probes = finetune.synthetic_probes(lang, n_names=20)
        assert len(probes["facts"]) == 2 * len(finetune.facts(lang)) and len(probes["names"]) == 20
        for chat in probes["facts"]:
            assert chat[0]["content"] not in asked and chat[-1]["content"] in answered
        for chat in probes["names"]:  # the name asked for is the one given in the first turn
            name = next(n for n in finetune.NAMES[lang] if n in chat[0]["content"])
            assert chat[-1]["content"] == finetune.NAME_TURNS[lang][3].format(n=name)


def test_max_chats_takes_one_count_per_file(tmp_path):
    files = []
    for name, n in (("a", 10), ("b", 12)):  # every conversation says which file and line it came from
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({"prompt": f"{name}{i}?", "completion": "Yes."}) + "\n"
                                     for i in range(n)), encoding="utf-8")
    args = {"data": files, "synthetic": 0, "heldout": 0.1, "seed": 3}
    train, held = finetune.load_chats({**args, "max_chats": [2, 5]})
    every, every_held = finetune.load_chats({**args, "max_chats": [0]})  # 9 of a, then 11 of b; 1 of each held out
    assert train == every[:2] + every[9:14] and [m[0]["content"][0] for m in train] == ["a"] * 2 + ["b"] * 5
    assert held == every_held  # the held-out part does not depend on the cut
    assert finetune.load_chats({**args, "max_chats": 4})[0] == finetune.load_chats({**args, "max_chats": [4, 4]})[0]


def test_reply_lines_cut_the_training_replies_of_their_file_only(tmp_path):
    files = []
    for name in ("a", "b"):  # replies of several messages, as a chat log joins them; one with a blank line
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"{name}{i}?\nAnyone?"},
            {"role": "assistant", "content": "Yes.\n\nNo.\nMaybe."},
            {"role": "user", "content": "Well?"}, {"role": "assistant", "content": f"{name}{i}"}]}) + "\n"
            for i in range(10)), encoding="utf-8")
    args = {"data": files, "synthetic": 0, "heldout": 0.2, "seed": 3, "max_chats": [0]}
    whole, whole_held = finetune.load_chats(args)
    cut, held = finetune.load_chats({**args, "reply_lines": [2, 0]})  # 8 of a, then 8 of b; 2 of each held out
    assert held == whole_held and all(m[1]["content"] == "Yes.\n\nNo.\nMaybe." for m in held)
    assert cut[8:] == whole[8:]  # b: 0 keeps every reply whole
    for short, long in zip(cut[:8], whole[:8]):
        assert [m["role"] for m in short] == [m["role"] for m in long]
        assert [short[0], short[2], short[3]] == [long[0], long[2], long[3]]  # user turns and one-line replies kept
        assert short[1]["content"] == "Yes.\nNo."  # the first two non-empty lines
    assert finetune.load_chats({**args, "reply_lines": [1]})[0][0][1]["content"] == "Yes."
    assert finetune.load_chats(args) == finetune.load_chats({**args, "reply_lines": [0]})  # older runs: whole


def test_the_reply_benchmark_draws_from_every_file_of_a_language():
    # the README's English held-out set: 201 chit-chat conversations, then 55 instructions (21.5 % of 256)
    picked = bench_chat.evenly_spaced(list(range(256)), 100)
    assert len(set(picked)) == 100 and picked[0] == 0 and picked[-1] == 253  # 99 * 256 // 100
    assert sum(i >= 201 for i in picked) == 21  # i * 256 >= 20,100 from i = 79 on
    assert bench_chat.evenly_spaced([1, 2], 100) == [1, 2]


def test_lora_takes_its_own_learning_rate_unless_one_is_typed(base_run, tmp_path):
    start = [str(base_run), "--data", str(base_run.parent / "chats.jsonl"), "--out", str(tmp_path / "chat")]
    full = finetune.resolve_args(start)
    lora = finetune.resolve_args(start + ["--lora-rank", "4"])
    typed = finetune.resolve_args(start + ["--lora-rank", "4", "--lr", "5e-3"])
    assert (full["lr"], full["min_lr"]) == (finetune.FINETUNE_DEFAULTS["lr"], finetune.FINETUNE_DEFAULTS["min_lr"])
    assert (lora["lr"], lora["min_lr"]) == (finetune.LORA_DEFAULTS["lr"], finetune.LORA_DEFAULTS["min_lr"])
    assert (typed["lr"], typed["min_lr"]) == (5e-3, finetune.LORA_DEFAULTS["min_lr"])
    assert finetune.LORA_DEFAULTS["lr"] != finetune.FINETUNE_DEFAULTS["lr"]


def bad_chat_file(root, name, line):
    path = root / name
    path.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps(line) + "\n", encoding="utf-8")
    return str(path)


def test_bad_input_exits_2_with_one_line(base_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train.run(["--model", "bigram", "--data", str(base_run.parent / "text.txt"), "--out", "bigram", "--block-size",
               "8", "--steps", "1", "--eval-iters", "1"])
    capsys.readouterr()
    good = str(base_run.parent / "chats.jsonl")
    base = [str(base_run), "--out", "chat", "--data"]
    cases = [
        (base + [bad_chat_file(tmp_path, "shape.jsonl", {"question": "Hi?"})], "shape.jsonl:2: keys ['question']"),
        (base + [bad_chat_file(tmp_path, "lone.jsonl", {"messages": [{"role": "user", "content": "Hi"}]})],
         "lone.jsonl:2: no assistant turn"),
        (base + [bad_chat_file(tmp_path, "order.jsonl", {"messages": [{"role": "assistant", "content": "Hi"},
                                                                        {"role": "user", "content": "Yo"}]})],
         "order.jsonl:2: turn 1 is 'assistant' where 'user' was expected"),
        (base + [good, "--lora-rank", "-1"], "--lora-rank must be 0"),
        (base + [good, "--lora-rows", "3"], "--lora-rows 3: give N >= 0 with a --lora-rank"),
        (base + [good, "--lora-rank", "4", "--lora-rows", "-1"], "--lora-rows -1: give N >= 0"),
        (base + [good, "--threads", "-2"], "--threads -2: give a number of threads"),
        (base + [good, "--max-chats", "1", "2"], "one count for every file or one per file: 2 counts for 1"),
        (base + [good, "--reply-lines", "1", "0"], "--reply-lines takes one count for every file or one per file"),
        (base + [good, "--reply-lines", "-1"], "--reply-lines >= 0, got 0.05, 0, [0], [-1]"),
        (base + [good, "--lora-rank", "4", "--lora-targets", "nothing"], "no Linear layer matches"),
        (["bigram", "--out", "chat", "--data", good], "bigram run"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            finetune.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, argv
    result = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "bigram", "--data", good],
                            capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
