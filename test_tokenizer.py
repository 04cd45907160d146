"""Tests for every tokenizer: CharTokenizer (stage 4), BPETokenizer,
SentencePieceTokenizer and StreamDecoder (stage 16).

The BPE trainer is checked against merges worked out by hand and against a
naive trainer written here that recounts every pair before every merge.
"""
import json
from collections import Counter
from pathlib import Path

import pytest
import regex
import sentencepiece
from hypothesis import example, given, settings, strategies as st

from bpe_tokenizer import (GPT4_SPLIT_PATTERN, TOKENIZER_FILES, BPETokenizer,
                           SentencePieceTokenizer, StreamDecoder, load_tokenizer,
                           train_tokenizer)
from char_tokenizer import CharTokenizer

JA_CORPUS = Path(__file__).resolve().parent.parent / "shared/data/ja_aozora.txt"

ENGLISH = """\
The river rose in the night, and by morning the lower town was under water.
People carried what they could up the hill: chairs, bread, a cat in a basket,
the baker's ledger wrapped in oilcloth. Nobody spoke much. The old ferryman
said he had seen it happen twice before, in 1911 and in 1953, and that the
water would fall again in three days. It fell in four. When it was gone the
streets were brown with mud, and the children found fish in the church.
""" * 3 + "Numbers 0123456789, quotes 'it's', \"they'll\", tabs\tand  double  spaces.\n"

# Japanese: every character is 2-4 UTF-8 bytes, none of them seen in ENGLISH.
JAPANESE = "吾輩は猫である。名前はまだ無い。\n（全角の括弧）と　全角スペース、絵文字😀も。"

unicode_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)))  # no lone surrogates
TRICKY = "e\u0301 👩‍👩‍👧 猫\x00\x1b\r\n\u2581\ufeff<|eos|>"  # combining, ZWJ emoji, controls, ▁


def naive_merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if ids[i:i + 2] == list(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_bpe(text, n_merges, pattern):
    """The textbook trainer: recount all pairs before every merge (slow, obvious)."""
    chunks = [list(c.encode("utf-8")) for c in (regex.findall(pattern, text) if pattern else [text])]
    merges = []
    for new_id in range(256, 256 + n_merges):
        counts = Counter(p for c in chunks for p in zip(c, c[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest
        chunks = [naive_merge(c, pair, new_id) for c in chunks]
        merges.append(pair)
    return merges, [i for c in chunks for i in c]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(ENGLISH, vocab_size=256 + 120 + 3, verbose=False)


@pytest.fixture(scope="module")
def spm():
    return SentencePieceTokenizer.train(ENGLISH, vocab_size=320)


@pytest.fixture(scope="module")
def ja_text():
    if not JA_CORPUS.exists():
        pytest.skip(f"{JA_CORPUS} not found")
    text = JA_CORPUS.read_text(encoding="utf-8")
    return text[:100_000], text[-20_000:]


@pytest.fixture(scope="module")
def spm_ja(ja_text):
    return SentencePieceTokenizer.train(ja_text[0], vocab_size=3000)


def stream(tok, ids):
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


# ---- CharTokenizer -------------------------------------------------------

def test_char_round_trip_unknown_and_save_load(tmp_path):
    tok = CharTokenizer.train(ENGLISH)
    assert tok.decode(tok.encode(ENGLISH)) == ENGLISH
    assert tok.encode("猫") == [tok.unk_id] and tok.decode([tok.unk_id]) == "\ufffd"
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, CharTokenizer) and again.encode(ENGLISH) == tok.encode(ENGLISH)


# ---- BPE ------------------------------------------------------------------

def test_bpe_hand_worked_example():
    # "aaabdaaabac" as bytes a=97 b=98 c=99 d=100, no split, no specials:
    #   pairs: aa x4, ab x2, bd, da, ba, ac x1       -> merge (a, a) = 256
    #   256 a b d 256 a b a c: (256, a) x2, (a, b) x2 -> tie, smaller pair (97, 98) = 257
    #   256 257 d 256 257 a c: (256, 257) x2          -> merge (256, 257) = 258
    #   258 d 258 a c
    tok = BPETokenizer.train("aaabdaaabac", 259, pattern=None, special_tokens=(), verbose=False)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.vocab[258] == b"aaab"
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert BPETokenizer(tok.merges, None, ()).encode("aaabdaaabac") == [258, 100, 258, 97, 99]


@pytest.mark.parametrize("pattern", [GPT4_SPLIT_PATTERN, None])
def test_bpe_matches_naive_trainer(pattern):
    text = ENGLISH[:700] + JAPANESE * 2 + "aaaa bbbb aaaaaaa abababab\n\n\n"
    tok = BPETokenizer.train(text, 256 + 60, pattern=pattern, special_tokens=(), verbose=False)
    merges, ids = naive_bpe(text, 60, pattern)
    assert tok.merges == merges
    assert tok.encode(text) == ids  # chunks cached during training
    assert BPETokenizer(merges, pattern, ()).encode(text) == ids  # cold: merges by rank


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="aab \n.é", max_size=40), st.integers(1, 12))
def test_bpe_incremental_counts_equal_recount(text, n_merges):
    tok = BPETokenizer.train(text, 256 + n_merges, special_tokens=(), verbose=False)
    merges, ids = naive_bpe(text, n_merges, GPT4_SPLIT_PATTERN)
    assert tok.merges == merges
    assert BPETokenizer(merges, special_tokens=()).encode(text) == ids


def test_bpe_vocab_size_counts_specials(bpe):
    assert bpe.vocab_size == 256 + 120 + 3 == len(bpe.merges) + 256 + 3
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (376, 377, 378)
    assert bpe.unk_id is None
    with pytest.raises(ValueError, match="at least 259"):
        BPETokenizer.train(ENGLISH, 258, verbose=False)


def test_bpe_compresses_training_text(bpe):
    ids = bpe.encode(ENGLISH)
    assert len(ids) <= len(ENGLISH.encode("utf-8")) / 2
    assert bpe.decode(ids) == ENGLISH


@settings(max_examples=300, deadline=None)
@given(unicode_text)
@example("")
@example(TRICKY)
def test_bpe_exact_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))
    assert all(0 <= i < 256 + len(bpe.merges) for i in ids)  # never a special id


def test_bpe_special_tokens_only_when_allowed(bpe):
    text = "<|bos|>Hello<|eos|><|pad|>"
    plain = bpe.encode(text)
    assert not set(plain) & {bpe.bos_id, bpe.eos_id, bpe.pad_id}
    assert bpe.decode(plain) == text
    ids = bpe.encode(text, allowed_special="all")
    assert ids[0] == bpe.bos_id and ids[-2:] == [bpe.eos_id, bpe.pad_id]
    assert ids[1:-2] == bpe.encode("Hello")
    only_eos = bpe.encode(text, allowed_special={"<|eos|>"})
    assert only_eos.count(bpe.eos_id) == 1 and bpe.bos_id not in only_eos
    assert bpe.decode(ids) == text


def test_bpe_save_load_identical(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["kind"] == "bpe" and data["vocab"][32] == " " and len(data["merges"]) == 120
    for again in (BPETokenizer.load(path), load_tokenizer(path), load_tokenizer(tmp_path)):
        assert again.merges == bpe.merges and again.special_tokens == bpe.special_tokens
        assert again.encode(ENGLISH + JAPANESE) == bpe.encode(ENGLISH + JAPANESE)


def test_stream_decoder_bpe_japanese(bpe):
    ids = bpe.encode(JAPANESE)
    assert len(ids) > len(JAPANESE)  # English merges: Japanese stays in byte tokens
    pieces, tail = stream(bpe, ids)
    assert "".join(pieces) + tail == bpe.decode(ids) == JAPANESE
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # held back, then completed


def test_stream_decoder_flushes_incomplete_tail(bpe):
    ids = bpe.encode("猫")[:2]  # two of the three bytes
    pieces, tail = stream(bpe, ids)
    assert pieces == ["", ""] and tail == "\ufffd" == bpe.decode(ids)


# ---- sentencepiece ---------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(unicode_text)
@example("")
@example(TRICKY)
def test_spm_exact_round_trip(spm, text):
    assert spm.decode(spm.encode(text)) == text


def test_spm_lossless_whitespace_and_specials(spm):
    text = "  two leading spaces\n\n\ttab, full-width （） and \u2581 the meta symbol  \n"
    ids = spm.encode(text)
    assert spm.decode(ids) == text
    assert spm.sp.decode(spm.sp.encode("a  b\nc（")) == "a  b\nc（"  # settings, not our wrapper
    assert spm.bos_id is not None and spm.eos_id is not None and spm.pad_id is None
    assert not {spm.bos_id, spm.eos_id} & set(spm.encode("<s>hi</s>"))


def test_spm_save_load_identical(spm, tmp_path):
    spm.save(tmp_path / "tokenizer.model")
    again = load_tokenizer(tmp_path / "tokenizer.model")
    assert isinstance(again, SentencePieceTokenizer) and again.vocab_size == 320
    assert again.encode(ENGLISH + JAPANESE) == spm.encode(ENGLISH + JAPANESE)


def test_stream_decoder_spm_byte_fallback(spm):
    ids = spm.encode(JAPANESE)
    pieces, tail = stream(spm, ids)
    assert "".join(pieces) + tail == spm.decode(ids) == JAPANESE
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # byte pieces held back


def test_spm_japanese_round_trip(spm_ja, ja_text):
    held_out = ja_text[1] + "\n（括弧）　全角  半角スペース二つ\n\n"
    ids = spm_ja.encode(held_out)
    assert spm_ja.decode(ids) == held_out
    assert spm_ja.sp.decode(ids) == held_out  # the library's own decoder agrees
    assert len(ids) < len(held_out)  # real pieces, not bytes
    pieces, tail = stream(spm_ja, ids)
    assert "".join(pieces) + tail == held_out and "\ufffd" not in "".join(pieces)


def test_spm_refuses_a_lossy_model(tmp_path):
    (tmp_path / "text.txt").write_text(ENGLISH, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(  # the library's defaults: lossy
        input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "lossy"),
        vocab_size=100, minloglevel=2)
    with pytest.raises(ValueError, match="cannot round-trip"):
        SentencePieceTokenizer.load(tmp_path / "lossy.model")


def test_spm_without_byte_fallback_maps_unseen_characters_to_unk():
    tok = SentencePieceTokenizer.train(ENGLISH, vocab_size=100, byte_fallback=False)
    assert tok.encode("猫") == [tok.unk_id] and tok.decode(tok.encode("a猫")) == "a\ufffd"


def test_spm_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="sentencepiece could not train"):
        SentencePieceTokenizer.train(ENGLISH + JAPANESE, vocab_size=200)


# ---- choosing and loading ------------------------------------------------

def test_train_tokenizer_kinds(tmp_path):
    for kind in ("char", "bpe", "spm"):
        tok = train_tokenizer(kind, ENGLISH, 320)
        assert tok.kind == kind and tok.decode(tok.encode(ENGLISH)) == ENGLISH
        path = tmp_path / f"{kind}-{TOKENIZER_FILES[kind]}"
        tok.save(path)
        assert type(load_tokenizer(path)) is type(tok)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer("wordpiece", ENGLISH, 300)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "wordpiece"}', encoding="utf-8")
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(tmp_path / "tokenizer.json")
