"""Data-parallel training for real: two CPU processes under torchrun, gloo backend."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from checkpoint import load_training_state

ROOT = Path(__file__).resolve().parent
TINY = ["--block-size", "16", "--batch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--steps", "6", "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "1"]


def test_two_process_ddp_trains_and_rank0_writes_the_same_checkpoint(tmp_path):
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    env_threads = {"OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          str(ROOT / "train.py"), "--data", "t.txt", "--out", "ddp", *TINY],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env={**os.environ, **env_threads})
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "4×1 accum×2 proc = 8 sequences" in ddp.stdout  # the effective batch is printed once, by rank 0
    assert ddp.stdout.count("parameters;") == 1
    single = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "t.txt", "--out", "one", *TINY],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_training_state(tmp_path / "ddp"), load_training_state(tmp_path / "one")
    assert a.keys() == b.keys() and a["loop"]["step"] == b["loop"]["step"] == 6
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    assert a["loop"]["tokens"] == 2 * b["loop"]["tokens"]  # two processes, twice the tokens per step
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5, 6]  # one writer, no duplicates
    assert all(torch.isfinite(v).all() for v in a["model"].values())
