import json
from dataclasses import asdict

import pytest
import safetensors.torch
import torch

import checkpoint as ckpt
from bigram_lm import BigramLM
from char_tokenizer import CharTokenizer
from transformer import PRESETS, ModelConfig, Transformer


def tiny_transformer(preset="gpt", vocab=13):
    cfg = ModelConfig(**{**asdict(PRESETS[preset]), "vocab_size": vocab, "block_size": 16, "n_layer": 2,
                         "n_embd": 32, "n_head": 4, "n_kv_head": None if preset == "gpt" else 2})
    return Transformer(cfg)


def make_run(tmp_path, model, tok):
    config = {"model": ckpt.model_config_dict(model), "tokenizer": "char", "tokenizer_file": "tokenizer.json"}
    ckpt.save_run_files(tmp_path, config, tok, "tokenizer.json")
    ckpt.save_weights(model, tmp_path / ckpt.WEIGHTS)
    return tmp_path


@pytest.mark.parametrize("kind", ["bigram", "gpt", "llama"])
def test_save_load_gives_identical_logits(tmp_path, kind):
    torch.manual_seed(0)
    tok = CharTokenizer.train("abcdefghijkl")
    model = BigramLM(tok.vocab_size) if kind == "bigram" else tiny_transformer(kind, tok.vocab_size)
    model.eval()
    make_run(tmp_path, model, tok)
    loaded, tok2, config = ckpt.load_run(tmp_path / "checkpoint_latest.pt")  # a file inside the run works too
    idx = torch.randint(tok.vocab_size, (2, 8))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert tok2.chars == tok.chars and not loaded.training


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = tiny_transformer("llama")
    path = tmp_path / "w.safetensors"
    ckpt.save_weights(model, path)
    stored = safetensors.torch.load_file(path)
    assert len(stored) == len({p.data_ptr() for p in model.state_dict().values()})
    assert len(stored) < len(model.state_dict())  # the llama preset ties embedding and head
    fresh = ckpt.load_weights(tiny_transformer("llama"), path)
    state = fresh.state_dict()
    assert len({p.data_ptr() for p in state.values()}) == len(stored)  # still one tensor after loading
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items())


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    tok = CharTokenizer.train("abc")
    model = BigramLM(tok.vocab_size)
    make_run(tmp_path, model, tok)
    before = (tmp_path / ckpt.WEIGHTS).read_bytes()

    def dies_half_way(m, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_model", dies_half_way)
    with torch.no_grad():
        model.table.weight.add_(1.0)
    with pytest.raises(OSError):
        ckpt.save_weights(model, tmp_path / ckpt.WEIGHTS)
    assert (tmp_path / ckpt.WEIGHTS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    ckpt.load_run(tmp_path)


class Exploit:
    """Unpickling this calls open(path, "w"): a file appears if the loader runs pickled code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    pwned = tmp_path / "pwned"
    torch.save({"model": Exploit(pwned)}, tmp_path / ckpt.STATE)
    with pytest.raises(ValueError, match="damaged or holds more than plain tensors"):
        ckpt.load_training_state(tmp_path)
    assert not pwned.exists()


def test_truncated_files_give_clear_errors(tmp_path):
    ckpt.save_training_state(tmp_path, {"step": 3, "w": torch.ones(1000)})
    assert ckpt.load_training_state(tmp_path)["step"] == 3
    data = (tmp_path / ckpt.STATE).read_bytes()
    (tmp_path / ckpt.STATE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged"):
        ckpt.load_training_state(tmp_path)
    tok = CharTokenizer.train("abc")
    make_run(tmp_path, BigramLM(tok.vocab_size), tok)
    (tmp_path / ckpt.WEIGHTS).write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="damaged or not a safetensors"):
        ckpt.load_run(tmp_path)


def test_tokenizer_mismatch_and_missing_weights(tmp_path):
    tok = CharTokenizer.train("abc")
    run = make_run(tmp_path, BigramLM(tok.vocab_size), tok)
    CharTokenizer.train("abcdef").save(run / "tokenizer.json")
    with pytest.raises(ValueError, match="pass the run's own tokenizer"):
        ckpt.load_run(run)
    (run / ckpt.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ckpt.load_run(run)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        ckpt.load_run(tmp_path / "no" / "such-run")
    assert json.loads((run / ckpt.CONFIG).read_text())["model"]["model"] == "bigram"
