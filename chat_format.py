"""Stage 25a — the chat format: turns, chat tokens and a loss mask.

A base model continues text; a chat model answers in turns. Every turn is
written in one template, opened by its role token and closed by `<|end|>`:

    <|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>

The four chat tokens are new ids appended to the tokenizer, one id each, and
no text ever encodes to them, so a user who types "<|end|>" cannot end a turn.
Fine-tuning trains only on what the assistant says: its content and its
`<|end|>` (which teaches it to stop). The system and user turns and the role
tokens are context, never targets. Conversations are packed one after
another into a single stream, with no padding for the model to learn.

New since stage 16: special tokens added to every tokenizer kind, a mask
beside the ids, and chat data read from JSONL files.
Run the demo: `python chat_format.py`
"""
import json
import unicodedata

from char_tokenizer import CharTokenizer

CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLES = ("system", "user", "assistant")
END = "<|end|>"
SHAPES = 'expected {"messages": [...]}, {"instruction", "input", "output"} or {"prompt", "completion"}'


def render_chat(messages, add_generation_prompt=False):
    """Messages -> the template as text (for reading; training uses `encode_chat`).

    >>> render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    '<|user|>Hi<|end|><|assistant|>'
    """
    text = "".join(f"<|{m['role']}|>{m['content']}{END}" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def chat_ids(tok):
    """{chat token: id} when `tok` has all four chat tokens, else None (a base run)."""
    special = getattr(tok, "special_tokens", {})
    return {t: special[t] for t in CHAT_TOKENS} if all(t in special for t in CHAT_TOKENS) else None


def add_chat_tokens(tok):
    """A tokenizer of the same kind with the chat tokens appended as new ids after
    its vocabulary (`tok` itself when it has them already). The model's embedding
    must grow by the same number of rows."""
    if not hasattr(tok, "with_special_tokens"):
        raise ValueError(f"a {tok.kind!r} tokenizer cannot take chat tokens: use a char, bpe or spm tokenizer")
    missing = [t for t in CHAT_TOKENS if t not in tok.special_tokens]
    return tok.with_special_tokens(missing) if missing else tok


def _check_role(role):
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")


def encode_chat(tok, messages, add_generation_prompt=False):
    """Messages -> (ids, mask), two lists of equal length; mask[i] is True where
    ids[i] is a target of the loss: the assistant's content and its <|end|>.

    Role tokens and <|end|> are inserted as their ids; every content is encoded
    as plain text on its own, so "<|end|>" typed in a message stays characters.
    """
    ids_of = chat_ids(tok)
    if ids_of is None:
        raise ValueError("this tokenizer has no chat tokens: add them with chat_format.add_chat_tokens(tok)")
    ids, mask = [], []
    for message in messages:
        _check_role(message["role"])
        content = tok.encode(message["content"])
        trained = message["role"] == "assistant"
        ids += [ids_of[f"<|{message['role']}|>"], *content, ids_of[END]]
        mask += [False] + [trained] * (len(content) + 1)  # the role token is always context
    if add_generation_prompt:  # the model writes the reply from here
        ids.append(ids_of["<|assistant|>"])
        mask.append(False)
    return ids, mask


def check_conversation(messages):
    """Raise ValueError unless the roles run: an optional system turn first, then
    user and assistant alternating from user, with at least one assistant turn."""
    roles = [m["role"] for m in messages]
    for role in dict.fromkeys(roles):  # each distinct role once, in order
        _check_role(role)
    start = 1 if roles[:1] == ["system"] else 0
    for k, role in enumerate(roles[start:]):
        expected = ("user", "assistant")[k % 2]
        if role != expected:
            raise ValueError(f"turn {start + k + 1} is {role!r} where {expected!r} was expected: a system turn "
                             "may only come first, then user and assistant take turns, starting with user")
    if len(roles) < start + 2:
        raise ValueError("no assistant turn: a conversation needs a reply to learn from")


def _strings(row, keys):
    for key in keys:
        if not isinstance(row.get(key, ""), str):
            raise ValueError(f'"{key}" is a {type(row[key]).__name__}; expected a string')
    return [row.get(key, "") for key in keys]


def parse_chat(line):
    """One JSONL line in any of the three shapes -> a checked list of messages."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg}); {SHAPES}") from None
    if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}; {SHAPES}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError('"messages" is not a list of objects; expected [{"role": ..., "content": ...}, ...]')
        if not all("role" in m and "content" in m for m in messages):
            raise ValueError('a message lacks "role" or "content"; expected {"role": ..., "content": ...}')
        for key in ("role", "content"):  # whole-list passes: the shared data holds 400,000 messages
            wrong = [m[key] for m in messages if not isinstance(m[key], str)]
            if wrong:
                raise ValueError(f'"{key}" is a {type(wrong[0]).__name__}; expected a string')
    elif {"instruction", "output"} <= row.keys():  # Alpaca's shape; "input" may be empty or absent
        instruction, extra, output = _strings(row, ("instruction", "input", "output"))
        prompt = f"{instruction}\n\n{extra}" if extra else instruction  # the blank line sets the input apart
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    elif {"prompt", "completion"} <= row.keys():
        prompt, completion = _strings(row, ("prompt", "completion"))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        raise ValueError(f"keys {sorted(row)}; {SHAPES}")
    check_conversation(messages)
    return messages


def read_chats(path):
    """A JSONL file, one conversation a line (blank lines skipped) -> a list of message lists.

    A bad line raises ValueError("FILE:LINE: what is wrong; what was expected")."""
    chats = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    chats.append(parse_chat(line))
            except ValueError as e:  # UnicodeDecodeError is one too
                raise ValueError(f"{path}:{number}: {e}") from None
    return chats


def split_chat(ids, mask, block_size):
    """One encoded conversation -> pieces [(ids, mask), ...] of at most block_size + 1 tokens
    (one training window), cut only at turn boundaries; every piece ends with a target.

    Turns after the last reply train nothing and are left out. A conversation that fits
    stays whole. A longer one is cut between exchanges (the context turns and the reply
    that follows them); an exchange longer than a window is cut between its context and
    its reply, so the reply stands alone. A single turn longer than a window is the only
    thing ever cut inside: an assistant turn becomes window-sized chunks, each trained on
    what it holds, while a system or user turn that long could never sit beside its reply
    and its chunks, which hold no target, are left out.
    """
    window = block_size + 1
    n = len(mask) - mask[::-1].index(True) if True in mask else 0  # the end of the last reply
    # A turn starts where a reply ends (target -> context) and at a reply's role token (the
    # context token just before a target); an exchange ends where a reply ends.
    starts = [i for i in range(1, n) if (mask[i - 1] and not mask[i]) or (not mask[i] and mask[i + 1])]
    exchange_ends = [i for i in range(1, n + 1) if mask[i - 1] and (i == n or not mask[i])]
    spans, begin = [], 0  # (start, end) of each piece
    for end in exchange_ends:
        if spans and end - spans[-1][0] <= window:
            spans[-1] = (spans[-1][0], end)  # the exchange joins the piece before it
        elif end - begin <= window:
            spans.append((begin, end))
        else:
            cuts = [begin, *(s for s in starts if begin < s < end), end]
            for a, b in zip(cuts, cuts[1:]):
                spans += [(c, min(c + window, b)) for c in range(a, b, window)]
        begin = end
    return [(ids[a:b], mask[a:b]) for a, b in spans if any(mask[a:b])]


def pack_chats(encoded, block_size):
    """Encoded conversations [(ids, mask), ...] -> one stream (ids, mask): their pieces
    (`split_chat`) one after another, no padding. Read it in windows of block_size + 1
    tokens, as train.py reads text; a window that ends in one conversation begins the
    next, which its role token tells apart. Every piece ends with a target, so a run of
    context is shorter than a window: no window lacks a target (when block_size >= 2 and
    every reply has at least one token)."""
    ids, mask = [], []
    for conversation in encoded:
        for piece_ids, piece_mask in split_chat(*conversation, block_size):
            ids += piece_ids
            mask += piece_mask
    return ids, mask


def _width(text):
    """Terminal columns of `text`: a CJK character takes two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def show_mask(tok, ids, mask):
    """Two lines: the tokens as text, and ^ under every character that is a target."""
    pieces = [tok.decode([i]).replace("\n", "⏎") for i in ids]
    marks = ("^" if m else " " for m in mask)
    return "".join(pieces) + "\n" + "".join(m * _width(p) for m, p in zip(marks, pieces)).rstrip()


def _demo():
    chats = [
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Say <|end|>."},
         {"role": "assistant", "content": "<|end|>, typed."},
         {"role": "user", "content": "Thanks!"},
         {"role": "assistant", "content": "Any time."}],
        [{"role": "user", "content": "猫は好き？"},
         {"role": "assistant", "content": "はい、大好きです。"}],
    ]
    tok = CharTokenizer.train("".join(m["content"] for chat in chats for m in chat))
    chat_tok = add_chat_tokens(tok)
    print(f"char vocabulary {tok.vocab_size} -> {chat_tok.vocab_size} with the chat tokens {chat_ids(chat_tok)}")
    for chat in chats:
        ids, mask = encode_chat(chat_tok, chat)
        print(f"\n{len(ids)} ids, {sum(mask)} targets (^):\n{show_mask(chat_tok, ids, mask)}")
    ids, mask = encode_chat(chat_tok, chats[0])
    print(f'\n"<|end|>" typed by the user is {len(chat_tok.encode("<|end|>"))} ids of characters, '
          f"the token is one id: {chat_ids(chat_tok)[END]}")
    pieces = split_chat(ids, mask, block_size=45)
    print(f"\ncut for block_size 45 ({len(ids)} ids): pieces of {[len(p) for p, _ in pieces]} ids")
    for piece_ids, piece_mask in pieces:
        print(show_mask(chat_tok, piece_ids, piece_mask))


if __name__ == "__main__":
    _demo()
