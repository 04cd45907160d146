"""The command lines end to end: train.py and sample.py, in subprocesses and in-process."""
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import sample
import train
from checkpoint import load_run

ROOT = Path(__file__).resolve().parent
TEXT = "".join(f"{w} " for w in ("to be or not to be that is the question whether tis nobler in the mind "
                                  "to suffer the slings and arrows of outrageous fortune ").split()) * 40


def cli(*args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, encoding="utf-8",
                          timeout=120)


def one_clean_line(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_bad_inputs_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "sjis.txt").write_bytes("こんにちは".encode("shift_jis"))
    (tmp_path / "short.txt").write_text("abc " * 20, encoding="utf-8")
    # one case as its own process (the real exit status), the others in this one (a process each costs seconds)
    assert "not UTF-8" in one_clean_line(cli(str(ROOT / "train.py"), "--data", "sjis.txt", cwd=tmp_path))
    monkeypatch.chdir(tmp_path)
    cases = [
        (train.main, ["--data", "missing.txt"], "not found"),
        (train.main, ["--data", "empty.txt"], "empty"),
        (train.main, ["--data", "short.txt", "--block-size", "64"], "fewer than one block"),
        (train.main, ["--preset", "nope"], "unknown preset"),
        (sample.main, ["--model-checkpoint", "out/none"], "not a run directory"),
        (sample.main, ["--temperature", "-1"], "temperature"),
        (sample.main, ["--top-p", "0"], "top-p"),
    ]
    for main, args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, (args, stderr)


def run_train(tmp_path, *extra):
    return train.run(["--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "run"),
                      "--block-size", "16", "--batch-size", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                      "--eval-iters", "2", "--log-interval", "1", *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_short_training_run_lowers_val_loss_and_writes_the_run(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "60", "--eval-interval", "30", "--lr", "3e-3")
    run = tmp_path / "run"
    assert {"config.json", "tokenizer.json", "model.safetensors", "best.safetensors",
            "checkpoint_latest.pt", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    val = [r["val_loss"] for r in metrics(run) if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] < 3.5
    model, tok, config = load_run(run)
    assert config["args"]["steps"] == 60 and tok.vocab_size == model.config.vocab_size


@pytest.mark.parametrize("sampler", ["random", "epoch"])
def test_resume_continues_exactly(tmp_path, corpus, monkeypatch, ctrl_c_at_batch, sampler):
    """A run interrupted at step 7 (Ctrl-C) and resumed matches an uninterrupted run bit for bit."""
    monkeypatch.chdir(tmp_path)
    args = ("--steps", "14", "--eval-interval", "5", "--warmup-steps", "3", "--lr", "3e-3", "--dropout", "0.1",
            "--sampler", sampler, "--workers", "0")
    run_train(tmp_path, *args)
    straight = metrics(tmp_path / "run")
    disarm = ctrl_c_at_batch(train, 8)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, *args, "--overwrite")
    disarm()
    train.run(["--resume", str(tmp_path / "run")])
    resumed = metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a.get("train_loss") == b.get("train_loss") and a.get("val_loss") == b.get("val_loss"), (a, b)


def test_sample_is_reproducible_and_streams(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "20", "--eval-interval", "20")
    def sample(seed):
        return cli(str(ROOT / "sample.py"), "--model-checkpoint", "run/checkpoint_latest.pt", "--max-new-tokens",
                   "40", "--seed", str(seed), "--prompt", "to be", cwd=tmp_path)

    first, second, other = sample(3), sample(3), sample(4)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("to be")
    assert len(first.stdout) > len("to be") + 10
    assert other.stdout != first.stdout


def test_bigram_recipe_runs(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = train.run(["--model", "bigram", "--data", str(corpus), "--out", "bigram", "--block-size", "16",
                       "--batch-size", "16", "--steps", "150", "--eval-interval", "150", "--eval-iters", "4"])
    assert state.best_val < 2.5
    model, _, _ = load_run(tmp_path / "bigram")
    assert model.table.weight.shape[0] == model.table.weight.shape[1]


@pytest.mark.parametrize("kind, vocab", [("bpe", 300), ("spm", 290)])
def test_subword_tokenizer_runs_are_trained_once_and_reused(tmp_path, corpus, monkeypatch, capsys, kind, vocab):
    monkeypatch.chdir(tmp_path)
    flags = ["--tokenizer", kind, "--vocab-size", str(vocab), "--steps", "5", "--eval-interval", "5"]
    run_train(tmp_path, *flags)
    assert "reusing" not in capsys.readouterr().out
    run_train(tmp_path, *flags, "--out", str(tmp_path / "again"))
    assert f"reusing the {kind} tokenizer" in capsys.readouterr().out
    model, tok, config = load_run(tmp_path / "again")
    assert config["tokenizer"] == kind and tok.vocab_size == vocab == model.config.vocab_size
    assert tok.decode(tok.encode(TEXT[:200])) == TEXT[:200]


def test_loss_plot_and_plot_command(tmp_path, corpus, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "10", "--eval-interval", "5")
    png = tmp_path / "run" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = cli(str(ROOT / "plot.py"), "run", "run", "--out", "both.png", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "both.png").stat().st_size > 1000
    assert "not a run directory" in one_clean_line(cli(str(ROOT / "plot.py"), "nothing", cwd=tmp_path))


def test_a_time_budget_alone_is_not_capped_by_the_default_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, out/gpt, must not hold a run (the README's first command makes one)
    assert train.resolve_args(["--max-time", "60"])["steps"] > 10**9
    assert train.resolve_args(["--max-time", "60", "--steps", "100"])["steps"] == 100
    assert train.resolve_args([])["steps"] == 2000


def file_bytes(run_dir, *names):
    return {name: (run_dir / name).read_bytes() for name in names}


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_an_inf_gradient_at_an_evaluation_step_keeps_the_last_good_files(tmp_path, corpus, monkeypatch, capsys,
                                                                          clip):
    """A finite loss with an inf gradient at step 10 (an evaluation step): exit 1, the step-5 files stay."""
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "5", "--eval-interval", "5", "--grad-clip", clip)
    run = tmp_path / "run"
    kept = ("model.safetensors", "best.safetensors", "checkpoint_latest.pt", "tokenizer.json")
    before = file_bytes(run, *kept)
    real_build, backward_calls = checkpoint.build_model, []

    def build_with_poisoned_gradient(model_cfg):
        model = real_build(model_cfg)

        def poison(grad):  # the 5th backward pass after the resume is step 10's
            backward_calls.append(1)
            return torch.full_like(grad, math.inf) if len(backward_calls) == 5 else grad
        next(model.parameters()).register_hook(poison)
        return model

    monkeypatch.setattr(checkpoint, "build_model", build_with_poisoned_gradient)
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(run), "--steps", "10"])
    assert stop.value.code == 1
    err = capsys.readouterr().err  # the progress bar writes to stderr too: the message is its last line
    assert "Traceback" not in err and "gradient norm became inf at step 10" in err.strip().splitlines()[-1], err
    assert file_bytes(run, *kept) == before
    assert max(r["step"] for r in metrics(run)) == 9  # rows up to the last finite step, none after it


def test_out_into_an_existing_run_refuses_unless_overwrite(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "4", "--eval-interval", "2")
    run = tmp_path / "run"
    before = file_bytes(run, "model.safetensors", "metrics.jsonl", "config.json")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", str(corpus), "--out", str(run), "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert f"--resume {run}" in err[0] and "--overwrite" in err[0]
    assert file_bytes(run, "model.safetensors", "metrics.jsonl", "config.json") == before
    run_train(tmp_path, "--steps", "3", "--eval-interval", "3", "--overwrite")
    assert [r["step"] for r in metrics(run) if "val_loss" in r] == [3]  # nothing left of the first run
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["args"]["steps"] == 3
    assert "overwrite" not in json.loads((run / "config.json").read_text(encoding="utf-8"))["args"]


@pytest.mark.parametrize("typed, message", [
    (["--n-layer", "2"], "--n-layer 2 differs from the run's 1"),
    (["--n-embd", "64"], "--n-embd 64 differs from the run's 32"),
    (["--block-size", "8"], "--block-size 8 differs from the run's 16"),
    (["--tokenizer", "bpe"], "--tokenizer bpe differs from the run's char"),
    (["--seed", "7"], "--seed 7 differs from the run's 1337"),
    (["--n-kv-head", "1"], "--n-kv-head 1 differs from the run's 2"),
])
def test_resume_refuses_a_changed_model_or_run_flag(tmp_path, corpus, monkeypatch, capsys, typed, message):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "2", "--eval-interval", "2")
    config = (tmp_path / "run" / "config.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(tmp_path / "run"), *typed])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0], err
    assert (tmp_path / "run" / "config.json").read_bytes() == config


def test_resume_accepts_training_flags_and_records_them(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "2", "--eval-interval", "2")
    config_path = tmp_path / "run" / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    del config["args"]["threads"]  # a run saved before --threads existed resumes with its default
    config_path.write_text(json.dumps(config), encoding="utf-8")
    state = train.run(["--resume", str(tmp_path / "run"), "--steps", "4", "--lr", "5e-4", "--eval-interval", "4",
                       "--n-layer", "1"])  # the run's own value: not a change
    assert state.step == 4
    args = json.loads(config_path.read_text(encoding="utf-8"))["args"]
    assert (args["steps"], args["lr"], args["eval_interval"], args["threads"]) == (4, 5e-4, 4, 0)


def test_resume_after_a_kill_before_the_first_checkpoint_or_mid_write(tmp_path, corpus, monkeypatch):
    """What kill -9 can leave: no checkpoint yet, a torn metrics row, a temporary file of a cut-short write."""
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "4", "--eval-interval", "2")
    run = tmp_path / "run"
    (run / "checkpoint_latest.pt").unlink()
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "train_lo')
    (run / ".model.safetensors.abc123.tmp").write_bytes(b"half a file")
    state = train.run(["--resume", str(run)])
    assert state.step == 4
    assert [r["step"] for r in metrics(run) if "val_loss" in r] == [2, 4]  # started again at 0, rows not doubled
    assert list(run.glob(".*.tmp")) == []


def many_sources(root):
    """A folder with a text file and a .jsonl file, and a second folder for a glob."""
    (root / "data" / "more").mkdir(parents=True)
    (root / "data" / "a.txt").write_text(TEXT, encoding="utf-8")
    lines = [json.dumps({"text": TEXT[i:i + 300]}) for i in range(0, 3000, 300)]
    (root / "data" / "more" / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "other").mkdir()
    (root / "other" / "c.txt").write_text(TEXT[::-1], encoding="utf-8")


def test_data_from_many_sources_is_recorded_read_in_place_and_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    many_sources(tmp_path)
    seen = []
    real_stream = train.batch_stream
    monkeypatch.setattr(train, "batch_stream",
                        lambda args, ids, *rest: seen.append(ids) or real_stream(args, ids, *rest))
    data = ["data", "other/*.txt"]
    flags = ["--data", *data, "--out", "run", "--block-size", "16", "--batch-size", "8", "--n-layer", "1",
             "--n-head", "2", "--n-embd", "32", "--eval-iters", "2", "--steps", "4", "--eval-interval", "2"]
    train.run(flags)
    config = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    files = [tmp_path / "data" / "a.txt", tmp_path / "data" / "more" / "b.jsonl", tmp_path / "other" / "c.txt"]
    assert config["args"]["data"] == data
    assert config["data"] == [{"path": str(f.relative_to(tmp_path)), "bytes": f.stat().st_size,
                               "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files]
    assert isinstance(seen[0], np.memmap)  # the token cache itself, not a copy
    text_chars = len(TEXT) + sum(len(TEXT[i:i + 300]) + 1 for i in range(0, 3000, 300)) + len(TEXT)
    train_chars = sum(int(n * 0.9) for n in (len(TEXT), 3000 + 10, len(TEXT)))
    assert len(seen[0]) == train_chars < text_chars  # a char run: one id per character of the train parts
    state = train.run(["--resume", "run", "--steps", "6", "--data", *data])  # the same --data: accepted
    assert state.step == 6
    capsys.readouterr()
    for typed, message in [(["--data", "data"], "--data ['data'] differs from the run's"), ([], "changed since")]:
        if not typed:
            (tmp_path / "other" / "c.txt").write_text(TEXT, encoding="utf-8")
        with pytest.raises(SystemExit) as stop:
            train.main(["--resume", "run", "--steps", "8", *typed])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_data_tokenized_once_serves_a_second_run_that_reads_no_text(tmp_path, corpus, monkeypatch, kind):
    import dataset
    monkeypatch.chdir(tmp_path)
    old = corpus.stat().st_mtime - 10
    os.utime(corpus, (old, old))  # a file written just now is re-read every time (see dataset.scan_source)
    flags = ["--steps", "2", "--eval-interval", "2", "--tokenizer", kind, "--vocab-size", "300"]
    run_train(tmp_path, *flags)
    cache = sorted(p.name for p in (tmp_path / "out" / "cache").glob("*.npy"))

    def no_reading(*args):
        raise AssertionError("read again")
    monkeypatch.setattr(dataset, "write_ids", no_reading)
    monkeypatch.setattr(dataset, "_blocks", no_reading)  # every read of a data file goes through it
    run_train(tmp_path, *flags, "--out", str(tmp_path / "again"))
    assert sorted(p.name for p in (tmp_path / "out" / "cache").glob("*.npy")) == cache and len(cache) == 2
    corpus.write_text(TEXT.upper(), encoding="utf-8")  # same size, a new time: scanned and tokenized anew
    with pytest.raises(AssertionError, match="read again"):
        run_train(tmp_path, *flags, "--out", str(tmp_path / "third"))


def test_bad_data_sources_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    many_sources(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n', encoding="utf-8")
    (tmp_path / "sjis.txt").write_bytes(b"plain text " + "猫".encode("shift_jis"))
    (tmp_path / "tiny.txt").write_text("just a few words, far too few for a block", encoding="utf-8")
    cases = [
        (["empty"], "--data empty: no .txt or .jsonl file there"),
        (["data", "*.csv"], "--data *.csv: no .txt or .jsonl file there"),
        (["data", "bad.jsonl"], 'bad.jsonl line 2 has no "text" string (found keys txt)'),
        (["data", "sjis.txt"], "sjis.txt is not UTF-8: byte 0x94 at offset 11"),
        (["data", "tiny.txt"], "tiny.txt has 41 characters: its validation part (2) is fewer than one block (17)"),
    ]
    for data, message in cases:
        with pytest.raises(SystemExit) as stop:
            train.main(["--data", *data, "--out", "bad", "--block-size", "16", "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and message in err[0], (data, err)
        assert not (tmp_path / "bad").exists()


def test_a_runs_config_json_reproduces_it_and_typed_flags_win(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "6", "--eval-interval", "3", "--lr", "3e-3", "--dropout", "0.1", "--no-bias")
    train.run(["--config", str(tmp_path / "run" / "config.json"), "--out", str(tmp_path / "again")])
    assert file_bytes(tmp_path / "run", "model.safetensors") == file_bytes(tmp_path / "again", "model.safetensors")
    original, again = (json.loads((tmp_path / d / "config.json").read_text(encoding="utf-8")) for d in ("run", "again"))
    assert again["model"] == original["model"] and again["resolved"] == original["resolved"]
    typed_first = {k: v for k, v in original["args"].items() if v is not None and k != "out"}
    assert typed_first.items() <= again["args"].items()  # and every model field, from the file's "model"
    settings = {"steps": 4, "lr": 2e-3, "n_layer": 2, "bias": True}
    (tmp_path / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    train.run(["--data", str(corpus), "--config", "settings.json", "--lr", "1e-3", "--out", "typed",
               "--block-size", "16", "--n-embd", "32", "--eval-interval", "4", "--eval-iters", "1"])
    config = json.loads((tmp_path / "typed" / "config.json").read_text(encoding="utf-8"))
    assert (config["args"]["steps"], config["args"]["lr"]) == (4, 1e-3)  # the file's steps, the typed lr
    assert config["model"]["n_layer"] == 2 and config["model"]["bias"] is True and "config" not in config["args"]


@pytest.mark.parametrize("content, message", [
    ("{'lr': 1e-3}", "is not JSON"),
    ('{"lr": 1e-3, "learning_rate": 1e-3, "layers_n": 2}', "unknown keys layers_n, learning_rate"),
    ("[1, 2]", "holds a JSON list"),
])
def test_a_bad_config_file_exits_2_with_one_line(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.json").write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        train.main(["--config", "settings.json", "--out", "bad"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "bad").exists()


def test_lr_scaling_scales_both_rates_and_records_them(tmp_path, corpus, monkeypatch, capsys):
    """The gpt preset's reference is 12 × 64 tokens; 48 × 16 × 4 accumulated is 4 times that."""
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, "--steps", "2", "--eval-interval", "2", "--batch-size", "48", "--grad-accum", "4",
              "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "0", "--lr-scaling", "sqrt")
    config = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert config["resolved"]["tokens_per_step"] == 4 * train.REFERENCE_TOKENS["gpt"]
    assert (config["resolved"]["lr"], config["resolved"]["min_lr"]) == pytest.approx((2e-3, 2e-4))
    assert config["args"]["lr"] == 1e-3  # what was asked for: --config of this run scales it again alike
    assert metrics(tmp_path / "run")[0]["lr"] == pytest.approx(2e-3)  # step 0, no warm-up: the peak
    assert "learning rate 0.002 → 0.0002" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--lr-scaling", "sqrt", "--preset", "unmeasured"], "preset unmeasured has no reference batch"),
    (["--lr-scaling", "linear", "--model", "bigram"], "the bigram model has no reference batch"),
    (["--dtype", "float16"], "--dtype float16: autocast on a CPU supports bfloat16 only"),
    (["--threads", "-1"], "--threads -1: give a number of threads"),
])
def test_a_setting_the_machine_or_preset_cannot_take_exits_2(tmp_path, corpus, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(train.PRESETS, "unmeasured", train.PRESETS["gpt"])
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", str(corpus), "--out", "bad", "--device", "cpu", "--block-size", "16", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("module", ["train", "finetune"])
def test_help_prints_every_flag_with_its_default(module, capsys):
    program = __import__(module)
    with pytest.raises(SystemExit) as stop:
        program.resolve_args(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage:")
    flags = {a.option_strings[-1] for a in program.build_parser()._actions if a.option_strings}
    assert flags and all(flag in out for flag in flags)
    assert "(default: " in out


def test_estimate_prints_the_run_and_writes_nothing(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = run_train(tmp_path, "--steps", "500", "--eval-interval", "100", "--estimate")
    out = capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    V, T, C = int(re.search(r"vocab (\d+)", out).group(1)), 16, 32
    n = V * C + T * C + (12 * C * C + 2 * C) + C  # embeddings, one layer, the last norm
    assert f"{n:,} parameters, {6 * n + 12 * 32 * 16:,} FLOPs per token" in out and "estimate:" in out
    assert result["memory"]["optimizer"] == 8 * n and result["seconds_per_step"] > 0
    assert result["seconds"] == pytest.approx(500 * result["seconds_per_step"] + 5 * result["seconds_per_eval"])


def test_expected_time_counts_the_steps_and_every_evaluation():
    cfg = train.TrainConfig(steps=1000, eval_interval=250)
    assert train.expected_seconds(cfg, 0.1, 2.0) == pytest.approx(1000 * 0.1 + 4 * 2.0)
    cfg = train.TrainConfig(steps=1000, eval_interval=300)  # at 300, 600, 900 and the last step
    assert train.expected_seconds(cfg, 0.1, 2.0) == pytest.approx(100 + 4 * 2.0)
    cfg = train.TrainConfig(steps=10**12, max_time=60, eval_interval=250)  # a time budget: 600 steps of 0.1 s
    assert train.expected_seconds(cfg, 0.1, 2.0) == pytest.approx(60 + 3 * 2.0)


def test_threads_one_per_core_less_the_busy_ones_or_as_asked(tmp_path, corpus, monkeypatch, capsys):
    # /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal; 50 of 100 ticks idle or waiting
    assert checkpoint.busy_share("cpu  10 0 5 80 5 0 0 0 0 0", "cpu  40 0 25 120 15 0 0 0 0 0") == pytest.approx(0.5)
    assert checkpoint.busy_share("cpu  1 2 3 4 5 6 7 8", "cpu  1 2 3 4 5 6 7 8") == 0.0  # no tick between the readings
    assert [checkpoint.pick_threads(0, 2, busy) for busy in (0, 1, 2)] == [2, 1, 1]
    assert checkpoint.pick_threads(3, 2, 2) == 3  # asked for: as asked, whatever the load
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(checkpoint, "cores_busy", lambda: 1)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for flags in ([], ["--threads", "2"]):
        train.run(["--data", str(corpus), "--out", f"run{len(chosen)}", "--block-size", "16", "--n-layer", "1",
                   "--n-head", "2", "--n-embd", "16", "--steps", "1", "--eval-iters", "1", *flags])
    assert chosen == [1, 2]
    out = capsys.readouterr().out
    assert f"1 thread (auto: 1 of {os.cpu_count()} cores busy)" in out and "cpu, float32, 2 threads;" in out
