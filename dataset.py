"""Stages 3, 5, 15 — the data pipeline: text in, batches of token ids out.

A model learns from pairs (x, y) where y is x shifted by one token: at every
position the target is simply the next token. This file reads the corpus
(fetching Tiny Shakespeare on first use), splits it 90/5/5 into train, val and
test, encodes it once and caches the ids on disk, and cuts batches of blocks.

The corpus may be many sources: files, folders and globs of `.txt` and
`.jsonl` (each line's "text"). Each source splits 90/5/5 on its own, so val and
test hold every source. Training never holds a whole file in memory: a source is
scanned once in blocks (size, SHA-256, characters, UTF-8 and JSON checks), and
its text is tokenized chunk by chunk, on worker processes, straight into a
memory-mapped .npy cache that training then reads in place.

New since stage 4: the split, the one-token shift, random-offset batches for
training, and the token cache.
Run the demo: `python dataset.py`
"""
import bisect
import glob
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

DEFAULT_CORPUS = "tiny_shakespeare.txt"
CORPUS_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SPLITS = (0.90, 0.05, 0.05)  # train, val, test: contiguous, in that order
CACHE_DIR = Path("out") / "cache"
DATA_SUFFIXES = (".txt", ".jsonl")  # what a folder or a glob contributes (any case)
BLOCK_BYTES = 1 << 20  # files are read in blocks of 1 MB
CHUNK_CHARS = 1 << 20  # text is tokenized in chunks of about 1M characters
# A BPE or sentencepiece tokenizer learns from at most this many characters of the training text, drawn
# as SAMPLE_WINDOWS evenly spaced stretches so that every source is represented in proportion to its size.
# 5M characters (5 MB of English, 15 MB of Japanese) train an 8192-piece vocabulary in about a minute and
# keep the training process, torch included, under 600 MB; sentencepiece at 10M peaked at 627 MB.
TOKENIZER_SAMPLE_CHARS = 5_000_000
SAMPLE_WINDOWS = 256


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


def not_utf8(path, data, start, offset):
    """The error for bytes that are not UTF-8: which file, which byte, where, and how to convert it."""
    return ValueError(f"data file {path} is not UTF-8: byte 0x{data[start]:02x} at offset {offset + start}; "
                      f"convert it, e.g. `iconv -f SHIFT_JIS -t UTF-8`")


def _text_blocks(f, path, offset=0):
    """(raw bytes, text) of a UTF-8 file from `offset` on, a block at a time, each ending on a whole character."""
    carry = b""
    while True:
        block = f.read(BLOCK_BYTES)
        data = carry + block
        # a character may straddle two blocks: hold back the last lead byte and whatever follows it
        cut = next((i for i in range(len(data) - 1, max(len(data) - 5, -1), -1) if data[i] & 0xC0 != 0x80),
                   len(data)) if block else len(data)
        try:
            text = data[:cut].decode("utf-8")
        except UnicodeDecodeError as e:
            raise not_utf8(path, data, e.start, offset) from None
        if cut:
            yield data[:cut], text
        if not block:
            return
        offset, carry = offset + cut, data[cut:]


def _jsonl_blocks(f, path, offset=0):
    """(raw line, its "text" + newline) of a .jsonl file from `offset` (a line start) on; a blank line gives ""."""
    for number, line in enumerate(f, 1):  # the line numbers are right when reading from the start
        try:
            record = json.loads(line.decode("utf-8")) if line.strip() else {"text": None}
        except UnicodeDecodeError as e:
            raise not_utf8(path, line, e.start, offset) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON ({e.msg}, column {e.colno}): a .jsonl file "
                             f"holds one {{\"text\": ...}} object a line") from None
        text = record.get("text", False) if isinstance(record, dict) else False
        if not isinstance(text, str) and text is not None:
            found = f"keys {', '.join(record)}" if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path} line {number} has no \"text\" string (found {found}): a .jsonl file "
                             f"holds one {{\"text\": ...}} object a line")
        yield line, "" if text is None else text + "\n"
        offset += len(line)


def _blocks(f, path, offset=0):
    return (_jsonl_blocks if str(path).lower().endswith(".jsonl") else _text_blocks)(f, path, offset)


@dataclass(frozen=True)
class Source:
    """One input file, scanned once: what it is, how long its text is, and where reading may resume."""

    path: str
    bytes: int  # its size on disk
    sha256: str  # of its bytes
    chars: int  # of its text (a .jsonl file: every "text" field, each followed by a newline)
    marks: tuple = ((0, 0),)  # (byte offset, character index) where reading may start, about every MB

    def record(self):  # what config.json keeps: enough to tell later that the file is the same
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


def _data_files(folder):
    return sorted(str(f) for f in Path(folder).rglob("*") if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)


def resolve_paths(paths):
    """The files --data names: a file as given, every .txt/.jsonl below a folder or matched by a glob
    (sorted by path; `**` reaches into subfolders). A file named twice is read once."""
    files = []
    for p in map(str, [paths] if isinstance(paths, (str, os.PathLike)) else paths):
        if os.path.exists(p) or not any(c in p for c in "*?["):  # "data[1].txt" that exists is a file name
            found = _data_files(p) if os.path.isdir(p) else [p]
        else:
            found = [f for m in sorted(glob.glob(p, recursive=True)) for f in (_data_files(m) if os.path.isdir(m)
                     else [m] if m.lower().endswith(DATA_SUFFIXES) else [])]
        if not found:
            raise ValueError(f"--data {p}: no .txt or .jsonl file there; pass files, folders or globs of UTF-8 text")
        files += found
    return list(dict.fromkeys(files))


def scan_source(path, memo_dir=None):
    """Read a file through a block at a time (memory stays flat): size, SHA-256, characters, resume marks.

    Raises FileNotFoundError / ValueError saying what to do: missing file, empty text, bytes that are
    not UTF-8 (file and byte offset), a .jsonl line that is not JSON or has no "text" (file and line).
    With `memo_dir` the result is kept there and reused while the file keeps its size and modification
    time, as make and git trust them: a second run on a 1 GB corpus starts in seconds, not half a minute."""
    path = Path(path)
    if not path.exists() and path.name == DEFAULT_CORPUS:
        print(f"{path} not found: downloading Tiny Shakespeare (1.1 MB) …")
        fetch_tiny_shakespeare(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found: pass --data PATH to a UTF-8 text file")
    memo = memo_dir and Path(memo_dir) / f"scan-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]}.json"
    stat, scanned_at = path.stat(), time.time_ns()
    try:
        saved = json.loads(memo.read_text(encoding="utf-8")) if memo else None
    except (OSError, ValueError):
        saved = None
    if saved and saved["stamp"] == [stat.st_size, stat.st_mtime_ns]:
        return Source(str(path), saved["bytes"], saved["sha256"], saved["chars"], tuple(map(tuple, saved["marks"])))
    digest, size, chars, marks, blank = hashlib.sha256(), 0, 0, [(0, 0)], True
    with open(path, "rb") as f:
        for raw, text in _blocks(f, path):
            digest.update(raw)
            size, chars = size + len(raw), chars + len(text)
            blank = blank and (not text or text.isspace())
            if chars - marks[-1][1] >= BLOCK_BYTES:
                marks.append((size, chars))
    if blank:
        raise ValueError(f"data file {path} is empty: it needs some text to learn from")
    source = Source(str(path), size, digest.hexdigest(), chars, tuple(marks))
    # A file written in the same clock tick as the scan could change again without its time moving
    # (git's "racily clean" case): only a file older than a second is remembered.
    if memo and stat.st_mtime_ns < scanned_at - 10**9 and path.stat().st_mtime_ns == stat.st_mtime_ns:
        record = {"stamp": [stat.st_size, stat.st_mtime_ns], "bytes": size, "sha256": source.sha256, "chars": chars,
                  "marks": marks}
        atomic_write_bytes(memo, json.dumps(record).encode())
    return source


def recorded_sources(records, memo_dir=None):
    """Scan the files a run recorded in its config, each checked unchanged since (same SHA-256)."""
    sources = [scan_source(r["path"], memo_dir) for r in records]
    for source, record in zip(sources, records):
        if source.sha256 != record["sha256"]:
            raise ValueError(f"{source.path} changed since the run began (SHA-256 {source.sha256[:12]}…, the run "
                             f"recorded {record['sha256'][:12]}…): restore it, or start a new run on the new data")
    return sources


def read_source(source, start=0, end=None):
    """Characters [start, end) of a source's text, as a stream of pieces of about a block each."""
    end = source.chars if end is None else end
    if start >= end:
        return
    offset, pos = source.marks[bisect.bisect_right([c for _, c in source.marks], start) - 1]
    with open(source.path, "rb") as f:
        f.seek(offset)
        for _, text in _blocks(f, source.path, offset):
            if pos + len(text) > start:
                yield text[max(start - pos, 0):end - pos]
            pos += len(text)
            if pos >= end:
                return


def read_text(path, min_chars=2):
    """A whole text file (or a .jsonl file's texts), checked as `scan_source` does and to hold
    `min_chars` characters (one block plus its target); the default corpus is fetched when missing."""
    text = "".join(read_source(scan_source(path)))
    if len(text) < min_chars:
        raise ValueError(f"data file {path} has {len(text)} characters, fewer than one block needs "
                         f"({min_chars}); use more text or a smaller --block-size")
    return text


def split_text(text, fractions=SPLITS):
    """Cut the text into contiguous train / val / test parts by characters.

    >>> split_text("abcdefghijklmnopqrst")
    ('abcdefghijklmnopqr', 's', 't')
    """
    return tuple(text[a:b] for a, b in split_bounds(len(text), fractions))


def split_bounds(n, fractions=SPLITS):
    """(start, end) of train, val and test in a text of n characters.

    >>> split_bounds(20)
    ((0, 18), (18, 19), (19, 20))
    """
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return (0, a), (a, b), (b, n)


def split_parts(sources, part):
    """Part `part` (0 train, 1 val, 2 test) of every source, in --data order: [(source, start, end)]."""
    return [(s, *split_bounds(s.chars)[part]) for s in sources]


def parts_text(parts):
    """The text of some parts one after the other, as a stream of pieces."""
    for source, start, end in parts:
        yield from read_source(source, start, end)


def sample_text(parts, limit=TOKENIZER_SAMPLE_CHARS, windows=SAMPLE_WINDOWS):
    """What a tokenizer learns from: all of `parts` up to `limit` characters, else `windows` stretches of
    limit/windows characters at evenly spaced points of the whole (cut short where a part ends)."""
    total = sum(end - start for _, start, end in parts)
    if total <= limit:
        return "".join(parts_text(parts))
    pieces, before = [], 0
    for source, start, end in parts:
        for w in range(windows):
            at = w * total // windows - before  # window w's start, as an offset into this part
            if 0 <= at < end - start:
                pieces += read_source(source, start + at, min(start + at + limit // windows, end))
        before += end - start
    return "".join(pieces)


def safe_cut(text, start=0):
    """The index just after the first newline at or after `start` that a non-space character follows (0: none).
    No tokenizer here makes one token across such a point (BPE's split pattern ends a piece at a newline
    before a word; sentencepiece keeps "\n" a piece of its own), so chunks cut there encode to the ids
    of the whole text: test_dataset checks this for char, bpe and spm."""
    i = text.find("\n", start)
    while 0 <= i < len(text) - 1:
        if not text[i + 1].isspace():
            return i + 1
        i = text.find("\n", i + 1)
    return 0


def text_chunks(pieces, size=CHUNK_CHARS):
    """Regroup a stream of text into chunks of at least `size` characters (the last may be shorter),
    each cut by `safe_cut`. A stretch with no such cut grows until one comes (looked for at each doubling)."""
    held, length, need = [], 0, size
    for piece in pieces:
        held.append(piece)
        length += len(piece)
        if length >= need:
            text, done = "".join(held), 0
            while cut := safe_cut(text, done + size):
                yield text[done:cut]
                done = cut
            held, length = [text[done:]], len(text) - done
            need = max(size, 2 * length)
    if length:
        yield "".join(held)


def tokenizer_bytes(tok):
    """The tokenizer's saved file (two tokenizers that save alike encode alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(Path(tmp) / "tok")
        return (Path(tmp) / "tok").read_bytes()


_worker = {}  # a worker process's tokenizer and dtype


def _start_worker(cls, saved, dtype):
    """Load the tokenizer from its saved bytes: the class and the bytes pickle under any start method."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tok").write_bytes(saved)
        _worker.update(tok=cls.load(Path(tmp) / "tok"), dtype=dtype)


def _encode_in_worker(text):
    return np.asarray(_worker["tok"].encode(text), dtype=_worker["dtype"]).tobytes()


def encoded_chunks(chunks, tok, dtype, workers=1):
    """(characters, ids as bytes) of each chunk, in order: in this process when workers <= 1, else on
    `workers` processes with two chunks each in flight at most, so memory holds a few chunks, never the corpus."""
    if workers <= 1:
        yield from ((len(c), np.asarray(tok.encode(c), dtype=dtype).tobytes()) for c in chunks)
        return
    with multiprocessing.get_context().Pool(workers, _start_worker, (type(tok), tokenizer_bytes(tok), dtype)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append((len(chunk), pool.apply_async(_encode_in_worker, (chunk,))))
            if len(pending) >= 2 * workers:
                n, ids = pending.popleft()
                yield n, ids.get()
        yield from ((n, ids.get()) for n, ids in pending)


def npy_header(dtype, n):
    """The .npy header of n items, 128 bytes whatever n (numpy pads it): the ids follow a placeholder
    as they come and the true header overwrites it at the end."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": (n,)})
    assert len(buf.getvalue()) == 128, "numpy changed its header padding"
    return buf.getvalue()


def write_ids(path, pieces, tok, total_chars, workers=1):
    """Tokenize a stream of text into the .npy at `path` (uint16 if the vocabulary fits, else uint32), with a
    progress bar; written under a temporary name, renamed when complete: a kill leaves no finished-looking file."""
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)

    def write(tmp):
        with open(tmp, "wb") as f, tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing",
                                        disable=total_chars < 8 * CHUNK_CHARS) as bar:
            f.write(npy_header(dtype, 0))
            for n_chars, ids in encoded_chunks(text_chunks(pieces, CHUNK_CHARS), tok, dtype, workers):
                f.write(ids)
                bar.update(n_chars)
            count = (f.tell() - 128) // dtype.itemsize
            f.seek(0)
            f.write(npy_header(dtype, count))

    atomic_write(path, write)


def _cached(path, make):
    if path.exists():
        try:
            return np.load(path, mmap_mode="r")
        except ValueError:
            path.unlink()  # a damaged cache file is re-made, never trusted
    make(path)
    return np.load(path, mmap_mode="r")


def parts_key(parts):
    """What names some parts of the data: each one's source SHA-256 and character range."""
    return "".join(f"{s.sha256}:{a}:{b};" for s, a, b in parts).encode()


def encode_parts(parts, tok, cache_dir=CACHE_DIR, workers=1):
    """Encode the text of `parts` once, streaming, into a read-only 1-D memmap of ids. The key is
    `parts_key` plus the tokenizer file's hash: a second run on the same data encodes nothing."""
    key = parts_key(parts) + tokenizer_bytes(tok)
    path = Path(cache_dir) / f"{hashlib.sha256(key).hexdigest()[:24]}.npy"
    total = sum(end - start for _, start, end in parts)
    return _cached(path, lambda p: write_ids(p, parts_text(parts), tok, total, workers))


def encode_cached(text, tok, cache_dir=CACHE_DIR, workers=1):
    """`encode_parts` for a text in memory: the key is the hash of the text and of the tokenizer file."""
    key = hashlib.sha256(text.encode("utf-8") + tokenizer_bytes(tok)).hexdigest()[:24]
    return _cached(Path(cache_dir) / f"{key}.npy", lambda p: write_ids(p, [text], tok, len(text), workers))


def as_tensor(ids):
    """Token ids as a 1-D int32 tensor (half the memory of int64; batches are widened)."""
    return torch.from_numpy(np.asarray(ids, dtype=np.int32))


def get_batch(data, block_size, batch_size, generator=None, device="cpu"):
    """A random-offset batch: x (B, T) and y = x shifted by one, both int64.

    One gather per batch, no Python loop over positions; a numpy memmap `data` is read in place.
    """
    if len(data) < block_size + 1:
        raise ValueError(f"{len(data)} tokens are fewer than one block needs ({block_size + 1}); "
                         f"use more text or a smaller --block-size")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size + 1)  # (T+1,)
    index = starts[:, None] + offsets  # (B, 1) + (T+1,) -> (B, T+1)
    window = torch.from_numpy(data[index.numpy()].astype(np.int64)) if isinstance(data, np.ndarray) \
        else data[index].long()
    x, y = window[:, :-1], window[:, 1:]  # (B, T) each: y is x shifted by one
    if device != "cpu":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def default_workers():
    """DataLoader workers: one per core, leaving one core to the training process."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


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
