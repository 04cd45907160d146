"""Stage 26 — cleaning: tidy a corpus before a model ever reads it.

A model learns whatever its text holds, noise and repeats included, so a few
cheap rules run over every line first, in this order, each one switchable:

    1. Unicode NFKC      full-width "ＡＢＣ１２３" -> "ABC123", half-width "ｶﾅ" -> "カナ"
    2. strip             spaces and tabs at both ends go (the full-width space too)
    3. short lines       lines with fewer than `min_chars` characters go (1: empty lines)
    4. de-duplication    a line equal to an earlier one (after 1 and 2) goes
    5. language          lines whose script says another language go

The language comes from the script of the letters, counted with one lookup
table over a whole batch of lines at once (numpy), so nothing is downloaded
and cleaning runs at more than 10 MB/s on one core.

New since stage 16: text goes in and text comes out; the report counts what
each rule removed. Run the demo, then clean files (.txt: a line each; .jsonl:
every message's "content", or the "text" field, cut into lines):

    python clean_text.py
    python clean_text.py ja_aozora.txt dialogue_ja.jsonl --out out/clean_ja.txt --lang ja
"""
import argparse
import json
import os
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from char_tokenizer import replace_unencodable_output

LANGUAGES = ("ja", "en", "other")
NOT_LETTER, JAPANESE, LATIN, OTHER = range(4)  # the script classes the table assigns
JAPANESE_WORDS = {"HIRAGANA", "KATAKANA", "KANA", "MASU", "CJK", "IDEOGRAPHIC"}  # in the names of kana, kanji, 々
RARE_KANJI = (0x20000, 0x3FFFF)  # CJK extensions B and later, above the BMP: kanji throughout
# Why 2.5: a word is about 2 characters in Japanese and about 5 letters in English, so one
# Japanese character weighs as much as 2.5 Latin letters. A line is "ja" when its Japanese
# characters, so weighted, are at least its Latin letters and its letters of other scripts
# (Cyrillic, Hangul, ...): when at least about half its words are Japanese. "私はiPhone派です"
# (5 kana/kanji = 12.5 against 6) is ja; "I ate 寿司 in Tokyo" (2 = 5 against 11) is en.
# Otherwise "en" when Latin letters are at least the other letters, else "other" (also: no letters).
# Script alone has limits: French or German come out "en", and Chinese, written in kanji
# without kana, comes out "ja" (kana would tell, but Japanese titles, dates and lists often lack it).
JAPANESE_WEIGHT = 2.5
BATCH_LINES = 4096  # lines classified per numpy call: large enough to be fast, small enough to stay flat
CHUNK_BYTES = 1 << 20  # read and decode files a megabyte at a time: fast, and memory stays flat


def script_of(char):
    """The script class of one character, read off its Unicode name: "HIRAGANA LETTER A" is JAPANESE,
    "FULLWIDTH LATIN CAPITAL LETTER A" is LATIN, "CYRILLIC SMALL LETTER A" is OTHER, "DIGIT ONE" NOT_LETTER."""
    if not char.isalpha():
        return NOT_LETTER
    words = set(unicodedata.name(char, "").replace("-", " ").split())
    if words & JAPANESE_WORDS:
        return JAPANESE
    return LATIN if "LATIN" in words else OTHER


def script_table():
    """uint8 array: the script class of every code point up to the rare kanji planes (the last entry: above).

    The Basic Multilingual Plane (the first 65,536 code points) holds nearly every character in use;
    above it, emoji and rare letters stay NOT_LETTER, except the rare kanji. Built once, in ~50 ms.
    """
    table = np.zeros(RARE_KANJI[1] + 2, np.uint8)
    table[:0x10000] = [script_of(chr(cp)) for cp in range(0x10000)]
    table[RARE_KANJI[0]:RARE_KANJI[1] + 1] = JAPANESE
    return table


SCRIPT_OF = script_table()


def script_counts(lines):
    """Letters per script in each line: int array (N, 4), columns NOT_LETTER, JAPANESE, LATIN, OTHER.

    >>> script_counts(["abc あ", "１"]).tolist()
    [[1, 1, 3, 0], [1, 0, 0, 0]]
    """
    code_points = np.frombuffer("".join(lines).encode("utf-32-le", "surrogatepass"), np.uint32)  # (chars,)
    scripts = SCRIPT_OF[np.minimum(code_points, len(SCRIPT_OF) - 1)]  # (chars,) one class per character
    owner = np.repeat(np.arange(len(lines)), [len(line) for line in lines])  # (chars,) the line of each character
    return np.bincount(owner * 4 + scripts, minlength=4 * len(lines)).reshape(len(lines), 4)  # (N*4,) -> (N, 4)


def detect_languages(lines):
    """The language of every line, "ja" | "en" | "other", by the weighted script ratio (see JAPANESE_WEIGHT)."""
    counts = script_counts(lines)
    japanese, latin, other = JAPANESE_WEIGHT * counts[:, JAPANESE], counts[:, LATIN], counts[:, OTHER]
    is_ja = (japanese > 0) & (japanese >= latin) & (japanese >= other)
    is_en = ~is_ja & (latin > 0) & (latin >= other)
    return np.where(is_ja, "ja", np.where(is_en, "en", "other")).tolist()


def detect_language(text):
    """"ja", "en" or "other" for one line: detect_language("吾輩は猫である") == "ja"."""
    return detect_languages([text])[0]


def new_report():
    """The counters clean_stream fills: lines in and out, what each rule removed, languages seen."""
    return {"lines_in": 0, "lines_out": 0, "removed_short": 0, "removed_duplicate": 0, "removed_language": 0,
            "languages": dict.fromkeys(LANGUAGES, 0)}


def clean_stream(lines, report, *, nfkc=True, strip=True, min_chars=1, dedup=True, languages=None, seen=None):
    """Yield the lines of `lines` that pass every rule, counting into `report` (from new_report()).

    Lazy in and out, so a file of any size streams through. "languages" in the report
    counts the lines that reached the language rule (those that passed rules 1–4).
    `seen` carries the de-duplication memory from one call to the next (several files).
    """
    if min_chars < 0:
        raise ValueError(f"min_chars is {min_chars}: use 0 to keep every line, or more to drop short ones")
    unknown = set(languages or ()) - set(LANGUAGES)
    if unknown:
        raise ValueError(f"unknown language {sorted(unknown)[0]!r}: choose from {', '.join(LANGUAGES)}")
    # De-duplication remembers Python's 64-bit hash of each line, not the line: ~70 bytes per
    # distinct line however long the line is. An 8-byte blake2b digest would take as much room
    # and ten times the time (2 µs a line). Two different lines share a hash with probability
    # ~n²/2^65 (1 in 4,000 for 100 million lines), and then one would be dropped wrongly.
    # The hash is salted per process, which is fine: the set lives only for this run.
    seen, batch = set() if seen is None else seen, []
    for line in lines:
        if nfkc:
            line = unicodedata.normalize("NFKC", line)
        if strip:
            line = line.strip()
        if len(line) < min_chars:
            report["lines_in"] += 1
            report["removed_short"] += 1
            continue
        if dedup:
            key = hash(line)
            if key in seen:
                report["lines_in"] += 1
                report["removed_duplicate"] += 1
                continue
            seen.add(key)
        batch.append(line)
        if len(batch) == BATCH_LINES:
            yield from language_rule(batch, report, languages)
            batch = []
    yield from language_rule(batch, report, languages)


def language_rule(batch, report, languages):
    """Rule 5 on a batch of lines that passed rules 1–4: count their languages, return the lines kept."""
    found = detect_languages(batch)
    for language, n in Counter(found).items():
        report["languages"][language] += n
    kept = batch if languages is None else [line for line, lang in zip(batch, found) if lang in languages]
    report["lines_in"] += len(batch)
    report["lines_out"] += len(kept)
    report["removed_language"] += len(batch) - len(kept)
    return kept


def clean_lines(lines, *, nfkc=True, strip=True, min_chars=1, dedup=True, languages=None):
    """Clean a list of lines in memory: returns (kept_lines, report).

    >>> clean_lines(["ＡＢＣ", " ABC ", "", "x"], min_chars=2)[0]
    ['ABC']
    """
    report = new_report()
    kept = list(clean_stream(lines, report, nfkc=nfkc, strip=strip, min_chars=min_chars, dedup=dedup,
                             languages=languages))
    return kept, report


def record_texts(line, where):
    """The texts of one JSONL line: every message's "content", or the "text"; none for a blank line."""
    if not line.strip():
        return []
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg}, column {e.colno})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                          for m in messages):
        return [m["content"] for m in messages]
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return [record["text"]]
    raise ValueError(f'{where}: expected {{"messages": [{{"role": ..., "content": "..."}}, ...]}} '
                     f'or {{"text": "..."}}')


def read_lines(path, advance=lambda n_bytes: None):
    """Yield the text lines of one file, reading about a megabyte of it at a time; `advance` hears the bytes read.

    .jsonl: the texts of each record (record_texts), cut at newlines; any other file: its lines.
    Bad input raises ValueError naming the file and the byte offset (not UTF-8) or line (not JSON).
    """
    path, offset, number = Path(path), 0, 0  # bytes and lines before the current chunk
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.readlines(CHUNK_BYTES), []):  # whole lines, about CHUNK_BYTES of them
            data = b"".join(chunk)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = number + data.count(b"\n", 0, e.start) + 1
                raise ValueError(f"{path}: not UTF-8 at byte {offset + e.start} (line {line}); "
                                 "convert it first, e.g. iconv -f SHIFT_JIS -t UTF-8") from None
            if offset == 0:
                text = text.removeprefix("\ufeff")  # a byte-order mark is not text
            lines = text.replace("\r\n", "\n").split("\n")
            if lines[-1] == "":  # the chunk ends at a newline: nothing after it
                lines.pop()
            if path.suffix.lower() == ".jsonl":
                for i, line in enumerate(lines, number + 1):
                    for record in record_texts(line, f"{path} line {i}"):
                        yield from record.split("\n")
            else:
                yield from lines
            offset, number = offset + len(data), number + len(chunk)
            advance(len(data))


def clean_files(paths, out, *, progress=True, **options):
    """Clean the files `paths`, in order, into the text file `out` (a line each); returns the report.

    `options` are clean_lines's. The output appears whole or not at all: it is written to a
    temporary file that replaces `out` only at the end. A file that cleaning leaves empty is an error
    (saying which rules removed its lines): it was named to be learned from.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (inputs are .txt or .jsonl files)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    report = new_report()
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f, \
                tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
                     disable=None if progress else True, desc="cleaning") as bar:  # None: on a terminal only
            seen = set()
            for path in paths:
                before = {k: v for k, v in report.items() if k != "languages"}
                for line in clean_stream(read_lines(path, bar.update), report, seen=seen, **options):
                    f.write(line + "\n")
                if report["lines_out"] == before["lines_out"]:
                    n, short, repeats, language = (report[k] - before[k] for k in (
                        "lines_in", "removed_short", "removed_duplicate", "removed_language"))
                    raise ValueError(f"{path}: cleaning kept none of its {n} lines ({short} too short, {repeats} "
                                     f"repeats, {language} in another language); relax --min-chars or --lang, "
                                     f"or leave the file out")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return report


def format_report(report):
    """The report as aligned lines, for people."""
    langs = ", ".join(f"{k} {v}" for k, v in report["languages"].items())
    return "\n".join([f"{k:18s} {v}" for k, v in report.items() if k != "languages"] + [f"{'languages':18s} {langs}"])


def build_parser():
    p = argparse.ArgumentParser(description="Clean text files into one: NFKC, strip, drop short lines, "
                                "drop repeats, keep chosen languages. No input files: run the demo.")
    p.add_argument("inputs", nargs="*", metavar="IN",
                   help='.txt (a line each) or .jsonl (message "content"s or "text", cut into lines)')
    p.add_argument("--out", help="the text file to write, a kept line each")
    p.add_argument("--lang", nargs="+", choices=LANGUAGES, help="keep only these languages (default: all)")
    p.add_argument("--min-chars", type=int, default=1,
                   help="drop lines shorter than this after NFKC and strip (default: %(default)s, empty lines)")
    p.add_argument("--no-nfkc", action="store_true", help="keep the text's own Unicode forms")
    p.add_argument("--no-strip", action="store_true", help="keep spaces at the ends of lines")
    p.add_argument("--no-dedup", action="store_true", help="keep repeated lines")
    return p


def main(argv=None):
    replace_unencodable_output()
    args = build_parser().parse_args(argv)
    if not args.inputs and not args.out:
        _demo()
        return
    try:
        if not args.inputs or not args.out:
            raise ValueError("give input files and --out: python clean_text.py IN [IN ...] --out OUT")
        start = time.perf_counter()
        report = clean_files(args.inputs, args.out, nfkc=not args.no_nfkc, strip=not args.no_strip,
                             min_chars=args.min_chars, dedup=not args.no_dedup, languages=args.lang)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    seconds = time.perf_counter() - start
    size = sum(Path(p).stat().st_size for p in args.inputs) / 1e6
    print(format_report(report))
    print(f"wrote {args.out}: {size:.1f} MB read in {seconds:.1f} s ({size / max(seconds, 1e-9):.1f} MB/s)")


DEMO_LINES = [
    "ＡＢＣ１２３ is written full-width",  # NFKC: ABC123
    "ｶﾀｶﾅ is half-width katakana",  # NFKC: カタカナ
    "   Hello, world!\t",  # strip
    "Hello, world!",  # a repeat once stripped
    "ok",  # short
    "吾輩は猫である。名前はまだ無い。",  # ja
    "今日はPythonの勉強をした。",  # mixed, mostly Japanese
    "I ate 寿司 in Tokyo.",  # mixed, mostly English
    "Привет, мир!",  # Cyrillic: other
    "12345 !!!",  # no letters: other
]


def _demo():
    print("detect_language on handmade lines:")
    for line in DEMO_LINES:
        print(f"  {detect_language(line):5s} {line!r}")
    steps = [("1. NFKC", dict(strip=False, min_chars=0, dedup=False)),
             ("2. + strip", dict(min_chars=0, dedup=False)),
             ("3. + drop lines under 3 characters", dict(min_chars=3, dedup=False)),
             ("4. + drop repeats", dict(min_chars=3)),
             ("5. + keep only ja and en", dict(min_chars=3, languages=("ja", "en")))]
    before = DEMO_LINES
    for name, options in steps:
        kept, report = clean_lines(DEMO_LINES, **options)
        print(f"\n{name}: {len(kept)} of {len(DEMO_LINES)} lines kept")
        if len(kept) == len(before):
            for old, new in zip(before, kept):
                if old != new:
                    print(f"  changed {old!r} -> {new!r}")
        else:
            left, removed = Counter(before) - Counter(kept), []
            for line in before:  # the removed lines in their order, a repeat once per removal
                if left[line]:
                    removed.append(line)
                    left[line] -= 1
            print("  removed " + ", ".join(map(repr, removed)))
        before = kept
    print("\nthe report of the last step:\n" + format_report(report))


if __name__ == "__main__":
    main()
