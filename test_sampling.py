"""Sampling: each rule against a hand-worked case, the generation loop against recomputation."""
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
from bigram_lm import BigramLM
from bpe_tokenizer import BPETokenizer, StreamDecoder
from char_tokenizer import CharTokenizer
from checkpoint import WEIGHTS, model_config_dict, save_run_files, save_weights
from sample import (apply_repetition_penalty, apply_top_k, apply_top_p, check_sampling_args, generate, next_token,
                    stream_generate, stream_text)
from transformer import PRESETS, Transformer

NEG = float("-inf")


def kept(logits):
    """Indices that survived a rule (finite logits) of a 1-row result."""
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def log_probs(*probs):
    return torch.tensor([probs]).log()  # (1, V)


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.5]])
    assert kept(apply_top_k(logits, 2)) == [1, 4]
    assert apply_top_k(logits, 2)[0, 1] == 3.0  # survivors keep their value
    assert kept(apply_top_k(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 2)) == [1, 2]
    assert kept(apply_top_k(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 1)) == [1, 2]  # a tie for first: both stay
    for k in (None, 0, 5, 99):  # off, or larger than the vocabulary: nothing removed
        assert torch.equal(apply_top_k(logits, k), logits)


def test_top_p_keeps_the_token_that_crosses_p():
    logits = log_probs(0.2, 0.5, 0.3)  # sorted: 0.5 (id 1), 0.3 (id 2), 0.2 (id 0)
    assert kept(apply_top_p(logits, 0.45)) == [1]  # 0.5 alone reaches 0.45
    assert kept(apply_top_p(logits, 0.55)) == [1, 2]  # 0.5 falls short, 0.5 + 0.3 crosses
    assert kept(apply_top_p(logits, 0.85)) == [0, 1, 2]
    assert kept(apply_top_p(logits, 1e-6)) == [1]  # at least one token always survives
    assert torch.equal(apply_top_p(logits, 1.0), logits)


def test_top_p_keeps_ties_with_the_last_kept_token():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])  # probabilities 0.534, 0.197, 0.197, 0.072
    assert kept(apply_top_p(logits, 0.5)) == [0]
    assert kept(apply_top_p(logits, 0.6)) == [0, 1, 2]  # id 1 crosses 0.6, id 2 ties with it
    rows = torch.stack([log_probs(0.2, 0.5, 0.3)[0], log_probs(0.7, 0.2, 0.1)[0]])
    out = apply_top_p(rows, 0.6)  # each row has its own nucleus
    assert torch.isfinite(out).tolist() == [[False, True, True], [True, False, False]]


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    context = torch.tensor([[0, 1, 0]])  # id 0 seen twice: penalised once
    out = apply_repetition_penalty(logits, context, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # positive ÷ 2, negative × 2, unseen untouched
    before, after = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert after[0] < before[0] and after[1] < before[1]  # seen tokens: less likely
    assert after[2] > before[2] and after[3] > before[3]  # unseen tokens: never less likely
    assert torch.equal(apply_repetition_penalty(logits, context, 1.0), logits)
    assert apply_repetition_penalty(logits, context, 2.0, exempt=torch.tensor([1])).tolist() == [[1.0, -1.0, 0.5, 3.0]]


def test_the_penalty_never_keeps_a_reply_from_its_stop_id():
    model = BigramLM(4)
    with torch.no_grad():
        model.table.weight.copy_(torch.tensor([[0.0, 1.5, 0.0, 2.0]]).expand(4, 4))  # after any token: 3, then 1
    prompt = torch.tensor([[3, 0]])  # the stop id ended an earlier turn of the prompt
    assert generate(model, prompt, 1, temperature=0, repetition_penalty=2.0)[0, 2:].tolist() == [1]  # 2.0 ÷ 2 < 1.5
    assert generate(model, prompt, 2, temperature=0, repetition_penalty=2.0, stop_ids=[3])[0, 2:].tolist() == [3]
    assert list(stream_generate(model, prompt, 2, temperature=0, repetition_penalty=2.0, stop_ids=[3])) == [3]


def test_a_penalty_on_the_reply_alone_lets_it_repeat_the_prompt_but_not_itself():
    model = BigramLM(4)
    with torch.no_grad():
        model.table.weight.copy_(torch.tensor([[0.0, 2.0, 1.5, 0.0]]).expand(4, 4))  # after any token: 1, then 2
    prompt = torch.tensor([[1, 0]])  # a name the conversation holds: id 1
    assert generate(model, prompt, 1, temperature=0, repetition_penalty=2.0)[0, 2:].tolist() == [2]  # 2.0 ÷ 2
    reply = generate(model, prompt, 2, temperature=0, repetition_penalty=2.0, penalize_prompt=False)[0, 2:]
    assert reply.tolist() == [1, 2]  # the prompt's 1 is not counted; the reply's own 1 is: 1.0 < 1.5
    streamed = stream_generate(model, prompt, 2, temperature=0, repetition_penalty=2.0, penalize_prompt=False)
    assert list(streamed) == [1, 2]


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(8, 30)
    context = torch.zeros(8, 0, dtype=torch.long)
    greedy = next_token(logits, context, temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(next_token(logits, context, temperature=1.5, top_k=1, generator=gen), greedy)


def test_sampling_follows_softmax_of_logits_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40_000, 4)
    context = torch.zeros(40_000, 0, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    ids = next_token(logits, context, temperature=2.0, top_k=3, generator=gen)
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    want = torch.tensor([math.exp(1.0), math.exp(0.5), 1.0, 0.0])  # exp(logit / 2), the last cut by top-k
    assert torch.allclose(freq, want / want.sum(), atol=0.01)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(repetition_penalty=0.0)])
def test_invalid_settings_raise(bad):
    with pytest.raises(ValueError):
        check_sampling_args(**bad)


def tiny_model(kind, vocab=48, block_size=16):
    """A preset (gpt, llama or moe) shrunk to 2 layers of 32 channels, with random weights."""
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS[kind], vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2,
                                 n_kv_head=None if kind == "gpt" else 1, n_embd=32, ffn_hidden=None,
                                 tie_weights=False)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10)  # spread the logits (std ~1.2), so no two are near-tied for greedy
    return model.eval()


def test_window_start_jumps_by_a_quarter_window_plus_one():
    starts = [sample.window_start(n, 16) for n in (1, 16, 17, 21, 22, 26, 27)]
    assert starts == [0, 0, 5, 5, 10, 10, 15]  # jumps of 16 // 4 + 1 = 5 once the window is full
    for n in range(17, 200):  # past the window, a token reads ¾ to all of it
        assert 12 <= n - sample.window_start(n, 16) <= 16
    assert [sample.window_start(n, 1) for n in (1, 2, 3)] == [0, 1, 2]  # a bigram reads the last token


def greedy_run(model, prompt, new_tokens, kv_cache):
    """Greedy tokens (1, T + new) and the logits (new, V) each step's choice was made from."""
    steps, choose = [], sample.next_token

    def recording(logits, *args, **kwargs):
        steps.append(logits)
        return choose(logits, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample, "next_token", recording)
        out = generate(model, prompt, new_tokens, temperature=0, kv_cache=kv_cache)
    return out, torch.cat(steps)


@pytest.mark.parametrize("kind", ["gpt", "llama", "moe"])
@pytest.mark.parametrize("prompt_len", [5, 40])  # a prompt inside the window, and one 2.5 windows long
def test_kv_cache_matches_recomputation_far_past_the_window(kind, prompt_len):
    model, new = tiny_model(kind), 3 * 16
    prompt = torch.randint(48, (1, prompt_len), generator=torch.Generator().manual_seed(2))
    cached, cached_logits = greedy_run(model, prompt, new, True)
    plain, plain_logits = greedy_run(model, prompt, new, False)
    assert torch.equal(cached, plain) and cached.shape == (1, prompt_len + new)
    assert (cached_logits - plain_logits).abs().max() < 1e-4
    top2 = cached_logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # no near-tie: greedy is decided by the logits, not by noise
    assert len(set(cached[0, prompt_len:].tolist())) > 5  # a real continuation, not one repeated id
    with torch.no_grad():  # each step read exactly the window window_start names, computed afresh
        for step in range(new):
            n = prompt_len + step
            want = model(cached[:, sample.window_start(n, 16):n])[0][0, -1]
            assert torch.allclose(cached_logits[step], want, atol=1e-4)


def test_sampling_is_seeded_and_the_same_with_or_without_the_cache():
    model = tiny_model("llama")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    long = generate(model, prompt, 45, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert long.shape == (1, 50) and torch.equal(long[:, :5], prompt)
    assert 0 <= long.min() and long.max() < 48
    again = generate(model, prompt, 45, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(long, again)  # a fixed seed gives identical output
    plain = generate(model, prompt, 45, temperature=0.8, generator=torch.Generator().manual_seed(1), kv_cache=False)
    assert torch.equal(long, plain)


def test_a_batch_equals_its_rows_alone_and_stops_per_row():
    model = tiny_model("llama")
    prompts = torch.tensor([[3, 1, 4, 1], [2, 7, 1, 8]])
    both = generate(model, prompts, 8, temperature=0)
    for row in range(2):
        assert torch.equal(both[row:row + 1], generate(model, prompts[row:row + 1], 8, temperature=0))
    stop = int(both[0, 6])  # row 0's third new token
    stopped = generate(model, prompts[:1], 8, temperature=0, stop_ids=[stop])
    first = both[0, 4:].tolist().index(stop)
    assert stopped[0].tolist() == both[0, :5 + first].tolist()  # ends with the stop id itself


def test_stream_generate_yields_the_ids_of_generate():
    model = tiny_model("gpt")
    prompt = torch.tensor([[3, 1, 4]])
    ids = list(stream_generate(model, prompt, 30, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(5)))
    full = generate(model, prompt, 30, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert ids == full[0, 3:].tolist()


def test_streamed_text_equals_the_full_decode_for_japanese():
    tok = BPETokenizer.train("吾輩は猫である。名前はまだ無い。" * 4, vocab_size=256 + 3 + 10, verbose=False)
    ids = tok.encode("猫である。名前")
    decoder = StreamDecoder(tok)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "猫である。名前"
    model = tiny_model("llama", vocab=tok.vocab_size)
    pieces = list(stream_text(model, tok, "吾輩は", 40, generator=torch.Generator().manual_seed(0)))
    new = generate(model, torch.tensor([tok.encode("吾輩は")]), 40, stop_ids=[tok.eos_id],
                   generator=torch.Generator().manual_seed(0))[0, len(tok.encode("吾輩は")):].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    assert "".join(pieces) == tok.decode(new)


def scripted_bigram(tok, follows):
    """A bigram model that greedily follows `follows` ("a" -> "b" ...) with certainty."""
    model = BigramLM(tok.vocab_size)
    with torch.no_grad():
        model.table.weight.fill_(-10.0)
        for a, b in follows.items():
            model.table.weight[tok.encode(a)[0], tok.encode(b)[0]] = 10.0
    return model.eval()


def test_stop_text_is_never_printed_even_in_part():
    tok = CharTokenizer.train("ab\nc")
    model = scripted_bigram(tok, {"a": "\n", "\n": "b", "b": "\n"})  # "a" -> "\nb\nb\nb…": one newline at a time
    assert "".join(stream_text(model, tok, "a", 6, stop_text="\n\n", temperature=0)) == "\nb\nb\nb"
    model = scripted_bigram(tok, {"a": "b", "b": "\n", "\n": "\n"})  # "a" -> "b\n\n\n…"
    assert list(stream_text(model, tok, "a", 9, stop_text="\n\n", temperature=0)) == ["b", ""]
    assert sample.held_back("to be\n", "\n\n") == 1 and sample.held_back("to be", "\n\n") == 0


def finished(pieces):
    """All the pieces of a stream_text generator and what it returned: (text, (finish, n_tokens))."""
    text = []
    while True:
        try:
            text.append(next(pieces))
        except StopIteration as end:
            return "".join(text), end.value


def test_several_stop_texts_stop_ids_and_why_the_text_ended():
    tok = CharTokenizer.train("abcde")
    model = scripted_bigram(tok, {"a": "b", "b": "c", "c": "d", "d": "e", "e": "a"})  # "a" -> "bcdeabcde…"
    greedy = dict(temperature=0)
    assert finished(stream_text(model, tok, "a", 4, **greedy)) == ("bcde", ("length", 4))
    assert finished(stream_text(model, tok, "a", 9, stop_text=["ea", "cd"], **greedy)) == ("b", ("stop", 3))
    assert finished(stream_text(model, tok, "a", 9, stop_text=["dea", "e"], **greedy)) == ("bcd", ("stop", 4))
    stop_id = tok.encode("d")[0]
    assert finished(stream_text(model, tok, "a", 9, stop_ids=[stop_id], **greedy)) == ("bc", ("stop", 3))
    assert finished(stream_text(model, tok, tok.encode("ca"), 3, **greedy)) == ("bcd", ("length", 3))
    assert finished(stream_text(model, tok, "a", 3, stop_text="cd", **greedy)) == ("b", ("stop", 3))


def write_run(run_dir, model, tok):
    config = {"model": model_config_dict(model), "block_size": model.config.block_size, "tokenizer": "char",
              "tokenizer_file": "tokenizer.json"}
    save_run_files(run_dir, config, tok, "tokenizer.json")
    save_weights(model, run_dir / WEIGHTS)


def test_command_line_samples_stops_and_rejects_bad_values(tmp_path, capsys):
    tok = CharTokenizer.train("to be or not to be\n")
    write_run(tmp_path / "run", tiny_model("gpt", vocab=tok.vocab_size), tok)
    (tmp_path / "prompt.txt").write_text("to be", encoding="utf-8")
    common = ["--model-checkpoint", str(tmp_path / "run"), "--max-new-tokens", "20"]
    sample.main([*common, "--prompt-file", str(tmp_path / "prompt.txt"), "--num-samples", "2", "--seed", "3"])
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("to be") >= 2
    sample.main([*common, "--prompt-file", str(tmp_path / "prompt.txt"), "--num-samples", "2", "--seed", "3"])
    assert capsys.readouterr().out == out
    sample.main([*common, "--prompt", "to", "--stop", "e", "--temperature", "0"])
    assert "e" not in capsys.readouterr().out.removeprefix("to")
    for bad in (["--temperature", "-1"], ["--top-p", "1.5"], ["--top-k", "-2"], ["--repetition-penalty", "0"],
                ["--num-samples", "0"], ["--prompt", "x", "--prompt-file", str(tmp_path / "prompt.txt")]):
        with pytest.raises(SystemExit) as exit_info:
            sample.main([*common, *bad])
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_japanese_to_a_console_that_cannot_show_it_is_replaced_not_a_crash(tmp_path):
    """A Windows console in cp1252 has no kana: the command prints "?" for them and finishes."""
    tok = CharTokenizer.train("吾輩は猫である。名前はまだ無い。\n")
    write_run(tmp_path / "run", tiny_model("gpt", vocab=tok.vocab_size), tok)
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONUTF8": "0"}
    result = subprocess.run([sys.executable, str(Path(sample.__file__)), "--model-checkpoint", str(tmp_path / "run"),
                             "--prompt", "吾輩は猫", "--max-new-tokens", "20", "--seed", "1"], env=env, cwd=tmp_path,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    out = result.stdout.decode("cp1252")
    assert out.startswith("????") and len(out.strip()) == 4 + 20  # the prompt's 4 characters, then 20 new ones
