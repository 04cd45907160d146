import ast
import hashlib
import multiprocessing
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
from char_tokenizer import CharTokenizer
from dataset import encode_cached, get_batch, read_text, split_text
from training_loop import BlockDataset, epoch_batches

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
    stream = epoch_batches(data, 10, batch_size=4, seed=1, workers=0)
    first_epoch = [next(stream) for _ in range(4)]
    starts = sorted(int(x[i, 0]) for x, _ in first_epoch for i in range(4))
    assert starts == list(range(0, 160, 10))
    assert all(torch.equal(y, x + 1) for x, y in first_epoch)
    second_epoch = [next(stream)[0] for _ in range(4)]
    assert [int(x[0, 0]) for x in second_epoch] != [int(x[0, 0]) for x, _ in first_epoch]  # reshuffled
    resumed = epoch_batches(data, 10, batch_size=4, seed=1, start=6, workers=0)
    assert torch.equal(next(resumed)[0], second_epoch[2])  # batch 6 = the third of epoch two


def test_epoch_batches_shard_across_ranks_through_worker_processes():
    data = torch.arange(161, dtype=torch.int32)
    ranks = [epoch_batches(data, 10, batch_size=2, seed=0, rank=r, world=2, workers=1) for r in (0, 1)]
    seen = [{int(x[i, 0]) for _ in range(4) for x in [next(stream)[0]] for i in range(2)} for stream in ranks]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16


def test_the_demo_offline_without_the_corpus_says_so_in_one_line(tmp_path):
    """No corpus and no network (a proxy on a closed local port): one line naming the URL, exit 2."""
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, str(ROOT / "dataset.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120, encoding="utf-8")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert dataset.CORPUS_URL in lines[0] and "save it as tiny_shakespeare.txt" in lines[0]
    assert list(tmp_path.iterdir()) == []


# ---- many sources, streamed (issue 13) ----

def probe_files(root):
    """Three probe sources whose parts are computed by hand below."""
    (root / "a.txt").write_text("abcdefghijklmnopqrst", encoding="utf-8")  # 20 chars: 18 / 1 / 1
    (root / "b.jsonl").write_text('{"text": "0123456789"}\n\n{"text": "ABCDEFGH", "id": 2}\n',
                                  encoding="utf-8")  # "0123456789\nABCDEFGH\n": 20 chars, the blank line skipped
    (root / "sub").mkdir()
    (root / "sub" / "c.txt").write_text("猫" * 40, encoding="utf-8")  # 40 chars: 36 / 2 / 2
    (root / "sub" / "notes.md").write_text("not data", encoding="utf-8")


def test_each_source_splits_on_its_own_and_the_parts_concatenate(tmp_path):
    probe_files(tmp_path)
    sources = [dataset.scan_source(p) for p in dataset.resolve_paths([tmp_path])]
    assert [Path(s.path).name for s in sources] == ["a.txt", "b.jsonl", "c.txt"]  # sorted, notes.md left out
    assert [s.chars for s in sources] == [20, 20, 40]

    def text(part):
        return "".join(dataset.parts_text(dataset.split_parts(sources, part)))
    assert text(0) == "abcdefghijklmnopqr" + "0123456789\nABCDEFG" + "猫" * 36
    assert text(1) == "s" + "H" + "猫猫"
    assert text(2) == "t" + "\n" + "猫猫"


def test_a_source_records_its_size_and_sha256(tmp_path):
    probe_files(tmp_path)
    source = dataset.scan_source(tmp_path / "b.jsonl")
    raw = (tmp_path / "b.jsonl").read_bytes()
    assert source.record() == {"path": str(tmp_path / "b.jsonl"), "bytes": len(raw),
                               "sha256": hashlib.sha256(raw).hexdigest()}


def test_folders_globs_and_files_resolve_in_order_once(tmp_path):
    probe_files(tmp_path)
    (tmp_path / "sub" / "d.JSONL").write_text('{"text": "x"}\n', encoding="utf-8")
    found = dataset.resolve_paths([str(tmp_path / "sub"), str(tmp_path / "*.txt"), str(tmp_path / "**" / "*.txt")])
    assert found == [str(tmp_path / "sub" / "c.txt"), str(tmp_path / "sub" / "d.JSONL"), str(tmp_path / "a.txt")]
    (tmp_path / "empty").mkdir()
    for nothing in (tmp_path / "empty", tmp_path / "*.csv"):
        with pytest.raises(ValueError, match="no .txt or .jsonl file"):
            dataset.resolve_paths([nothing])


def test_a_single_file_splits_exactly_as_before(tmp_path, monkeypatch):
    """Small blocks, so that characters of three bytes straddle them and reading resumes from marks."""
    monkeypatch.setattr(dataset, "BLOCK_BYTES", 16)
    text = "".join(("吾輩は猫である。", "To be, or not\n", "  é\n")[i % 3] for i in range(300))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    source = dataset.scan_source(tmp_path / "t.txt")
    assert source.chars == len(text) and len(source.marks) > 50
    assert tuple("".join(dataset.parts_text(dataset.split_parts([source], k))) for k in range(3)) == split_text(text)
    for start, end in [(0, 1), (5, 900), (1234, 1235), (len(text) - 3, len(text)), (7, 7)]:
        assert "".join(dataset.read_source(source, start, end)) == text[start:end]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "cut\n', "bad.jsonl line 2 is not JSON"),
    ("bad.jsonl", b'{"text": "ok"}\n\n{"messages": []}\n', 'line 3 has no "text" string (found keys messages)'),
    ("bad.jsonl", b'{"text": "ok"}\n["text"]\n', 'line 2 has no "text" string (found list)'),
    ("bad.txt", b"x" * 40 + "猫".encode("shift_jis") + b"y", "bad.txt is not UTF-8: byte 0x94 at offset 40"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', "bad.jsonl is not UTF-8: byte 0xff at offset 25"),
    ("bad.txt", b"abc\xe7\x8c", "offset 3"),  # a character cut short at the end of the file
    ("bad.jsonl", b"\n \n", "empty"),
])
def test_bad_sources_say_which_file_and_where(tmp_path, monkeypatch, name, content, message):
    monkeypatch.setattr(dataset, "BLOCK_BYTES", 8)  # the offset is the file's, not the block's
    (tmp_path / "good.txt").write_text("fine text\n", encoding="utf-8")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        [dataset.scan_source(p) for p in dataset.resolve_paths([tmp_path])]


def test_the_tokenizer_sample_is_evenly_spaced_stretches(tmp_path):
    (tmp_path / "a.txt").write_text("".join(chr(65 + i % 26) for i in range(60)), encoding="utf-8")
    (tmp_path / "b.txt").write_text("".join(chr(97 + i % 26) for i in range(40)), encoding="utf-8")
    parts = [(dataset.scan_source(tmp_path / n), 0, 60 if n == "a.txt" else 40) for n in ("a.txt", "b.txt")]
    whole = (tmp_path / "a.txt").read_text(encoding="utf-8") + (tmp_path / "b.txt").read_text(encoding="utf-8")
    assert dataset.sample_text(parts, limit=100) == whole
    # 4 windows of 48 // 4 = 12 characters at 0, 25, 50 and 75 of the 100: the third is cut where a.txt ends
    assert dataset.sample_text(parts, limit=48, windows=4) == whole[0:12] + whole[25:37] + whole[50:60] + whole[75:87]
    assert dataset.sample_text(parts, limit=20, windows=3) == whole[0:6] + whole[33:39] + whole[66:72]


def mixed_corpus():
    """English and Japanese lines with the whitespace a chunk boundary could trip on."""
    rng = random.Random(0)
    words = ["the", "The", "cat's", "猫", "吾輩は", "です。", "don't", "42", "1999", "!!", "…", "▁", "é", "  ", "\t"]
    words += ["".join(rng.choice("abcdefghijklmnoprstuwy") for _ in range(rng.randrange(2, 7))) for _ in range(80)]
    lines = []
    for _ in range(600):
        line = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 9)))
        lines.append(rng.choice(["", " ", "  ", "\t"]) + line + rng.choice(["", " ", "\n", "\r"]))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", ["char", "bpe", "spm"])
def test_the_streamed_memmap_equals_encoding_the_whole_text(tmp_path, monkeypatch, kind):
    from bpe_tokenizer import train_tokenizer
    text = mixed_corpus()
    tok = train_tokenizer(kind, text, 320)
    monkeypatch.setattr(dataset, "BLOCK_BYTES", 64)
    monkeypatch.setattr(dataset, "CHUNK_CHARS", 200)
    chunks = list(dataset.text_chunks([text], 200))
    assert "".join(chunks) == text and len(chunks) > 30 and min(map(len, chunks[:-1])) >= 200
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    parts = dataset.split_parts([dataset.scan_source(tmp_path / "t.txt")], 0)
    expected = tok.encode(split_text(text)[0])
    for workers in (1, 2):
        ids = dataset.encode_parts(parts, tok, cache_dir=tmp_path / f"cache{workers}", workers=workers)
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
        assert ids.tolist() == expected


def test_a_second_encoding_of_the_same_data_tokenizes_nothing(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("hello world\n" * 50, encoding="utf-8")
    parts = dataset.split_parts([dataset.scan_source(tmp_path / "t.txt")], 0)
    tok = CharTokenizer.train("helo wrd\n")
    first = dataset.encode_parts(parts, tok, cache_dir=tmp_path)

    def no_encoding(text):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(tok, "encode", no_encoding)
    assert dataset.encode_parts(parts, tok, cache_dir=tmp_path).tolist() == first.tolist()
    (tmp_path / "t.txt").write_text("hello world\n" * 51, encoding="utf-8")  # new data: a new key, so it is encoded
    with pytest.raises(AssertionError, match="tokenized again"):
        dataset.encode_parts(dataset.split_parts([dataset.scan_source(tmp_path / "t.txt")], 0), tok,
                             cache_dir=tmp_path)


def test_a_scan_is_remembered_while_size_and_time_stay_and_never_for_a_file_written_just_now(tmp_path):
    path, memo = tmp_path / "t.txt", tmp_path / "memo"
    path.write_text("hello world\n" * 50, encoding="utf-8")
    fresh = dataset.scan_source(path, memo)
    assert not list(memo.glob("scan-*"))  # its time could still come back unchanged after an edit
    os.utime(path, (time.time() - 10,) * 2)
    scanned = dataset.scan_source(path, memo)
    assert scanned == fresh and len(list(memo.glob("scan-*"))) == 1
    stamp = path.stat().st_mtime_ns
    path.write_text("HELLO WORLD\n" * 50, encoding="utf-8")  # same size
    os.utime(path, ns=(stamp, stamp))  # and the same time: trusted, as make would
    assert dataset.scan_source(path, memo).sha256 == fresh.sha256
    os.utime(path, (time.time() - 5,) * 2)  # a new time: read again
    again = dataset.scan_source(path, memo)
    assert again.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != fresh.sha256
    assert again.marks == fresh.marks and again.chars == fresh.chars


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    tok = CharTokenizer([chr(0x20000 + i) for i in range(70_000)])
    text = chr(0x20000) + chr(0x20000 + 69_999)
    ids = encode_cached(text, tok, cache_dir=tmp_path)
    assert ids.dtype == np.uint32 and ids.tolist() == [0, 69_999]


def test_a_tokenization_killed_halfway_is_never_read_as_complete(tmp_path):
    """SIGKILL a process while it writes the cache: what it leaves is a temporary file, which a later
    run ignores, encoding afresh; a cut-short file at the final name is re-made, never trusted."""
    script = (f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport dataset\n"
              "from char_tokenizer import CharTokenizer\n"
              "class Slow(CharTokenizer):\n    def encode(self, text):\n        time.sleep(0.02)\n"
              "        return super().encode(text)\n"
              "dataset.CHUNK_CHARS = 60\ntext = 'hello world\\n' * 3000\n"
              f"dataset.encode_cached(text, Slow.train(text), cache_dir={str(tmp_path)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    for _ in range(3000):  # wait until the temporary file has ids in it
        tmp = list(tmp_path.glob(".*.tmp"))
        if tmp and tmp[0].stat().st_size > 4096 or proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert list(tmp_path.glob("*.npy")) == [] and len(list(tmp_path.glob(".*.tmp"))) == 1
    text = "hello world\n" * 3000
    tok = CharTokenizer.train(text)
    assert encode_cached(text, tok, cache_dir=tmp_path).tolist() == tok.encode(text)
    final = next(tmp_path.glob("*.npy"))
    final.write_bytes(final.read_bytes()[:1000])  # as if a copy were cut short
    assert encode_cached(text, tok, cache_dir=tmp_path).tolist() == tok.encode(text)


def test_batches_from_the_memmap_equal_batches_from_a_tensor(tmp_path):
    tok = CharTokenizer.train("abcdefgh")
    ids = encode_cached("abcdefgh" * 40, tok, cache_dir=tmp_path)
    x, y = get_batch(ids, 8, 4, torch.Generator().manual_seed(3))
    x2, y2 = get_batch(dataset.as_tensor(ids), 8, 4, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.dtype == torch.int64


def text_io_without_encoding(source):
    """Line numbers of the calls in `source` that read or write text in the platform's default encoding: a
    Path.read_text / write_text, an open() not in binary mode, or a text-mode subprocess, naming no encoding."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        method = isinstance(node.func, ast.Attribute)
        name = node.func.attr if method else getattr(node.func, "id", "")
        mode = node.args[1] if name == "open" and len(node.args) > 1 else next(
            (k.value for k in node.keywords if k.arg == "mode"), None)
        binary = isinstance(mode, ast.Constant) and "b" in mode.value
        text_run = any(k.arg in ("text", "universal_newlines") and getattr(k.value, "value", False)
                       for k in node.keywords)
        if method and name in ("read_text", "write_text") or name == "open" and not binary or text_run:
            found.append(node.lineno)
    return found


def test_the_scan_finds_text_io_in_the_locales_encoding():
    source = ('p.read_text()\np.write_text(s, encoding="utf-8")\nopen(f, "rb")\nopen(f, "w")\n'
              'subprocess.run(c, text=True)\nread_text(path)\n')
    assert text_io_without_encoding(source) == [1, 4, 5]


def test_every_text_file_is_read_and_written_as_utf8():
    """Windows' locale is cp1252 or cp932, not UTF-8: every text read or write must name its encoding."""
    found = {path.name: lines for path in sorted(ROOT.glob("*.py"))
             if (lines := text_io_without_encoding(path.read_text(encoding="utf-8")))}
    assert found == {}


def test_a_block_dataset_over_a_memmap_pickles_its_file_not_its_tokens(tmp_path):
    """What a DataLoader worker started by spawn receives: the file to map again, and the same blocks."""
    np.save(tmp_path / "ids.npy", np.arange(50_000, dtype=np.uint16))
    blocks = BlockDataset(np.load(tmp_path / "ids.npy", mmap_mode="r"), 16)
    blob = pickle.dumps(blocks)
    assert len(blob) < 1000 < len(pickle.dumps(BlockDataset(np.arange(50_000, dtype=np.uint16), 16)))
    again = pickle.loads(blob)
    assert isinstance(again.data, np.memmap) and len(again) == len(blocks)
    for i in (0, 7, len(blocks) - 1):
        assert all(torch.equal(a, b) for a, b in zip(blocks[i], again[i]))
    view = BlockDataset(np.load(tmp_path / "ids.npy", mmap_mode="r")[1000:2000], 16)  # a view: copied
    assert torch.equal(pickle.loads(pickle.dumps(view))[0][0], torch.arange(1000, 1016))


def test_the_tokenizing_pool_encodes_alike_when_its_processes_start_by_spawn(monkeypatch):
    """macOS' and Windows' start method: each worker gets the tokenizer's class and saved bytes, nothing forked."""
    from bpe_tokenizer import train_tokenizer
    text = mixed_corpus()
    tok = train_tokenizer("bpe", text, 320)
    chunks = list(dataset.text_chunks([text], 2000))
    spawn = multiprocessing.get_context("spawn")
    monkeypatch.setattr(dataset.multiprocessing, "get_context", lambda method=None: spawn)
    encoded = list(dataset.encoded_chunks(chunks, tok, np.uint16, workers=2))
    assert [n for n, _ in encoded] == [len(c) for c in chunks]
    assert b"".join(ids for _, ids in encoded) == np.asarray(tok.encode(text), dtype=np.uint16).tobytes()
