"""Stages 3, 5, 15 — the data pipeline: text in, batches of token ids out.

A model learns from pairs (x, y) where y is x shifted by one token: at every
position the target is simply the next token. This file reads the corpus
(fetching Tiny Shakespeare on first use), splits it 90/5/5 into train, val and
test, encodes it once and caches the ids on disk, and cuts batches of blocks.

New since stage 4: the split, the one-token shift, random-offset batches for
training, strided blocks for evaluation, and the token cache.
Run the demo: `python dataset.py`
"""
import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

DEFAULT_CORPUS = "tiny_shakespeare.txt"
CORPUS_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SPLITS = (0.90, 0.05, 0.05)  # train, val, test: contiguous, in that order
CACHE_DIR = Path("out") / "cache"


def atomic_write(path, write):
    """Create `path` through `write(tmp_path)` so a crash leaves the old file or the new one.

    `write` fills a temporary file in the same directory; it is flushed to disk
    (fsync) and only then renamed over `path`: a rename is atomic on POSIX and Windows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data):
    """`atomic_write` for bytes already in memory."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def fetch_tiny_shakespeare(path=DEFAULT_CORPUS, url=CORPUS_URL):
    """Download Tiny Shakespeare to `path`, check its SHA-256, and write it atomically."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as e:
        raise FileNotFoundError(
            f"{path} is missing and could not be downloaded ({e.__class__.__name__}); "
            f"fetch {url} by hand and save it as {path}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise ValueError(f"downloaded corpus has SHA-256 {digest[:12]}…, expected {CORPUS_SHA256[:12]}…; "
                         f"fetch {url} by hand and save it as {path}")
    atomic_write_bytes(path, data)
    return Path(path)


def read_text(path, min_chars=2):
    """Read a UTF-8 text file; the default corpus is fetched when missing.

    Raises FileNotFoundError / ValueError with a message that says what to do:
    missing file, empty file, bytes that are not UTF-8 (with their offset),
    or fewer than `min_chars` characters (one block plus its target).
    """
    path = Path(path)
    if not path.exists() and path.name == DEFAULT_CORPUS:
        print(f"{path} not found: downloading Tiny Shakespeare (1.1 MB) …")
        fetch_tiny_shakespeare(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found: pass --data PATH to a UTF-8 text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"data file {path} is empty: it needs some text to learn from")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}; "
                         f"convert it, e.g. `iconv -f SHIFT_JIS -t UTF-8`") from None
    if len(text) < min_chars:
        raise ValueError(f"data file {path} has {len(text)} characters, fewer than one block needs "
                         f"({min_chars}); use more text or a smaller --block-size")
    return text


def split_text(text, fractions=SPLITS):
    """Cut the text into contiguous train / val / test parts by characters.

    >>> split_text("abcdefghijklmnopqrst")
    ('abcdefghijklmnopqr', 's', 't')
    """
    n = len(text)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return text[:a], text[a:b], text[b:]


def tokenizer_fingerprint(tok):
    """A hash of the tokenizer's saved file: two tokenizers that save alike encode alike."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tok"
        tok.save(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()


def encode_cached(text, tok, cache_dir=CACHE_DIR, fingerprint=None):
    """Encode `text` once and keep the ids as a memory-mapped .npy.

    The key is the hash of the text plus the hash of the tokenizer file, so a
    change to either re-encodes. uint16 when the vocabulary fits, else uint32.
    Returns a read-only 1-D numpy array.
    """
    fingerprint = fingerprint or tokenizer_fingerprint(tok)
    key = hashlib.sha256(text.encode("utf-8") + fingerprint.encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path, mmap_mode="r")
        except ValueError:
            path.unlink()  # a damaged cache file is re-made, never trusted
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    ids = np.asarray(tok.encode(text), dtype=dtype)
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, ids)

    atomic_write(path, write)
    return np.load(path, mmap_mode="r")


def as_tensor(ids):
    """Token ids as a 1-D int32 tensor (half the memory of int64; batches are widened)."""
    return torch.from_numpy(np.asarray(ids, dtype=np.int32))


def get_batch(data, block_size, batch_size, generator=None, device="cpu"):
    """A random-offset batch: x (B, T) and y = x shifted by one, both int64.

    One gather per batch, no Python loop over positions.
    """
    if len(data) < block_size + 1:
        raise ValueError(f"{len(data)} tokens are fewer than one block needs ({block_size + 1}); "
                         f"use more text or a smaller --block-size")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size + 1)  # (T+1,)
    window = data[starts[:, None] + offsets].long()  # (B, 1) + (T+1,) -> (B, T+1)
    x, y = window[:, :-1], window[:, 1:]  # (B, T) each: y is x shifted by one
    if device != "cpu":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


class BlockDataset(torch.utils.data.Dataset):
    """Blocks of `block_size` tokens taken every `stride` tokens, as (x, y) pairs.

    stride = block_size (the default) tiles the data with no overlap and no
    position wasted: every token is a target exactly once (the first is only an input).
    """

    def __init__(self, data, block_size, stride=None):
        self.data, self.block_size = data, block_size
        self.stride = stride or block_size
        if len(data) < block_size + 1:
            raise ValueError(f"{len(data)} tokens are fewer than one block needs ({block_size + 1})")
        self.n = (len(data) - 1 - block_size) // self.stride + 1

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = i * self.stride
        window = torch.as_tensor(np.asarray(self.data[start:start + self.block_size + 1]), dtype=torch.long)
        return window[:-1], window[1:]


def default_workers():
    """DataLoader workers: one per core, leaving one core to the training process."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def epoch_batches(data, block_size, batch_size, seed=0, rank=0, world=1, start=0, workers=None):
    """Shuffled epochs over non-overlapping blocks, through a DataLoader: yields (x, y) forever.

    The alternative to `get_batch`'s random offsets: each epoch sees every block
    exactly once. Epoch e is shuffled by seed (seed, e) and dealt out to the
    `world` ranks in disjoint shards; `start` skips that many batches (resume).
    """
    blocks = BlockDataset(data, block_size)
    per_epoch = len(blocks) // world // batch_size
    if per_epoch < 1:
        raise ValueError(f"{len(blocks)} blocks make no batch of {batch_size} per process: "
                         f"lower --batch-size or use --sampler random")
    epoch, skip = divmod(start, per_epoch)
    workers = default_workers() if workers is None else workers
    while True:
        generator = torch.Generator().manual_seed(hash((seed, epoch)))
        order = torch.randperm(len(blocks), generator=generator)
        shard = order[rank::world][skip * batch_size:per_epoch * batch_size].tolist()
        # Its own generator also keeps the DataLoader from drawing on torch's global RNG (dropout's).
        yield from torch.utils.data.DataLoader(torch.utils.data.Subset(blocks, shard), batch_size=batch_size,
                                               num_workers=workers, generator=generator)
        epoch, skip = epoch + 1, 0


def _demo():
    from char_tokenizer import CharTokenizer

    text = read_text(DEFAULT_CORPUS)
    train, val, test = split_text(text)
    print(f"{len(text):,} chars -> train {len(train):,} / val {len(val):,} / test {len(test):,}")
    tok = CharTokenizer.train(train)
    data = as_tensor(tok.encode(train))
    x, y = get_batch(data, block_size=8, batch_size=2, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        print(f"x: {tok.decode(x[b].tolist())!r}\ny: {tok.decode(y[b].tolist())!r}")


if __name__ == "__main__":
    try:
        _demo()
    except (ValueError, FileNotFoundError) as e:  # e.g. offline without the corpus: one line, as train.py says it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
