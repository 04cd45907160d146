import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
from char_tokenizer import CharTokenizer
from dataset import BlockDataset, encode_cached, get_batch, read_text, split_text

ROOT = Path(__file__).resolve().parent


def test_split_is_contiguous_90_5_5_and_deterministic():
    text = "".join(chr(ord("a") + i % 26) for i in range(10_007))
    train, val, test = split_text(text)
    assert train + val + test == text  # contiguous, nothing lost, nothing shared
    assert (len(train), len(val), len(test)) == (9006, 500, 501)
    assert split_text(text) == (train, val, test)


def test_split_of_the_real_corpus(shakespeare):
    train, val, test = split_text(shakespeare)
    assert len(shakespeare) == 1_115_394
    assert hashlib.sha256(shakespeare.encode()).hexdigest() == dataset.CORPUS_SHA256
    assert (len(train), len(val), len(test)) == (1_003_854, 55_769, 55_771)


def test_batches_are_shifted_by_one_token():
    data = torch.arange(1000, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(data, block_size=16, batch_size=8, generator=g)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)
    x2, _ = get_batch(data, 16, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # same seed, same batch


def test_batches_reach_the_last_token():
    data = torch.arange(10, dtype=torch.int32)
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        _, y = get_batch(data, 4, 4, g)
        seen |= set(y.flatten().tolist())
    assert seen == set(range(1, 10))


def test_block_dataset_tiles_without_waste():
    data = np.arange(101)
    ds = BlockDataset(data, block_size=10)
    assert len(ds) == 10
    targets = torch.cat([ds[i][1] for i in range(len(ds))])
    assert torch.equal(targets, torch.arange(1, 101))  # every token after the first is a target once
    x, y = ds[3]
    assert torch.equal(y, x + 1)
    assert len(BlockDataset(data, 10, stride=5)) == 19


def test_token_cache_round_trip_and_key(tmp_path):
    tok = CharTokenizer.train("hello world")
    ids = encode_cached("hello", tok, cache_dir=tmp_path)
    assert ids.dtype == np.uint16 and ids.tolist() == tok.encode("hello")
    assert len(list(tmp_path.glob("*.npy"))) == 1
    again = encode_cached("hello", tok, cache_dir=tmp_path)
    assert isinstance(again, np.memmap) and again.tolist() == ids.tolist()
    encode_cached("hello", CharTokenizer.train("hello"), cache_dir=tmp_path)  # another tokenizer
    assert len(list(tmp_path.glob("*.npy"))) == 2


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"abc\xff\xfedef", "offset 3"),
    (b"a", "fewer than one block"),
])
def test_read_text_errors(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_text(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        read_text(tmp_path / "nope.txt")


def test_offline_fetch_says_where_to_put_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="save it as"):
        dataset.fetch_tiny_shakespeare(tmp_path / "tiny_shakespeare.txt", url="http://127.0.0.1:9/none")
    assert not (tmp_path / "tiny_shakespeare.txt").exists()


def test_epoch_batches_see_every_block_once_per_epoch_and_resume():
    data = torch.arange(161, dtype=torch.int32)  # 16 blocks of 10
    stream = dataset.epoch_batches(data, 10, batch_size=4, seed=1, workers=0)
    first_epoch = [next(stream) for _ in range(4)]
    starts = sorted(int(x[i, 0]) for x, _ in first_epoch for i in range(4))
    assert starts == list(range(0, 160, 10))
    assert all(torch.equal(y, x + 1) for x, y in first_epoch)
    second_epoch = [next(stream)[0] for _ in range(4)]
    assert [int(x[0, 0]) for x in second_epoch] != [int(x[0, 0]) for x, _ in first_epoch]  # reshuffled
    resumed = dataset.epoch_batches(data, 10, batch_size=4, seed=1, start=6, workers=0)
    assert torch.equal(next(resumed)[0], second_epoch[2])  # batch 6 = the third of epoch two


def test_epoch_batches_shard_across_ranks_through_worker_processes():
    data = torch.arange(161, dtype=torch.int32)
    ranks = [dataset.epoch_batches(data, 10, batch_size=2, seed=0, rank=r, world=2, workers=1) for r in (0, 1)]
    seen = [{int(x[i, 0]) for _ in range(4) for x in [next(stream)[0]] for i in range(2)} for stream in ranks]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16


def test_the_demo_offline_without_the_corpus_says_so_in_one_line(tmp_path):
    """No corpus and no network (a proxy on a closed local port): one line naming the URL, exit 2."""
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, str(ROOT / "dataset.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert dataset.CORPUS_URL in lines[0] and "save it as tiny_shakespeare.txt" in lines[0]
    assert list(tmp_path.iterdir()) == []
