"""Tests for chat_format.py (stage 25a) and the chat tokens of every tokenizer kind."""
import json

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from bpe_tokenizer import (TOKENIZER_FILES, BPETokenizer, HFTokenizer, SentencePieceTokenizer, StreamDecoder,
                           load_tokenizer)
from char_tokenizer import CharTokenizer
from chat_format import (CHAT_TOKENS, add_chat_tokens, chat_ids, encode_chat, pack_chats, read_chats,
                         render_chat, split_chat)
from conftest import corpus

TEXT = ("The cat sat on the mat. A dog ran in the park; the bird sang in the tree. "
        "Hello there, how are you today? I am fine, thank you, and you? Be kind. Say: please. "
        "Numbers 0123456789 and quotes \"yes\" <|, |>, <, >, end.\n"
        "猫はマットの上に座った。犬は公園を走った。こんにちは、元気ですか？はい、元気です。\n") * 20
CHAT = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Say <|end|> and <|user|>, please."},
    {"role": "assistant", "content": "Here: <|end|> <|user|>"},
    {"role": "user", "content": "猫は？"},
    {"role": "assistant", "content": "猫はマットの上に座った。"},
]


@pytest.fixture(scope="module", params=["char", "bpe", "spm"])
def base(request):
    if request.param == "char":
        return CharTokenizer.train(TEXT)
    if request.param == "bpe":
        return BPETokenizer.train(TEXT, vocab_size=256 + 40 + 3, verbose=False)
    return SentencePieceTokenizer.train(TEXT, vocab_size=345)  # 256 bytes + 78 characters + a few pieces


@pytest.fixture(scope="module")
def tok(base):
    return add_chat_tokens(base)


def turn(tok, role, content):
    """The ids and mask of one turn, spelled out by hand from the template."""
    ids = chat_ids(tok)
    content_ids = tok.encode(content)
    mask = [False] * (len(content_ids) + 2) if role != "assistant" else [False] + [True] * (len(content_ids) + 1)
    return [ids[f"<|{role}|>"], *content_ids, ids["<|end|>"]], mask


def test_chat_tokens_are_new_ids_after_the_vocabulary(base, tok):
    assert chat_ids(base) is None
    assert list(chat_ids(tok).values()) == list(range(base.vocab_size, base.vocab_size + 4))
    assert tok.vocab_size == base.vocab_size + 4 and tok.kind == base.kind
    assert add_chat_tokens(tok) is tok
    assert tok.encode(TEXT[:300]) == base.encode(TEXT[:300])  # the old ids keep their meaning


def test_chat_tokens_are_atomic_and_decode_to_their_text(tok):
    for token, i in chat_ids(tok).items():
        assert tok.decode([i]) == token
        assert StreamDecoder(tok).push(i) == token
    ids = [i for _, i in sorted(chat_ids(tok).items())]
    assert tok.decode(ids) == "".join(sorted(CHAT_TOKENS))


def test_typed_chat_tokens_stay_plain_text(tok):
    text = "a <|end|> b <|user|><|assistant|>"
    ids = tok.encode(text)
    assert not set(ids) & set(chat_ids(tok).values())
    assert len(ids) > 4 and tok.decode(ids) == text


@pytest.mark.parametrize("base", ["spm"], indirect=True)
def test_spm_chat_tokens_are_control_pieces_of_a_valid_model(tok):
    sp = sentencepiece.SentencePieceProcessor(model_proto=tok.model_bytes)  # the library itself reads the file
    assert sp.get_piece_size() == tok.vocab_size
    for token, i in chat_ids(tok).items():
        assert sp.id_to_piece(i) == token and sp.is_control(i) and sp.piece_to_id(token) == i
    assert not set(sp.encode("<|end|><|system|>")) & set(chat_ids(tok).values())


def test_encode_chat_ids_and_mask_by_hand(tok):
    expected_ids, expected_mask = [], []
    for message in CHAT:
        ids, mask = turn(tok, message["role"], message["content"])
        expected_ids += ids
        expected_mask += mask
    ids, mask = encode_chat(tok, CHAT)
    assert ids == expected_ids and mask == expected_mask
    assert tok.decode(ids) == render_chat(CHAT)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Here: <|end|> <|user|><|end|>猫はマットの上に座った。<|end|>"
    prompt_ids, prompt_mask = encode_chat(tok, CHAT[:4], add_generation_prompt=True)
    assert prompt_ids == expected_ids[:len(prompt_ids) - 1] + [chat_ids(tok)["<|assistant|>"]]
    assert prompt_mask == expected_mask[:len(prompt_ids) - 1] + [False]
    assert tok.decode(prompt_ids) == render_chat(CHAT[:4], add_generation_prompt=True)


def test_encode_chat_refuses_a_base_tokenizer_and_unknown_roles(base, tok):
    with pytest.raises(ValueError, match="add_chat_tokens"):
        encode_chat(base, CHAT)
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        encode_chat(tok, [{"role": "tool", "content": "x"}])


def test_save_load_keeps_the_chat_tokens(base, tok, tmp_path):
    tok.save(tmp_path / TOKENIZER_FILES[tok.kind])
    again = load_tokenizer(tmp_path)
    assert chat_ids(again) == chat_ids(tok) and again.vocab_size == tok.vocab_size
    assert encode_chat(again, CHAT) == encode_chat(tok, CHAT)
    old = tmp_path / "old"
    old.mkdir()
    base.save(old / TOKENIZER_FILES[base.kind])
    assert chat_ids(load_tokenizer(old)) is None and load_tokenizer(old).vocab_size == base.vocab_size


def test_a_hugging_face_tokenizer_has_no_chat_tokens():
    pytest.importorskip("tokenizers")
    spec = {"model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"},
            "pre_tokenizer": {"type": "Whitespace"}}
    hf = HFTokenizer(spec, 2, {"unk": 1})
    assert chat_ids(hf) is None
    with pytest.raises(ValueError, match="'hf' tokenizer cannot take chat tokens"):
        add_chat_tokens(hf)


def test_char_file_written_before_chat_tokens_loads(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"kind": "char", "version": 1, "chars": ["a", "b"], "unk": "<unk>"}), encoding="utf-8")
    before = path.read_bytes()
    old = load_tokenizer(path)
    old.save(path)
    assert path.read_bytes() == before  # no chat tokens: the file is written exactly as before
    assert old.vocab_size == 3 and old.special_tokens == {} and old.decode([0, 2, 1]) == "a\ufffdb"
    assert add_chat_tokens(old).decode([3, 0, 6]) == "<|system|>a<|end|>"


# ---- read_chats ----------------------------------------------------------

def write_lines(tmp_path, lines):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def test_read_chats_reads_the_three_shapes(tmp_path):
    lines = [json.dumps({"id": 7, "messages": CHAT}, ensure_ascii=False),
             "",
             json.dumps({"instruction": "Add.", "input": "2 + 2", "output": "4"}),
             json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi!"}),
             json.dumps({"prompt": "こんにちは", "completion": "こんにちは！"}, ensure_ascii=False)]
    chats = read_chats(write_lines(tmp_path, lines))
    assert chats == [
        CHAT,
        [{"role": "user", "content": "Add.\n\n2 + 2"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "こんにちは！"}],
    ]


def msgs(*roles):
    return json.dumps({"messages": [{"role": r, "content": "x"} for r in roles]})


@pytest.mark.parametrize("line, expected", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON list; expected"),
    ('{"text": "hello"}', "keys ['text']; expected"),
    ('{"messages": "hi"}', '"messages" is not a list'),
    ('{"messages": [{"role": "user"}]}', 'lacks "role" or "content"'),
    ('{"messages": [{"role": "user", "content": 3}]}', '"content" is a int; expected a string'),
    ('{"instruction": "a", "input": null, "output": "b"}', '"input" is a NoneType'),
    ('{"prompt": "a", "completion": ["b"]}', '"completion" is a list'),
    (b'{"prompt": "\xff", "completion": "b"}', "can't decode byte 0xff"),
    (msgs("user"), "no assistant turn"),
    (msgs("system"), "no assistant turn"),
    (msgs(), "no assistant turn"),
    (msgs("assistant", "user"), "turn 1 is 'assistant' where 'user' was expected"),
    (msgs("user", "user", "assistant"), "turn 2 is 'user' where 'assistant' was expected"),
    (msgs("user", "assistant", "system", "assistant"), "turn 3 is 'system' where 'user'"),
    (msgs("system", "system", "user", "assistant"), "turn 2 is 'system'"),
    (msgs("user", "bot"), "unknown role 'bot'"),
])
def test_read_chats_names_file_and_line_of_a_bad_line(tmp_path, line, expected):
    path = write_lines(tmp_path, [msgs("user", "assistant"), line])
    with pytest.raises(ValueError) as error:
        read_chats(path)
    assert str(error.value).startswith(f"{path}:2: ") and expected in str(error.value)


@pytest.mark.parametrize("name", ["dialogue_en.jsonl", "dialogue_ja.jsonl",
                                  "instructions_en.jsonl", "instructions_ja.jsonl"])
def test_read_chats_reads_the_shared_chat_data(name):
    path = corpus(name)
    chats = read_chats(path)
    lines = sum(1 for line in path.open(encoding="utf-8") if line.strip())
    assert len(chats) == lines > 0
    assert all(any(m["role"] == "assistant" for m in chat) for chat in chats)


# ---- split_chat / pack_chats ---------------------------------------------

@pytest.fixture(scope="module")
def char_tok():
    return add_chat_tokens(CharTokenizer.train(TEXT))


def encoded_turns(tok, roles_and_lengths):
    """A conversation of turns with contents of the given lengths, and where each turn starts."""
    ids, mask, starts = [], [], []
    for role, n in roles_and_lengths:
        starts.append(len(ids))
        turn_ids, turn_mask = turn(tok, role, "ab" * (n // 2) + "c" * (n % 2))
        ids += turn_ids
        mask += turn_mask
    return ids, mask, starts + [len(ids)]


def test_pack_keeps_conversations_that_fit_whole(char_tok):
    chats = [CHAT, CHAT[1:3], [{"role": "user", "content": ""}, {"role": "assistant", "content": "ok"}]]
    encoded = [encode_chat(char_tok, chat) for chat in chats]
    block_size = max(len(ids) for ids, _ in encoded) - 1
    ids, mask = pack_chats(encoded, block_size)
    assert ids == [i for e, _ in encoded for i in e] and mask == [m for _, e in encoded for m in e]


def test_split_cuts_between_exchanges(char_tok):
    ids, mask, bounds = encoded_turns(char_tok, [("system", 3), ("user", 4), ("assistant", 5),
                                                 ("user", 2), ("assistant", 6), ("user", 1), ("assistant", 3)])
    first, second = bounds[3], bounds[5]  # exchanges: turns 0-2 (18 ids), 3-4 (12 ids), 5-6 (8 ids)
    assert split_chat(ids, mask, block_size=20) == [(ids[:first], mask[:first]), (ids[first:], mask[first:])]
    assert split_chat(ids, mask, block_size=29) == [(ids[:second], mask[:second]), (ids[second:], mask[second:])]
    assert split_chat(ids, mask, block_size=len(ids) - 1) == [(ids, mask)]


def test_split_puts_a_long_exchanges_reply_alone(char_tok):
    ids, mask, bounds = encoded_turns(char_tok, [("user", 10), ("assistant", 4), ("user", 1), ("assistant", 1)])
    pieces = split_chat(ids, mask, block_size=11)  # the first exchange (18 ids) does not fit a window of 12
    assert pieces == [(ids[bounds[1]:], mask[bounds[1]:])]  # its reply joined by the next exchange


def test_split_chunks_a_single_turn_longer_than_a_window(char_tok):
    ids, mask, bounds = encoded_turns(char_tok, [("user", 30), ("assistant", 1), ("user", 1), ("assistant", 25)])
    pieces = split_chat(ids, mask, block_size=9)
    # the long user turn trains nothing and goes; the short reply stands alone; the long reply becomes chunks
    assert [p for p, _ in pieces] == [ids[bounds[1]:bounds[2]]] + [
        ids[k:min(k + 10, bounds[4])] for k in range(bounds[3], bounds[4], 10)]


def test_split_leaves_out_turns_after_the_last_reply(char_tok):
    ids, mask, bounds = encoded_turns(char_tok, [("user", 2), ("assistant", 2), ("user", 3)])
    assert split_chat(ids, mask, block_size=100) == [(ids[:bounds[2]], mask[:bounds[2]])]
    assert split_chat(*encoded_turns(char_tok, [("system", 4), ("user", 1)])[:2], block_size=100) == []


ROLE_RUNS = st.lists(st.tuples(st.integers(0, 12), st.integers(1, 12)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(conversations=st.lists(st.tuples(st.booleans(), ROLE_RUNS), min_size=1, max_size=4),
       block_size=st.integers(2, 30))
def test_pack_cuts_only_at_turn_boundaries_and_every_window_has_a_target(char_tok, conversations, block_size):
    encoded, expected = [], []
    for system, exchanges in conversations:
        roles = [("system", 2)] * system + [t for u, a in exchanges for t in (("user", u), ("assistant", a))]
        ids, mask, bounds = encoded_turns(char_tok, roles)
        encoded.append((ids, mask))
        pieces = split_chat(ids, mask, block_size)
        start = 0
        for piece, piece_mask in pieces:
            assert len(piece) <= block_size + 1 and piece_mask[-1]  # fits a window, ends with a target
            offset = next(k for k in range(start, len(ids)) if ids[k:k + len(piece)] == piece)
            end = offset + len(piece)
            turn_fits = all(b - a <= block_size + 1 for a, b in zip(bounds, bounds[1:]) if a < end and b > offset)
            if turn_fits:  # a piece made of turns that fit begins and ends on turn boundaries
                assert offset in bounds and end in bounds
            assert piece_mask == mask[offset:end]
            start = end
        replies_fit = all(b - a <= block_size + 1 for (role, _), a, b in zip(roles, bounds, bounds[1:])
                          if role == "assistant")
        if replies_fit:  # no reply is lost
            assert sum(sum(m) for _, m in pieces) == sum(mask)
        expected += pieces
    ids, mask = pack_chats(encoded, block_size)
    assert ids == [i for p, _ in expected for i in p] and mask == [m for _, p in expected for m in p]
    for k in range(max(0, len(ids) - block_size)):  # any window of block_size + 1: its targets y = ids[k + 1:...]
        assert any(mask[k + 1:k + block_size + 1])
