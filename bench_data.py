"""Benchmarks of the text side — tokenizers, cleaning and the streaming data pipeline — behind the README.

The same runner as bench.py (one thread, a small table each); bench.py measures the models.

    python bench_data.py --list       # what there is
    python bench_data.py data         # one benchmark (1 GB built from the shared corpora; minutes)
"""
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dataset
from bench import CORPUS, JA_CORPUS, PEAK_RSS_LAUNCHER, main, median_time, print_table, train_and_score
from bpe_tokenizer import TOKENIZER_FILES, BPETokenizer, SentencePieceTokenizer

BENCHES = {}


def bench_tokenizers():
    """Tokenizers: our BPE against sentencepiece, English and Japanese (about a minute)."""

    def read(path):  # a corpus at the repo root, else in ../shared/data
        root = Path(__file__).resolve().parent
        for p in (root / path, root.parent / "shared/data" / Path(path).name):
            if p.exists():
                return p.read_text(encoding="utf-8")
        raise FileNotFoundError(f"{path} not found: run train.py once to fetch it")

    def split(text):  # train on the first 90%, score on the last 10%
        cut = int(0.9 * len(text))
        return text[:cut], text[cut:]

    def speed(n_bytes, seconds):
        return f"{n_bytes / seconds / 1e6:.2f}"

    train, held = split(read(CORPUS))
    mb = len(held.encode("utf-8"))
    fresh, cold, warm, t1024 = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):  # each pass: train, encode once as trained, reload, encode twice
            t, bpe = median_time(lambda: BPETokenizer.train(train, 1024, verbose=False), 1)
            t1024.append(t)
            fresh.append(median_time(lambda: bpe.encode(held), 1)[0])
            bpe.save(Path(tmp, "tokenizer.json"))
            loaded = BPETokenizer.load(Path(tmp, "tokenizer.json"))
            cold.append(median_time(lambda: loaded.encode(held), 1)[0])
            warm.append(median_time(lambda: loaded.encode(held), 1)[0])
    t4096, _ = median_time(lambda: BPETokenizer.train(train, 4096, verbose=False), 3)
    ids = bpe.encode(held)
    assert bpe.decode(ids) == held
    t_dec, _ = median_time(lambda: bpe.decode(ids), 5)
    med = statistics.median
    rows = [["our BPETokenizer (GPT-4 split, pure Python)", f"{med(t1024):.2f} s",
             f"{t4096:.2f} s", f"{speed(mb, med(fresh))} as trained / {speed(mb, med(cold))}"
             f" loaded / {speed(mb, med(warm))} warm", speed(mb, t_dec),
             f"{len(held) / len(ids):.3f}"]]
    for model_type in ("bpe", "unigram"):
        t, spm = median_time(lambda: SentencePieceTokenizer.train(
            train, 1024, model_type=model_type), 3)
        t_enc, ids = median_time(lambda: spm.encode(held), 3)
        assert spm.decode(ids) == held
        t_dec, _ = median_time(lambda: spm.decode(ids), 5)
        rows.append([f"sentencepiece {model_type} (C++), lossless settings", f"{t:.2f} s", "",
                     speed(mb, t_enc), speed(mb, t_dec), f"{len(held) / len(ids):.3f}"])
    rows += [[f"{name} — quoted anchor (issue 4)", train_s, "", enc, "", cpt]
             for name, train_s, enc, cpt in [
                 ("minbpe RegexTokenizer (GPT-4 split)", "243 s", "0.43", "2.442"),
                 ("minbpe BasicTokenizer", "131 s", "0.008", "2.388"),
                 ("HF tokenizers ByteLevel BPE (Rust)", "0.41 s", "1.78", "2.257"),
                 ("sentencepiece BPE (C++), lossless settings", "0.11 s", "5.8", "2.141")]]
    print("Tiny Shakespeare: trained on the first 90%, scored on the last 10% "
          f"({mb / 1e6:.3f} MB). Encode 'as trained' = first pass of the tokenizer that was just "
          "trained; 'loaded' = first pass after loading tokenizer.json (empty chunk cache); "
          "'warm' = second pass.\n")
    print_table(["tokenizer", "train V=1024", "train V=4096", "encode MB/s", "decode MB/s",
                 "chars/token V=1024"], rows)

    ja_train, ja_held = split(read(JA_CORPUS))
    ja_mb = len(ja_held.encode("utf-8"))
    rows = []
    for name, make, anchor in [
            ("our BPE, trained on English", lambda: bpe, "2.99"),
            ("sentencepiece unigram, trained on Japanese",
             lambda: SentencePieceTokenizer.train(ja_train, 8000), "0.68"),
            ("our BPE, trained on Japanese", lambda: BPETokenizer.train(
                ja_train, 4096, verbose=False), "≈0.75")]:
        t_train, tok = median_time(make, 1)
        t_enc, ids = median_time(lambda: tok.encode(ja_held), 1)
        assert tok.decode(ids) == ja_held
        rows.append([name, tok.vocab_size, f"{t_train:.1f} s" if tok is not bpe else "(above)",
                     speed(ja_mb, t_enc), f"{len(ids) / len(ja_held):.3f}", anchor])
    print(f"\nJapanese (ja_aozora): trained on the first 90%, scored on the last 10% "
          f"({len(ja_held)} chars, {ja_mb / 1e6:.3f} MB).\n")
    print_table(["tokenizer", "vocab", "train", "encode MB/s", "tokens/char",
                 "tokens/char, quoted anchor (issue 4)"], rows)


BENCHES["tokenizers"] = bench_tokenizers


def bench_tokenizer_models(budget=90.0):
    """Bits per character of bigram-char, gpt-char, gpt-bpe and gpt-spm at equal training time."""
    runs = [("bigram, char", ["--model", "bigram", "--block-size", "128", "--batch-size", "64"]),
            ("gpt, char", ["--preset", "gpt"]),
            ("gpt, own BPE 1024", ["--preset", "gpt", "--tokenizer", "bpe", "--vocab-size", "1024"]),
            ("gpt, sentencepiece 1024", ["--preset", "gpt", "--tokenizer", "spm", "--vocab-size", "1024"])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, flags) in enumerate(runs):
            r = train_and_score([*flags, "--max-time", str(budget), "--eval-interval", "500", "--eval-iters", "10"],
                                f"{tmp}/{i}")
            rows.append([label, r["steps"], f"{r['train_tokens'] / r['train_s']:,.0f}", f"{r['loss']:.4f}",
                         f"{r['chars'] / r['tokens']:.2f}", f"{r['bits_per_char']:.4f}"])
    print(f"{budget:.0f} s of training each, one thread; scored over the last 10% of Tiny Shakespeare\n")
    print_table(["model, tokenizer", "steps", "tokens/s", "loss (nats/token)", "chars/token", "bits/char"], rows)


BENCHES["tokenizer-models"] = bench_tokenizer_models


def bench_clean(repeats=3):
    """Cleaning: lines/s and MB/s of clean_text.py on one core, and language detection accuracy."""
    import clean_text  # here, not at the top: this benchmark alone needs it
    root, rows = Path(__file__).resolve().parent, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, language in (("tiny_shakespeare.txt", "en"), ("ja_aozora.txt", "ja"),
                               ("dialogue_ja.jsonl", "ja"), ("dialogue_en.jsonl", "en")):
            path = next((p for p in (root / name, root.parent / "shared/data" / name) if p.exists()), None)
            if path is None:
                rows.append([name, "not found"] + [""] * 7)
                continue
            wall, cpu = [], []
            for _ in range(repeats):  # every rule on, keeping the corpus's own language
                w0, c0 = time.perf_counter(), time.process_time()
                report = clean_text.clean_files([path], Path(tmp, "out.txt"), progress=False, languages=[language])
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
            with path.open(encoding="utf-8") as f:  # whole message texts for .jsonl, lines for .txt
                texts = [t for line in f for t in (clean_text.record_texts(line, path) if path.suffix == ".jsonl"
                                                   else [line])]
            found = clean_text.clean_lines(texts, min_chars=10, dedup=False)[1]["languages"]  # NFKC, strip first
            misses = ", ".join(f"{k} {v}" for k, v in found.items() if k != language and v) or "none"
            mb, seconds = path.stat().st_size / 1e6, statistics.median(cpu)
            rows.append([name, f"{mb:.2f}", f"{report['lines_in']:,}", f"{report['lines_in'] / seconds:,.0f}",
                         f"{mb / seconds:.1f}", f"{mb / statistics.median(wall):.1f}", f"{report['lines_out']:,}",
                         f"{found[language] / sum(found.values()):.2%} of {sum(found.values()):,}", misses])
    print(f"clean_files, every rule on (NFKC, strip, min_chars 1, dedup, --lang the corpus's language), one process, "
          f"median of {repeats}; MB/s over the input file's bytes, per CPU second (time.process_time) and per "
          f"wall second; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Accuracy: lines "
          "(.txt) or message texts (.jsonl) of at least 10 characters after NFKC and strip, against the "
          "corpus's language.\n")
    print_table(["corpus", "MB", "lines in", "lines/s (CPU)", "MB/s (CPU)", "MB/s (wall)", "lines kept",
                 "detected as the corpus's language", "detected otherwise"], rows)
    print("\ntargets: ≥ 10 MB/s on one core; accuracy ≥ 99 % (Tiny Shakespeare, ja_aozora), ≥ 98 % (dialogue)")


BENCHES["clean"] = bench_clean


DATA_CHILD = """import json, sys, time
root, corpus, tokenizer, cache, workers, out = sys.argv[1:]
sys.path.insert(0, root)
import dataset
from bpe_tokenizer import load_tokenizer
t0 = time.perf_counter()
source = dataset.scan_source(corpus)
t1 = time.perf_counter()
ids = dataset.encode_parts([(source, 0, source.chars)], load_tokenizer(tokenizer), cache, int(workers))
with open(out, "w", encoding="utf-8") as f:
    json.dump({"scan_s": t1 - t0, "encode_s": time.perf_counter() - t1, "tokens": len(ids)}, f)
"""
def bench_data(size_mb=None, seed=0):
    """Streaming tokenization: MB/s with 1 and 2 workers, peak RSS per process, cache-ready to first step.

    The corpus (BENCH_DATA_MB, default 1000 MB) is built from the lines of tiny_shakespeare.txt and
    ja_aozora.txt, shuffled anew for each copy so it is not one file repeated.
    """
    size_mb = size_mb or float(os.environ.get("BENCH_DATA_MB", 1000))
    root = Path(__file__).resolve().parent
    lines = []
    for name in ("tiny_shakespeare.txt", "ja_aozora.txt"):
        path = next((p for p in (root / name, root.parent / "shared/data" / name) if p.exists()), None)
        if path is None:
            raise FileNotFoundError(f"{name} not found at the repo root or in ../shared/data")
        lines += path.read_text(encoding="utf-8").splitlines(keepends=True)
    rng, rows = random.Random(seed), []
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # tokenizers and token caches go to out/cache here, not into the checkout

        def measured(args, first_step=None):
            """Run `args` under the launcher: (wall seconds, peak RSS MB, seconds until `first_step` exists)."""
            t0, seen = time.perf_counter(), None
            proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS_LAUNCHER, f"{tmp}/rss.json", *args])
            while proc.poll() is None:
                if first_step and seen is None and Path(first_step).exists():
                    seen = time.perf_counter() - t0
                time.sleep(0.02)
            wall, r = time.perf_counter() - t0, json.loads(Path(tmp, "rss.json").read_text(encoding="utf-8"))
            if proc.returncode or r["code"]:
                raise subprocess.CalledProcessError(r["code"], args)
            return wall, r["rss_mb"], seen

        corpus, written = Path(tmp, "corpus.txt"), 0
        with corpus.open("w", encoding="utf-8") as f:
            while written < size_mb * 1e6:
                rng.shuffle(lines)
                copy = "".join(lines)
                f.write(copy)
                written += len(copy.encode("utf-8"))
        mb = corpus.stat().st_size / 1e6
        for kind in ("char", "bpe", "spm"):
            tok_file = Path(tmp, f"{kind}-{TOKENIZER_FILES[kind]}")  # load_tokenizer goes by the suffix
            fit = measured([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(root)!r}); import dataset, "
                            f"train; s = [dataset.scan_source({str(corpus)!r})]; train.cached_tokenizer({kind!r}, "
                            f"dataset.split_parts(s, 0), 8192)"
                            f".save({str(tok_file)!r})"])
            speeds = {}
            for workers in (1, 2):
                result = Path(tmp, f"{kind}-{workers}.json")
                _, rss, _ = measured([sys.executable, "-c", DATA_CHILD, str(root), str(corpus), str(tok_file),
                                      f"{tmp}/cache-{kind}-{workers}", str(workers), str(result)])
                r = json.loads(result.read_text(encoding="utf-8"))
                speeds[workers] = mb / r["encode_s"]
                rows.append([kind, f"{fit[0]:.0f}", f"{fit[1]:,.0f}", workers, f"{speeds[workers]:.2f}",
                             f"{r['tokens'] / (mb * 1e6):.3f}", f"{rss:,.0f}", f"{r['scan_s']:.1f}"])
            rows[-1][4] += f" ({speeds[2] / speeds[1]:.2f}×)"
        flags = [sys.executable, str(root / "train.py"), "--data", str(corpus), "--steps", "1", "--eval-iters", "1",
                 "--eval-interval", "1", "--log-interval", "1"]
        start = []
        for label in ("first run (tokenizes)", "second run (cache ready)"):
            run_dir = f"{tmp}/run{len(start)}"
            wall, rss, first_step = measured([*flags, "--out", run_dir], first_step=f"{run_dir}/metrics.jsonl")
            start.append([label, f"{first_step:.1f}", f"{wall:.1f}", f"{rss:,.0f}"])
        os.chdir(root)
    print(f"corpus: {mb:,.0f} MB of tiny_shakespeare.txt + ja_aozora.txt lines, shuffled per copy; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. fit: seconds and peak RSS to train the tokenizer "
          f"(bpe/spm on a {dataset.TOKENIZER_SAMPLE_CHARS:,}-character sample, vocabulary 8192). Peak RSS: the "
          "tokenizing process, by os.wait4; with 2 workers, the largest of it and its workers.\n")
    print_table(["tokenizer", "fit s", "fit RSS MB", "workers", "MB/s", "tokens/byte", "peak RSS MB", "scan s"], rows)
    print("\ntrain.py --steps 1 (char, gpt preset) on the corpus: seconds from launch to the first step logged, "
          "wall seconds, peak RSS:\n")
    print_table(["run", "first step s", "wall s", "peak RSS MB"], start)
    print("\ntargets: peak RSS ≤ 600 MB per process; 2 workers ≥ 1.6× one; a run starts ≤ 5 s after the cache")


BENCHES["data"] = bench_data


if __name__ == "__main__":
    main(BENCHES, __doc__)
