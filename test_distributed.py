"""Data-parallel training for real: two CPU processes under torchrun, gloo backend."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import train
from checkpoint import load_training_state

ROOT = Path(__file__).resolve().parent
TINY = ["--block-size", "16", "--batch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--dropout", "0", "--steps", "5", "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "1"]
# train.py as torchrun starts it, except that every rank also saves its own weights when training ends
# (train.py saves rank 0's only), so that the test can compare the two ranks.
EACH_RANK_SAVES = """
import sys
import torch
sys.path.insert(0, {root!r})
import train
loop = train.train_loop
def loop_then_save(net, *args, **kwargs):
    state = loop(net, *args, **kwargs)
    torch.save(net.module.state_dict(), f"rank{{torch.distributed.get_rank()}}.pt")
    return state
train.train_loop = loop_then_save
train.main(sys.argv[1:])
"""


def torchrun(tmp_path, script, args, port):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, encoding="utf-8")


# One DDP run covers, at once: Muon (its matrices and, through its AdamW half, the rest: both optimizers'
# averaging), a layer with memory (infini) and the documents sampler, whose rows carry that memory from batch to
# batch and forget it where a document starts: each rank deals itself half of the documents.
def test_two_processes_train_as_one_process_on_both_ranks_batches(tmp_path, monkeypatch):
    documents = [f"document {d}: " + "the quick brown fox jumps over the lazy dog. " * (2 + d % 3) for d in range(24)]
    (tmp_path / "t.txt").write_text("\n\n".join(documents), encoding="utf-8")
    (tmp_path / "each_rank_saves.py").write_text(EACH_RANK_SAVES.format(root=str(ROOT)), encoding="utf-8")
    flags = [*TINY, "--optimizer", "muon", "--layers", "infini", "--sampler", "documents"]
    ddp = torchrun(tmp_path, tmp_path / "each_rank_saves.py", ["--data", "t.txt", "--out", "ddp", *flags], 29535)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "4×1 accum×2 proc = 8 sequences" in ddp.stdout  # the effective batch is printed once, by rank 0
    assert ddp.stdout.count("parameters;") == 1
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5]  # one writer, no duplicates

    # The reference: one process whose micro-batch i is rank 0's and rank 1's micro-batch i stacked,
    # drawn from the same seeds; the mean loss over 8 sequences has the mean of the ranks' gradients.
    stream = train.batch_stream

    def both_ranks(args, ids, block_size, batch_size, rank, world, start, device, tok):
        ranks = [stream(args, ids, block_size, batch_size, r, 2, start, device, tok) for r in (0, 1)]
        return lambda: tuple(torch.cat(parts) for parts in zip(*(next_batch() for next_batch in ranks)))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "batch_stream", both_ranks)
    train.run(["--data", "t.txt", "--out", "one", *flags])

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    one, saved = load_training_state(tmp_path / "one"), load_training_state(tmp_path / "ddp")
    assert saved["loop"]["step"] == one["loop"]["step"] == 5
    assert saved["loop"]["tokens"] == 2 * one["loop"]["tokens"]  # the reference counts its 8 sequences once
    for name, weight in rank0.items():
        assert torch.equal(weight, rank1[name]), name  # the all-reduced gradient keeps the ranks identical
        assert torch.equal(weight, saved["model"][name]), name  # and rank 0 wrote its own weights
        torch.testing.assert_close(weight, one["model"][name], rtol=0, atol=1e-5, msg=name)


def test_two_process_moe_trains_when_an_expert_gets_no_token(tmp_path):
    # 1 sequence of 3 tokens, top-2 of 8 experts: 6 routing slots, so at least 2 experts of every layer
    # sit idle on each rank at each step; DDP still needs a gradient for each of their weights.
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    flags = ["--preset", "moe", "--block-size", "3", "--batch-size", "1", "--n-layer", "1", "--n-head", "2",
             "--n-embd", "16", "--ffn-hidden", "16", "--steps", "3", "--eval-interval", "3", "--eval-iters", "1",
             "--log-interval", "1"]
    ddp = torchrun(tmp_path, ROOT / "train.py", ["--data", "t.txt", "--out", "moe", *flags], 29534)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert load_training_state(tmp_path / "moe")["loop"]["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "moe" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows if "aux_loss" in r and "train_loss" in r] == [1, 2, 3]


def test_a_resumed_two_process_run_with_dropout_repeats_the_unbroken_one(tmp_path):
    """Each rank draws its own dropout masks; after a resume it must draw the same ones again. A warm-up longer
    than the run keeps the learning rate independent of --steps, so 3 steps + 3 more equal 6 in one go."""
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    flags = [*TINY, "--dropout", "0.1", "--warmup-steps", "50", "--lr", "3e-3"]
    straight = torchrun(tmp_path, ROOT / "train.py", ["--data", "t.txt", "--out", "straight", *flags, "--steps", "6"],
                        29535)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = torchrun(tmp_path, ROOT / "train.py", ["--data", "t.txt", "--out", "parts", *flags, "--steps", "3"], 29536)
    assert first.returncode == 0, first.stderr[-2000:]
    second = torchrun(tmp_path, ROOT / "train.py", ["--resume", "parts", "--steps", "6"], 29537)
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = load_training_state(tmp_path / "straight"), load_training_state(tmp_path / "parts")
    assert a["loop"]["step"] == b["loop"]["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "the resumed run took other steps"


# train.py started as on macOS and Windows: every process the run makes (DataLoader workers, the tokenizing pool)
# starts by spawn, importing this file afresh; the guard keeps a spawned child from running the command again.
SPAWN = """
import multiprocessing
import sys
sys.path.insert(0, {root!r})
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    import train
    train.main(sys.argv[1:])
"""


def test_two_processes_train_when_every_worker_starts_by_spawn(tmp_path):
    """DDP with a DataLoader worker per rank (--sampler epoch). That a spawned worker reads the blocks a forked one
    reads, and the tokenizing pool under spawn, are test_dataset's."""
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    (tmp_path / "spawn.py").write_text(SPAWN.format(root=str(ROOT)), encoding="utf-8")
    flags = [*TINY, "--sampler", "epoch", "--workers", "1"]
    spawned = torchrun(tmp_path, tmp_path / "spawn.py", ["--data", "t.txt", "--out", "spawn", *flags], 29535)
    assert spawned.returncode == 0, spawned.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "spawn" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 5]
