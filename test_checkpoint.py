import json
import shutil
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
    assert json.loads((run / ckpt.CONFIG).read_text(encoding="utf-8"))["model"]["model"] == "bigram"


# --- Every loader, on weights that do not fit its config.json: one line on stderr, exit 2 ---------
TEXT = "to be or not to be, that is the question: whether tis nobler in the mind to suffer\n" * 30
TARGET = "blocks.0.attn.qkv.weight"  # untied, so no alias of it hides the damage


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real two-step run of train.py (config.json with its args, checkpoint_latest.pt), made once."""
    import train

    root = tmp_path_factory.mktemp("trained")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the token cache goes under out/ of the working directory
        train.run(["--data", str(root / "text.txt"), "--out", str(root / "run"), "--block-size", "16",
                   "--batch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--steps", "2",
                   "--eval-interval", "2", "--eval-iters", "1", "--device", "cpu"])
    return root / "run"


def loader_argv(command, run, tmp_path):
    """The module and argv that load `run` the way `command` does."""
    import cli
    import evaluate
    import quantize
    import sample
    import train

    if command == "server":
        pytest.importorskip("uvicorn")
        pytest.importorskip("fastapi")
        import server
        return server, [str(run)]
    return {"train --resume": (train, ["--resume", str(run)]),
            "sample": (sample, ["--model-checkpoint", str(run), "--max-new-tokens", "2"]),
            "evaluate": (evaluate, [str(run), "--no-samples"]),
            "cli": (cli, [str(run)]),
            "quantize": (quantize, [str(run), "--bits", "8", "--out", str(tmp_path / "q8")])}[command]


def one_error_line(module, argv, capsys):
    """Run a command line in-process; it must exit 2 with exactly one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


LOADERS = ["train --resume", "sample", "evaluate", "cli", "server", "quantize"]


@pytest.mark.parametrize("damage", ["renamed", "reshaped"])
@pytest.mark.parametrize("command", LOADERS)
def test_every_loader_names_the_tensor_that_does_not_fit(trained_run, tmp_path, monkeypatch, capsys, command,
                                                        damage):
    run = shutil.copytree(trained_run, tmp_path / "run")
    module, argv = loader_argv(command, run, tmp_path)
    resuming = command == "train --resume"  # it reads the training state, every other loader the weights
    saved = torch.load(run / ckpt.STATE, weights_only=True)
    tensors = saved["model"] if resuming else safetensors.torch.load_file(run / ckpt.WEIGHTS)
    assert list(tensors[TARGET].shape) == [96, 32]  # [3 · n_embd, n_embd]
    if damage == "renamed":
        tensors["blocks.0.attn.qkv_renamed.weight"] = tensors.pop(TARGET)
        expected = [TARGET, "missing", "blocks.0.attn.qkv_renamed.weight", "[96, 32]"]
    else:
        tensors[TARGET] = tensors[TARGET].reshape(32, 96)
        expected = [TARGET, "[32, 96] in the file", "[96, 32] in the model"]
    if resuming:
        torch.save(saved, run / ckpt.STATE)
    else:
        safetensors.torch.save_file(tensors, run / ckpt.WEIGHTS)
    monkeypatch.chdir(tmp_path)
    line = one_error_line(module, argv, capsys)
    assert all(part in line for part in expected), line
    assert not (tmp_path / "q8").exists()


def test_a_stray_tensor_beside_tied_weights_is_named(tmp_path):
    tok = CharTokenizer.train("abcdefghijkl")
    run = make_run(tmp_path, tiny_transformer("llama", tok.vocab_size), tok)
    tensors = safetensors.torch.load_file(run / ckpt.WEIGHTS)
    tensors["extra.bias"] = torch.zeros(7)
    safetensors.torch.save_file(tensors, run / ckpt.WEIGHTS)
    with pytest.raises(ValueError, match=r"extra\.bias \[7\] is unexpected"):
        ckpt.load_run(run)


def test_first_mismatch_follows_the_models_order():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert ckpt.first_mismatch({"a": torch.ones(2, 3), "b": torch.ones(4)}, expected) is None
    assert ckpt.first_mismatch({"b": torch.ones(5)}, expected) == "a [2, 3] is missing"
    assert ckpt.first_mismatch({"a": torch.ones(3, 2), "b": torch.ones(5)}, expected) == \
        "a is [3, 2] in the file but [2, 3] in the model"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train --resume", "sample", "evaluate", "cli", "server"])
def test_every_command_says_when_cuda_is_absent(trained_run, tmp_path, monkeypatch, capsys, command):
    module, argv = loader_argv(command, trained_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    line = one_error_line(module, [*argv, "--device", "cuda"], capsys)
    assert line == "error: --device cuda is not available on this machine; use --device cpu"
