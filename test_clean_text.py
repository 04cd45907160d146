"""Cleaning: language by script ratio, each rule and their order, and the command line end to end."""
import json
import re
import subprocess
import sys
import tracemalloc
import unicodedata
from pathlib import Path

import pytest

import clean_text
from clean_text import JAPANESE, LATIN, NOT_LETTER, OTHER, clean_files, clean_lines, detect_language, script_counts
from conftest import corpus

ROOT = Path(__file__).resolve().parent


@pytest.mark.parametrize("text, expected", [
    ("吾輩は猫である。名前はまだ無い。", "ja"),
    ("東京大学", "ja"),  # kanji only
    ("ｶﾀｶﾅ", "ja"),  # half-width katakana, before NFKC
    ("To be, or not to be", "en"),
    ("Ｈｅｌｌｏ", "en"),  # full-width Latin, before NFKC
    ("Café crème brûlée", "en"),
    ("Привет, мир", "other"),
    ("안녕하세요", "other"),
    ("12345 !!! ...", "other"),  # no letters at all
    ("😀😀😀", "other"),
    ("", "other"),
    # The weight: one Japanese character counts as 2.5 Latin letters.
    ("abあ", "ja"),  # 2.5 >= 2
    ("abcあ", "en"),  # 2.5 < 3
    ("abcdeあい", "ja"),  # 5 >= 5: a tie goes to ja
    ("今日はPythonの勉強をした。", "ja"),  # 9 kana/kanji = 22.5 against 6 letters
    ("I ate 寿司 in Tokyo.", "en"),  # 2 kanji = 5 against 11 letters
    ("Привет あ", "other"),  # 2.5 against 6 Cyrillic letters
    ("abc где", "en"),  # Latin 3 against other 3: a tie goes to en
])
def test_detect_language_on_handmade_lines(text, expected):
    assert detect_language(text) == expected


def reference_script(char):
    """The script class from Unicode block ranges, independent of the module's name-based table."""
    cp = ord(char)
    if not char.isalpha():
        return NOT_LETTER
    if 0x3000 <= cp <= 0x30FF or 0x4E00 <= cp <= 0x9FFF or 0xFF66 <= cp <= 0xFF9F:  # kana and marks, kanji
        return JAPANESE
    if char.isascii() or 0xC0 <= cp <= 0xFF or 0xFF21 <= cp <= 0xFF5A:  # ASCII, Latin-1, full-width
        return LATIN
    assert 0x0410 <= cp <= 0x044F or 0xAC00 <= cp <= 0xD7A3, char  # Cyrillic, Hangul syllables
    return OTHER


def test_script_counts_match_unicode_blocks_character_by_character():
    blocks = ((0x20, 0x7F), (0xC0, 0x100), (0x410, 0x450), (0x3000, 0x3100), (0x4E00, 0x4F00), (0xAC00, 0xAD00),
              (0xFF01, 0xFFA0))
    chars = [chr(cp) for lo, hi in blocks for cp in range(lo, hi)]
    counts = script_counts(chars + ["".join(chars)])
    assert {reference_script(c) for c in chars} == {NOT_LETTER, JAPANESE, LATIN, OTHER}
    for char, row in zip(chars, counts):
        assert row.sum() == 1 and row.argmax() == reference_script(char), char
    assert counts[-1].tolist() == counts[:-1].sum(0).tolist()  # one line holding them all: the same totals


def test_characters_above_the_bmp():
    assert script_counts(["😀𠮷a"]).tolist() == [[1, 1, 1, 0]]  # emoji: no letter; 𠮷 (U+20BB7): a kanji


def accuracy(texts, language):
    """Share of the lines of at least 10 characters (after NFKC and strip) detected as `language`."""
    lines = [t for t in (unicodedata.normalize("NFKC", t).strip() for t in texts) if len(t) >= 10]
    found = clean_text.detect_languages(lines)
    return sum(f == language for f in found) / len(lines)


def test_detection_accuracy_on_the_corpora(shakespeare, aozora):
    assert accuracy(shakespeare.splitlines(), "en") >= 0.99
    assert accuracy(aozora.splitlines(), "ja") >= 0.99


@pytest.mark.parametrize("name, language", [("dialogue_ja.jsonl", "ja"), ("dialogue_en.jsonl", "en")])
def test_detection_accuracy_on_dialogue_messages(name, language):
    with corpus(name).open(encoding="utf-8") as f:
        texts = [m["content"] for line in f for m in json.loads(line)["messages"]]
    assert accuracy(texts, language) >= 0.98


def test_nfkc_folds_width_variants():
    assert clean_lines(["ＡＢＣ１２３", "ｶﾀｶﾅ", "ﾊﾟﾝ", "①"])[0] == ["ABC123", "カタカナ", "パン", "1"]
    assert clean_lines(["ＡＢＣ１２３"], nfkc=False)[0] == ["ＡＢＣ１２３"]


def test_strip_removes_spaces_at_both_ends_only():
    assert clean_lines(["  a b\t", "\u3000全角\u3000"])[0] == ["a b", "全角"]  # U+3000: the ideographic space
    assert clean_lines(["  a b\t"], strip=False)[0] == ["  a b\t"]


def test_short_lines_are_counted_in_characters():
    kept, report = clean_lines(["", "a", "ab", "日本", "abc"], min_chars=3)
    assert kept == ["abc"] and report["removed_short"] == 4
    assert clean_lines(["", "a"], min_chars=0)[0] == ["", "a"]
    assert clean_lines(["", "a"])[0] == ["a"]  # the default, 1, drops only empty lines


def test_dedup_keeps_the_first_of_equal_lines():
    kept, report = clean_lines(["b", "a", "b", "A", "a", "b"])
    assert kept == ["b", "a", "A"] and report["removed_duplicate"] == 3
    assert clean_lines(["b", "b"], dedup=False)[0] == ["b", "b"]


def test_language_filter_and_the_report():
    lines = ["吾輩は猫である", "To be or not", "Привет", "吾輩は猫である", "", "ok"]
    kept, report = clean_lines(lines, min_chars=3, languages=["ja"])
    assert kept == ["吾輩は猫である"]
    assert report == {"lines_in": 6, "lines_out": 1, "removed_short": 2, "removed_duplicate": 1,
                      "removed_language": 2, "languages": {"ja": 1, "en": 1, "other": 1}}


def test_rules_run_in_order():
    # NFKC before dedup: the full-width line repeats the first one only once folded.
    assert clean_lines(["ABC", "ＡＢＣ"])[0] == ["ABC"]
    assert clean_lines(["ABC", "ＡＢＣ"], nfkc=False)[0] == ["ABC", "ＡＢＣ"]
    # NFKC before strip: NFKC turns the acute accent ´ into a space and a combining accent, strip drops the space.
    assert clean_lines(["´a"], strip=False)[0] == [" \u0301a"]
    assert clean_lines(["´a"])[0] == ["\u0301a"]  # strip first would leave " \u0301a"
    # Strip before the length test and before dedup.
    assert clean_lines(["  ab  "], min_chars=3)[0] == []
    assert clean_lines(["ab", " ab "])[0] == ["ab"]
    # Short before dedup, dedup before language: each removed line counts once, under the first rule.
    _, report = clean_lines(["x", "x", "Привет", "Привет"], min_chars=2, languages=["en"])
    assert (report["removed_short"], report["removed_duplicate"], report["removed_language"]) == (2, 1, 1)
    # NFKC before the language: the square symbol ㌔ is no letter, its NFKC form キロ is kana.
    assert clean_lines(["㌔ ab"], languages=["ja"])[0] == ["キロ ab"]
    assert clean_lines(["㌔ ab"], nfkc=False, languages=["ja"])[0] == []


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="min_chars"):
        clean_lines(["a"], min_chars=-1)
    with pytest.raises(ValueError, match="'fr'"):
        clean_lines(["a"], languages=["fr"])


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "clean_text.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, encoding="utf-8")


def test_cli_cleans_several_files_into_one(tmp_path):
    (tmp_path / "a.txt").write_text("ＡＢＣ\n  hello  \n\nhello\n吾輩は猫である\r\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "猫\nですね"}]})
        + "\n\n" + json.dumps({"text": "Привет"}) + "\n", encoding="utf-8")
    result = run_cli("a.txt", "b.jsonl", "--out", "out/clean.txt", "--lang", "ja", "en", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out/clean.txt").read_text(encoding="utf-8") == "ABC\nhello\n吾輩は猫である\n猫\nですね\n"
    printed = dict(line.split(None, 1) for line in result.stdout.splitlines()[:6])
    assert printed == {"lines_in": "9", "lines_out": "5", "removed_short": "1", "removed_duplicate": "2",
                       "removed_language": "1", "languages": "ja 3, en 2, other 1"}
    assert list(tmp_path.joinpath("out").iterdir()) == [tmp_path / "out/clean.txt"]  # no temporary file left


def test_cli_switches_rules_off(tmp_path):
    (tmp_path / "a.txt").write_text("ＡＢＣ\nABC\nＡＢＣ\n x \nab\n", encoding="utf-8")
    result = run_cli("a.txt", "--out", "o.txt", "--no-nfkc", "--no-dedup", "--no-strip", "--min-chars", "3",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o.txt").read_text(encoding="utf-8") == "ＡＢＣ\nABC\nＡＢＣ\n x \n"
    assert run_cli("a.txt", "--out", "o.txt", cwd=tmp_path).returncode == 0
    assert (tmp_path / "o.txt").read_text(encoding="utf-8") == "ABC\nx\nab\n"


def peak_memory_of_cleaning(tmp_path, n_lines):
    path = tmp_path / f"{n_lines}.txt"
    path.write_text("".join(f"line {i} of a file larger than a chunk\n" for i in range(n_lines)), encoding="utf-8")
    tracemalloc.start()
    report = clean_files([path], tmp_path / "out.txt", progress=False, dedup=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report["lines_out"] == n_lines
    return peak, path.stat().st_size


def test_memory_stays_flat_as_the_input_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(clean_text, "CHUNK_BYTES", 1 << 14)
    monkeypatch.setattr(clean_text, "BATCH_LINES", 128)
    small, _ = peak_memory_of_cleaning(tmp_path, 20_000)
    large, size = peak_memory_of_cleaning(tmp_path, 80_000)
    assert large < 1.5 * small and large < size / 4  # 4× the input, about the same peak


@pytest.mark.parametrize("name, data, message", [
    ("missing.txt", None, r"^error: missing\.txt: no such file"),
    ("sjis.txt", "ab\ncd\n".encode() + "日本".encode("shift_jis"), r"^error: sjis\.txt: not UTF-8 at byte 6 \(line 3\)"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"^error: bad\.jsonl line 2: not JSON"),
    ("shape.jsonl", b'{"prompt": "hi"}\n', r"^error: shape\.jsonl line 1: expected"),
    ("blank.txt", b" \n\t\n", r"^error: blank\.txt: cleaning kept none of its 2 lines \(2 too short, 0 repeats, 0 in"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, name, data, message):
    monkeypatch.chdir(tmp_path)
    if data is not None:
        (tmp_path / name).write_bytes(data)
    with pytest.raises(SystemExit) as stop:
        clean_text.main([name, "--out", "o.txt"])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    assert err.count("\n") == 1 and re.match(message, err), err
    assert not (tmp_path / "o.txt").exists() and list(tmp_path.glob(".o.txt*")) == []


def test_non_utf8_offset_counts_bytes_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(clean_text, "CHUNK_BYTES", 16)
    path = tmp_path / "late.txt"
    path.write_bytes(b"0123456789\n" * 10 + b"abc\xff\n")
    with pytest.raises(ValueError, match=r"at byte 113 \(line 11\)"):
        list(clean_text.read_lines(path))


def test_demo_shows_each_rule(capsys):
    clean_text.main([])
    out = capsys.readouterr().out
    assert "'ＡＢＣ１２３ is written full-width' -> 'ABC123 is written full-width'" in out
    assert "removed 'ok'" in out and "removed 'Hello, world!'" in out
    assert "removed 'Привет, мир!', '12345 !!!'" in out


def test_clean_files_matches_clean_lines(tmp_path):
    lines = ["ＡＢＣ", "  x", "", "x", "猫です", "ＡＢＣ"]
    (tmp_path / "a.txt").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(lines[3:]), encoding="utf-8")  # no final newline
    report = clean_files([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "o.txt", progress=False)
    kept, expected = clean_lines(lines)
    assert report == expected
    assert (tmp_path / "o.txt").read_text(encoding="utf-8").splitlines() == kept == ["ABC", "x", "猫です"]


def test_a_file_that_cleaning_leaves_empty_names_itself_and_writes_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("world\nhello\n", encoding="utf-8")  # repeats of a.txt's lines only
    with pytest.raises(ValueError, match=r"b\.txt: cleaning kept none of its 2 lines \(0 too short, 2 repeats"):
        clean_files([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "o.txt", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
