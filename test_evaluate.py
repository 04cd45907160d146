import dataclasses
import json
import math

import pytest
import torch

import checkpoint
import evaluate
import train
from bigram_lm import BigramLM
from bpe_tokenizer import BPETokenizer
from char_tokenizer import CharTokenizer
from checkpoint import load_run
from evaluate import score, windows
from transformer import PRESETS, Transformer


@pytest.mark.parametrize("n, T, stride", [(10, 4, 4), (101, 8, 8), (101, 8, 3), (9, 8, 8), (50, 16, 1), (5, 16, 4)])
def test_windows_score_every_target_exactly_once(n, T, stride):
    scored = []
    for start, end, first_new in windows(n, T, stride):
        assert end - start == min(T, n - 1)
        scored += [t for t in range(start + 1, end + 1) if t > first_new]
    assert scored == list(range(1, n))


def test_score_equals_the_sum_of_per_token_losses():
    torch.manual_seed(0)
    model = BigramLM(7)
    ids = torch.randint(7, (200,), dtype=torch.int32)
    logp = torch.log_softmax(model.table.weight, dim=-1)
    by_hand = -sum(logp[a, b].item() for a, b in zip(ids[:-1].tolist(), ids[1:].tolist()))
    for stride in (None, 5):
        total, count = score(model, ids, block_size=16, stride=stride, batch_size=4)
        assert count == 199 and total == pytest.approx(by_hand, rel=1e-5)


def test_bits_per_char_of_a_uniform_model_over_two_character_tokens(tmp_path, monkeypatch):
    """Hand-computed: 50 tokens "ab" under a uniform model over 260 ids (256 bytes, 1 merge, 3 special). The
    first token is context, so 49
    targets of log2(260) bits each cover the other 98 characters: log2(260) / 2 bits per character."""
    monkeypatch.chdir(tmp_path)  # the token cache goes under out/
    tok = BPETokenizer.train("ab" * 50, vocab_size=260, verbose=False)
    assert tok.encode("ab" * 50) == [256] * 50
    model = BigramLM(260)
    with torch.no_grad():
        model.table.weight.zero_()
    result = evaluate.evaluate_text(model, tok, "ab" * 50, block_size=8)
    assert result["bits_per_char"] == pytest.approx(math.log2(260) / 2, rel=1e-6)


def test_sliding_window_is_no_worse_and_cli_prints_all_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = "".join(f"line {i % 17} of the song goes la la {i % 5}\n" for i in range(600))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    train.run(["--data", "t.txt", "--out", "run", "--block-size", "32", "--batch-size", "16", "--n-layer", "2",
               "--n-head", "2", "--n-embd", "32", "--steps", "150", "--lr", "3e-3", "--eval-interval", "150",
               "--eval-iters", "2"])
    model, tok, config = load_run("run")
    held = evaluate.split_of(config, "test")
    plain = evaluate.evaluate_text(model, tok, held, 32)
    sliding = evaluate.evaluate_text(model, tok, held, 32, stride=8)
    assert sliding["loss"] <= plain["loss"]
    assert plain["bits_per_char"] == pytest.approx(plain["loss"] / math.log(2))  # a char run: one token a char
    capsys.readouterr()
    evaluate.main(["run", "--split", "test"])
    out = capsys.readouterr().out
    assert all(word in out for word in ("loss", "perplexity", "bits/char"))
    assert (tmp_path / "run" / "samples.txt").read_text(encoding="utf-8").count("### prompt") == 3


def test_a_run_on_two_sources_is_scored_on_each(tmp_path, monkeypatch, capsys):
    """Hand-computed with a bigram table: after "a", a and b have probability 1/2 each; after "b", a has 3/4.
    The val parts are characters 180-189 of each source: "aaaaaaaaaa" scores 9 targets at ln 2 each
    (1 bit/char); "ababababab" scores 5 b's after a at ln 2 and 4 a's after b at ln(4/3). Overall, the
    two parts one after the other: 10 a's after a (one across the join), then the same 9 targets."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("a" * 200, encoding="utf-8")
    (tmp_path / "b.txt").write_text("ab" * 100, encoding="utf-8")
    train.run(["--model", "bigram", "--data", "a.txt", "b.txt", "--out", "run", "--block-size", "4",
               "--batch-size", "2", "--steps", "1", "--eval-iters", "1", "--eval-interval", "1"])
    model, tok, config = load_run("run")
    assert tok.encode("ab") == [0, 1]
    with torch.no_grad():
        model.table.weight.copy_(torch.tensor([[0.0, 0.0, -1e9], [math.log(3), 0.0, -1e9], [0.0, 0.0, 0.0]]))
    checkpoint.save_weights(model, tmp_path / "run" / "model.safetensors")
    assert evaluate.split_of(config, "heldout") == "a" * 10 + "ab" * 5 + "a" * 10 + "ab" * 5
    capsys.readouterr()
    result = evaluate.main(["run", "--split", "val", "--no-samples"])
    by_source = result["sources"]
    ln2, ln43 = math.log(2), math.log(4 / 3)
    assert by_source["a.txt"]["loss"] == pytest.approx(ln2, rel=1e-6)
    assert by_source["a.txt"]["bits_per_char"] == pytest.approx(1.0, rel=1e-6)
    assert by_source["b.txt"]["loss"] == pytest.approx((5 * ln2 + 4 * ln43) / 9, rel=1e-6)
    assert by_source["b.txt"]["bits_per_char"] == pytest.approx((5 * ln2 + 4 * ln43) / 9 / ln2, rel=1e-6)
    assert result["loss"] == pytest.approx((15 * ln2 + 4 * ln43) / 19, rel=1e-6)
    out = capsys.readouterr().out
    assert "a.txt: loss 0.6931, bits/char 1.0000" in out and "b.txt: loss" in out


class SeesTheNextToken(torch.nn.Module):
    """A deliberately leaking model: its output at t is a function of token t+1."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx, targets=None):
        return self.table(torch.roll(idx, -1, 1)), None


def tiny_run_config(model):
    return {"block_size": model.config.block_size, "model": checkpoint.model_config_dict(model), "tokenizer": "char"}


def write_metrics(run_dir, train_loss, val_loss):
    rows = [{"step": 10, "train_loss": train_loss}, {"step": 10, "val_loss": val_loss}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("preset", ["llama", "infini"])
def test_check_finds_no_fault_in_a_sound_model_and_flags_each_fault(tmp_path, monkeypatch, preset):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    text = "to be or not to be, that is the question.\n" * 20
    tok = CharTokenizer.train(text)
    cfg = dataclasses.replace(PRESETS[preset], vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_embd=32,
                              **({"layers": "infini,attn"} if preset == "infini" else {}))
    model = Transformer(cfg).eval()
    write_metrics(tmp_path, 1.20, 1.25)
    findings = evaluate.sanity_checks(model, tok, tiny_run_config(model), tmp_path, text)
    assert [ok for ok, _, _ in findings] == [True, True, True, True]
    leaky = evaluate.sanity_checks(SeesTheNextToken(tok.vocab_size), tok, tiny_run_config(model), tmp_path, text)
    assert leaky[0][0] is False and "causal leak" in leaky[0][1]

    def badly_initialised(model_config):  # outputs 100× too large: a fresh model is confidently wrong
        fresh = checkpoint.build_model(model_config)
        fresh.head.weight.data.mul_(100.0)
        return fresh
    monkeypatch.setattr(evaluate, "build_model", badly_initialised)
    assert evaluate.sanity_checks(model, tok, tiny_run_config(model), tmp_path, text)[1][0] is False
    write_metrics(tmp_path, 0.50, 1.50)  # overfitting, and a loss too good to be true at 1 char/token: 0.36 bits
    _, _, gap, bits = evaluate.sanity_checks(model, tok, tiny_run_config(model), tmp_path, text)
    assert gap[0] is False and "+1.0000" in gap[1]
    write_metrics(tmp_path, 0.20, 0.25)
    assert evaluate.sanity_checks(model, tok, tiny_run_config(model), tmp_path, text)[3][0] is False


def test_bits_per_char_by_hand():
    assert evaluate.bits_per_char(math.log(5), 1.0) == pytest.approx(math.log2(5))  # char model at perplexity 5
    assert evaluate.bits_per_char(math.log(5), 4.0) == pytest.approx(math.log2(5) / 4)  # 50k BPE: 0.58 bits/char
    assert evaluate.bits_per_char(math.log(5), 4.0) < 0.6 < evaluate.bits_per_char(math.log(5), 1.0)
