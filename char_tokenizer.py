"""Stage 4 — the character tokenizer.

A language model reads integers, not text. The simplest tokenizer gives every
distinct character of the training text its own id: the vocabulary is the
sorted character set, and decoding is a table lookup. It is exact for every
character it has seen; anything else maps to one extra `<unk>` id instead of
crashing, so a model trained on English can still be prompted in Japanese.

New since stage 3: text becomes `list[int]` and back.
Run the demo: `python char_tokenizer.py`
"""
import json
import sys
from pathlib import Path

UNK = "<unk>"
UNK_TEXT = "\ufffd"  # what an unknown id decodes to: the Unicode replacement character


def replace_unencodable_output():
    """Make print() write "?" for a character the console's encoding cannot show, instead of raising
    UnicodeEncodeError mid-run: Japanese on a Windows console in cp1252, or under PYTHONIOENCODING=ascii.
    Every command line calls it first; files are always read and written as UTF-8 whatever the console."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a real text stream (a test's capture may not be one)
            stream.reconfigure(errors="replace")


class CharTokenizer:
    """One id per character; `<unk>` is the last id so the others match nanoGPT's.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.encode("hole"), tok.vocab_size
    ([1, 3, 2, 0], 5)
    """

    kind = "char"
    bos_id = eos_id = pad_id = None

    def __init__(self, chars, special_tokens=()):
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer needs a list of distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.unk_id = len(chars)
        # Special tokens (stage 25a's chat tokens) take the ids after <unk>. Encode
        # reads one character at a time, so no text can ever produce them.
        self.special_tokens = {s: len(chars) + 1 + k for k, s in enumerate(special_tokens)}
        self.itos = chars + [UNK_TEXT, *special_tokens]  # id -> text
        self.vocab_size = len(self.itos)

    @classmethod
    def train(cls, text):
        """The sorted set of characters in `text` becomes the vocabulary."""
        return cls(sorted(set(text)))

    from_text = train

    def encode(self, text):
        get, unk = self.stoi.get, self.unk_id
        return [get(c, unk) for c in text]

    def decode(self, ids):
        itos, n = self.itos, len(self.itos)
        return "".join(itos[i] if 0 <= i < n else UNK_TEXT for i in ids)

    def token_bytes(self, i):
        """The UTF-8 bytes of one id (used by the streaming decoder)."""
        return self.decode([i]).encode("utf-8")

    def with_special_tokens(self, tokens):
        """A new tokenizer: this one plus `tokens`, each one new id after the current vocabulary."""
        return type(self)(self.chars, [*self.special_tokens, *tokens])

    def save(self, path):
        data = {"kind": self.kind, "version": 1, "chars": self.chars, "unk": UNK}
        if self.special_tokens:  # only then, so a file without them stays byte for byte as before
            data["special_tokens"] = list(self.special_tokens)
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("kind") != cls.kind:
            raise ValueError(f"{path} holds a {data.get('kind')!r} tokenizer, not a char one")
        return cls(data["chars"], data.get("special_tokens", ()))  # older files have none


def _demo():
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    tok = CharTokenizer.train(text)
    ids = tok.encode("hear me")
    print(f"vocab ({tok.vocab_size}): {''.join(tok.chars)!r} + {UNK}")
    print(f"encode('hear me') = {ids}")
    print(f"decode(...)       = {tok.decode(ids)!r}")
    print(f"unknown 'Zé猫'    = {tok.encode('Zé猫')} -> {tok.decode(tok.encode('Zé猫'))!r}")


if __name__ == "__main__":
    _demo()
