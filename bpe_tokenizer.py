"""Stage 16 — subword tokenizers: byte-level BPE, sentencepiece, streaming decode.

A character vocabulary makes sequences long; a subword vocabulary lets one
id stand for a frequent piece of text ("the", " and", "ing"). Byte-pair
encoding starts from the 256 byte values, so every string round-trips
exactly, and then repeatedly merges the most frequent adjacent pair into a
new token. Sentencepiece (a C++ library) does the same job with a unigram
model and suits Japanese, where words are not separated by spaces.

New since stage 4: merges learned from data (with pair counts updated
incrementally, not recounted per merge), a split regex, special tokens, and
`StreamDecoder`, which prints only complete characters while a model
emits one token at a time (a Japanese character spans several byte tokens).
Run the demo: `python bpe_tokenizer.py`
"""
import codecs
import heapq
import json
import os
import tempfile
from array import array
from collections import Counter, defaultdict
from itertools import chain, repeat
from pathlib import Path

import regex
import sentencepiece
from tqdm import tqdm

from char_tokenizer import UNK_TEXT, CharTokenizer

# The GPT-4 split: contractions, letter runs (with one leading non-letter,
# usually a space), numbers of 1-3 digits, punctuation runs, newlines, spaces.
# A merge never crosses a chunk, so " the" can become a token but "e." cannot.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
BPE_VERSION = 1
CACHE_LIMIT = 1 << 18  # chunks remembered by encode before the cache starts over
NEVER = 1 << 62  # the rank of a pair that was never merged
TOKENIZER_FILES = {"char": "tokenizer.json", "bpe": "tokenizer.json", "spm": "tokenizer.model"}

SPM_SPACE = "\u2581"  # "▁": how sentencepiece writes a space inside its pieces
# Sentencepiece's defaults are lossy (NFKC turns "（" into "(", runs of spaces
# collapse, a space is added in front, newlines vanish because the trainer
# reads one sentence per line). These settings make it exact.
SPM_LOSSLESS = dict(
    normalization_rule_name="identity",  # no NFKC: text stays as written
    remove_extra_whitespaces=False,  # keep leading, trailing and repeated spaces
    add_dummy_prefix=False,  # no invented space before the first word
    user_defined_symbols=["\n"],  # newline is one atomic piece at encode time
    required_chars=SPM_SPACE,  # a space is always a piece, never bytes (see encode)
    allow_whitespace_only_pieces=True,  # "▁▁▁▁" (indentation) may be a piece
    max_sentence_length=1 << 16,  # long Japanese paragraphs are not skipped
    num_threads=1,  # deterministic, and fair next to the one-thread benchmarks
)


class _PairIndex:
    """Pair counts over the unique chunks, kept exact merge after merge.

    A naive trainer recounts every pair of the whole text for every merge.
    Here each unique chunk is stored once with its frequency as a weight;
    `where[pair]` remembers which chunks may hold the pair (an array of chunk numbers,
    repeats allowed: sets took most of the memory), so a merge visits only those and
    adjusts the counts next to each replaced occurrence. A heap finds the best pair;
    entries whose count changed since they were pushed are stale: skipped when popped
    ("lazy invalidation"), dropped when the heap outgrows 1.5 times the pairs.
    """

    def __init__(self, words, weights):
        self.words, self.weights = words, weights  # words[i]: chunk i as an array of ids
        self.counts, self.where = defaultdict(int), defaultdict(lambda: array("i"))  # pair -> count, chunks
        for i, word in enumerate(words):
            for pair in zip(word, word[1:]):
                self.counts[pair] += weights[i]
                self.where[pair].append(i)
        self._rebuild_heap()

    def _rebuild_heap(self):
        self.heap = [(-count, pair) for pair, count in self.counts.items()]
        heapq.heapify(self.heap)

    def best(self):
        """The most frequent pair, ties to the smallest (a, b); None when none is left."""
        while self.heap:
            neg_count, pair = heapq.heappop(self.heap)
            if self.counts.get(pair) == -neg_count:
                return pair
        return None

    def merge(self, pair, new_id):
        """Merge `pair` into `new_id` in every chunk that holds it; update the counts."""
        a, b = pair
        where, delta = self.where, defaultdict(int)
        del self.counts[pair]  # every occurrence disappears
        for i in dict.fromkeys(where.pop(pair)):  # each chunk once, in a fixed order
            word, weight = self.words[i], self.weights[i]
            out, start, pos, n = array("i"), 0, 0, len(word)
            while True:
                try:
                    pos = word.index(a, pos)  # a C-speed scan to the next candidate
                except ValueError:
                    break
                if pos + 1 == n or word[pos + 1] != b:
                    pos += 1
                    continue
                out += word[start:pos]
                if out:  # (left, a) becomes (left, new); left may itself be new
                    left = out[-1]
                    delta[left, a] -= weight
                    delta[left, new_id] += weight
                    where[left, new_id].append(i)
                if pos + 2 < n:  # (b, right) becomes (new, right)
                    right = word[pos + 2]
                    delta[b, right] -= weight
                    delta[new_id, right] += weight
                    where[new_id, right].append(i)
                out.append(new_id)
                pos = start = pos + 2
            if start:  # `where` may list chunks that no longer hold the pair
                self.words[i] = out + word[start:]
        for p, change in delta.items():
            count = self.counts.get(p, 0) + change
            if count > 0:
                self.counts[p] = count
                heapq.heappush(self.heap, (-count, p))
            else:
                self.counts.pop(p, None)
                where.pop(p, None)  # no chunk holds it any more
        if len(self.heap) > 1.5 * len(self.counts) + 1024:
            self._rebuild_heap()


class BPETokenizer:
    """Byte-level BPE with a split regex and special tokens.

    Ids: 0-255 are the bytes, 256 + k is the k-th merge, then the special
    tokens. `vocab_size` counts all three, so training with vocab_size=1024
    and three specials learns 765 merges.
    """

    kind = "bpe"
    unk_id = None  # every byte has a token: nothing is ever unknown

    def __init__(self, merges, pattern=GPT4_SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        self.merges = [tuple(pair) for pair in merges]
        self.pattern = pattern
        self.ranks = {pair: 256 + k for k, pair in enumerate(self.merges)}  # pair -> new id
        vocab = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            vocab.append(vocab[a] + vocab[b])
        self.special_tokens = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
        vocab += [s.encode("utf-8") for s in special_tokens]
        self.vocab = vocab  # id -> bytes
        self.vocab_size = len(vocab)
        self.bos_id, self.eos_id, self.pad_id = (self.special_tokens.get(f"<|{n}|>") for n in ("bos", "eos", "pad"))
        self._split = regex.compile(pattern).findall if pattern else lambda text: [text]
        self._cache = {}  # chunk -> ids: text repeats, so most chunks are seen before

    @classmethod
    def train(cls, text, vocab_size, pattern=GPT4_SPLIT_PATTERN,
              special_tokens=SPECIAL_TOKENS, verbose=True):
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text`.

        Stops early (with a smaller vocabulary) if the text runs out of pairs.
        Ties between equally frequent pairs go to the smallest pair of ids.
        """
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {len(special_tokens)} special tokens: "
                             f"pass at least {256 + len(special_tokens)}")
        if pattern and regex.compile(pattern).groups:
            raise ValueError("the split pattern has capture groups: use (?:...) instead")
        chunks = Counter(m.group() for m in regex.finditer(pattern, text)) if pattern else Counter([text])
        chunks.pop("", None)
        index = _PairIndex([array("i", list(c.encode("utf-8"))) for c in chunks], list(chunks.values()))
        merges = []
        for new_id in tqdm(range(256, 256 + n_merges), desc="bpe merges", disable=not verbose):
            pair = index.best()
            if pair is None:
                break
            index.merge(pair, new_id)
            merges.append(pair)
        tok = cls(merges, pattern, special_tokens)
        if pattern:  # the training chunks are already encoded: keep them
            tok._cache.update(zip(chunks, index.words))
        return tok

    def _encode_chunk(self, data):
        """Bytes -> ids: merge the earliest-learned pair present, leftmost first,
        until no learned pair is left. A merge only creates pairs holding the
        new id, which rank later, so the merges replay in training order."""
        ids, get = list(data), self.ranks.get
        ranks = list(map(get, zip(ids, ids[1:]), repeat(NEVER)))  # ranks[i]: id of ids[i] + ids[i+1]
        while ranks:
            new_id = min(ranks)
            if new_id == NEVER:
                break
            i = ranks.index(new_id)  # (left, a, b, right) -> (left, new, right)
            ids[i] = new_id
            del ids[i + 1], ranks[i]
            if i < len(ranks):
                ranks[i] = get((new_id, ids[i + 1]), NEVER)
            if i:
                ranks[i - 1] = get((ids[i - 1], new_id), NEVER)
        return ids

    def encode_ordinary(self, text):
        """Encode `text` with no special tokens at all."""
        cache = self._cache
        if len(cache) > CACHE_LIMIT:
            cache.clear()
        chunks = self._split(text)
        for chunk in set(chunks).difference(cache):  # each new chunk is encoded once
            cache[chunk] = self._encode_chunk(chunk.encode("utf-8"))
        return list(chain.from_iterable(map(cache.__getitem__, chunks)))

    def encode(self, text, allowed_special="none"):
        """Text -> ids. Special tokens written in `text` become their ids only
        when allowed ("all", or a set of them); otherwise they are plain text,
        so a user typing "<|eos|>" can never end a model's turn."""
        if allowed_special in ("all", "none"):
            allowed = self.special_tokens if allowed_special == "all" else {}
        else:
            unknown = set(allowed_special) - set(self.special_tokens)
            if unknown:
                raise ValueError(f"unknown special tokens {sorted(unknown)}: this tokenizer has {list(self.special_tokens)}")
            allowed = {s: self.special_tokens[s] for s in allowed_special}
        if not allowed:
            return self.encode_ordinary(text)
        longest_first = sorted(allowed, key=len, reverse=True)
        parts = regex.split("(" + "|".join(map(regex.escape, longest_first)) + ")", text)
        ids = []
        for k, part in enumerate(parts):  # odd positions hold the matched specials
            ids += [allowed[part]] if k % 2 else self.encode_ordinary(part)
        return ids

    def decode(self, ids):
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return b"".join(map(self.vocab.__getitem__, ids)).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        return self.vocab[i]

    def with_special_tokens(self, tokens):
        """A new tokenizer: this one plus `tokens`, each one new special id after the current vocabulary."""
        return type(self)(self.merges, self.pattern, [*self.special_tokens, *tokens])

    def _readable_vocab(self):
        return [t.decode("utf-8", errors="backslashreplace") for t in self.vocab]

    def save(self, path):
        data = {"kind": self.kind, "version": BPE_VERSION, "pattern": self.pattern,
                "merges": [list(p) for p in self.merges],
                "special_tokens": list(self.special_tokens),
                "vocab": self._readable_vocab()}  # for reading only; merges rebuild it
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("kind") != cls.kind or data.get("version") != BPE_VERSION:
            raise ValueError(f"{path} holds kind {data.get('kind')!r} version {data.get('version')!r}; expected "
                             f"a bpe tokenizer, version {BPE_VERSION}: retrain it with this code")
        tok = cls(data["merges"], data["pattern"], data["special_tokens"])
        if "vocab" in data and data["vocab"] != tok._readable_vocab():
            raise ValueError(f"{path}: the vocab does not match the merges (was the file edited?): retrain the tokenizer")
        return tok


class SentencePieceTokenizer:
    """The sentencepiece library behind the interface shared by every tokenizer.

    Decoding and `token_bytes` use one table of bytes per id, so streaming
    and whole-text decoding cannot disagree.
    """

    kind = "spm"

    def __init__(self, model_bytes):
        self.model_bytes = model_bytes
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()))
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        if (sp.piece_to_id(SPM_SPACE) == sp.unk_id()
                or sp.encode("a", out_type=str)[0].startswith(SPM_SPACE)):
            raise ValueError("this sentencepiece model adds a space in front or has no space piece, so it "
                             "cannot round-trip: train it with SentencePieceTokenizer.train")
        self.vocab = [self._piece_bytes(i) for i in range(self.vocab_size)]
        # Inside sentencepiece a space *is* "▁", so a literal "▁" in the text
        # would come back as a space. We spell it as its three byte pieces;
        # spaces never use byte pieces (required_chars), so decode can tell.
        byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPM_SPACE.encode()]
        self._literal_space = byte_ids if sp.is_byte(byte_ids[0]) else None

    def _piece_bytes(self, i):
        sp, piece = self.sp, self.sp.id_to_piece(i)
        if sp.is_byte(i):  # "<0xE3>" -> b"\xe3"
            return bytes([int(piece[3:5], 16)])
        if sp.is_control(i):  # <s>, </s> print nothing; control pieces we added print their text
            return b"" if i in (sp.bos_id(), sp.eos_id(), sp.pad_id()) else piece.encode("utf-8")
        if sp.is_unknown(i):
            return UNK_TEXT.encode("utf-8")
        return piece.replace(SPM_SPACE, " ").encode("utf-8")

    @classmethod
    def train(cls, text_or_path, vocab_size, model_type="unigram",
              character_coverage=0.9995, byte_fallback=True, verbose=False):
        """Train on a `str` of text, or on the file at a `Path`; nothing is written
        outside a temporary directory (call `save` to keep the model).

        With byte_fallback=False a character missing from the vocabulary
        becomes `<unk>` (decoded as U+FFFD): smaller, but no longer exact.
        """
        with tempfile.TemporaryDirectory() as tmp:
            if isinstance(text_or_path, os.PathLike):
                source = str(text_or_path)
            else:
                source = os.path.join(tmp, "input.txt")
                with open(source, "w", encoding="utf-8", newline="") as f:
                    f.write(text_or_path)
            try:
                sentencepiece.SentencePieceTrainer.train(
                    input=source, model_prefix=os.path.join(tmp, "tokenizer"),
                    vocab_size=vocab_size, model_type=model_type,
                    character_coverage=character_coverage, byte_fallback=byte_fallback,
                    minloglevel=0 if verbose else 2, **SPM_LOSSLESS)
            except RuntimeError as e:
                raise ValueError(f"sentencepiece could not train a {model_type} model of {vocab_size} pieces: {e}") from e
            return cls(Path(tmp, "tokenizer.model").read_bytes())

    def encode(self, text):
        if SPM_SPACE not in text or self._literal_space is None:
            return self.sp.encode(text)
        ids = []
        for k, part in enumerate(text.split(SPM_SPACE)):
            ids += (self._literal_space if k else []) + self.sp.encode(part)
        return ids

    decode, token_bytes = BPETokenizer.decode, BPETokenizer.token_bytes  # both read self.vocab

    def with_special_tokens(self, tokens):
        """A new tokenizer: this one plus `tokens` as CONTROL pieces, which sentencepiece never
        produces from text. A .model file is a protobuf message, and protobuf appends a repeated
        field's records in the order read, so records added at the end become the last pieces."""
        def field(number, data):  # one length-delimited protobuf field: tag, length, bytes
            assert len(data) < 128, "a longer length needs a multi-byte varint"
            return bytes([number << 3 | 2, len(data)]) + data
        pieces = [field(1, field(1, t.encode("utf-8")) + b"\x18\x03") for t in tokens]  # \x18\x03: type CONTROL
        return type(self)(self.model_bytes + b"".join(pieces))

    def save(self, path):
        Path(path).write_bytes(self.model_bytes)

    @classmethod
    def load(cls, path):
        return cls(Path(path).read_bytes())


class StreamDecoder:
    """Turn ids into text one at a time, never splitting a character.

    "猫" is three UTF-8 bytes; a byte-level model may emit them as three
    tokens. Decoding each token alone would print three U+FFFD; an
    incremental UTF-8 decoder holds the incomplete tail back instead.

    >>> tok = BPETokenizer([])
    >>> stream = StreamDecoder(tok)
    >>> [stream.push(i) for i in tok.encode("猫")], stream.flush()
    (['', '', '猫'], '')
    """

    def __init__(self, tok):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        """The text completed by this token (maybe ''), never half a character."""
        return self._utf8.decode(self.tok.token_bytes(token_id))

    def flush(self):
        """Whatever is held back at the end (U+FFFD if the bytes never completed)."""
        return self._utf8.decode(b"", final=True)


def byte_to_unicode():
    """{byte: character}: GPT-2's printable stand-in for each byte in a byte-level BPE vocabulary. Printable
    Latin-1 bytes stand for themselves, the 68 others take chr(256 + k) in order: b" " is "Ġ" (U+0120)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


class HFTokenizer:
    """A Hugging Face tokenizer.json (`tokenizers` library) behind our interface, for `export.py --from-hf`.

    encode gives exactly AutoTokenizer's ids (with any BOS its post-processor adds); decoding reads a
    table of bytes per id, like the other classes; special tokens, and ids past the tokenizer's end
    (a model's vocab_size may be padded), print nothing."""

    kind = "hf"

    def __init__(self, spec, vocab_size, special):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("this run's tokenizer comes from Hugging Face: pip install tokenizers") from None
        self.spec, self.vocab_size, self.special = spec, vocab_size, dict(special)
        self.tk = Tokenizer.from_str(json.dumps(spec))
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (special.get(k) for k in ("bos", "eos", "pad", "unk"))
        decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
        unicode_byte = {c: b for b, c in byte_to_unicode().items()} if "ByteLevel" in decoder else None
        specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        self.vocab = []  # id -> bytes, the way the decoder would write that token
        for i in range(vocab_size):
            piece = self.tk.id_to_token(i)
            if piece is None or i in specials:
                self.vocab.append(b"")
            elif unicode_byte and all(c in unicode_byte for c in piece):
                self.vocab.append(bytes(unicode_byte[c] for c in piece))
            elif "ByteFallback" in decoder and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                self.vocab.append(bytes([int(piece[3:5], 16)]))
            else:
                self.vocab.append(piece.replace(SPM_SPACE, " " if SPM_SPACE in decoder else SPM_SPACE).encode())

    def encode(self, text):
        return self.tk.encode(text).ids

    decode, token_bytes = BPETokenizer.decode, BPETokenizer.token_bytes

    def save(self, path):
        data = {"kind": self.kind, "vocab_size": self.vocab_size, "special": self.special, "tokenizer": self.spec}
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["tokenizer"], data["vocab_size"], data["special"])


def train_tokenizer(kind, text, vocab_size):
    """Train a tokenizer of `kind` ("char" | "bpe" | "spm"); char ignores vocab_size."""
    trainers = {"char": lambda: CharTokenizer.train(text), "bpe": lambda: BPETokenizer.train(text, vocab_size),
                "spm": lambda: SentencePieceTokenizer.train(text, vocab_size)}
    if kind in trainers:
        return trainers[kind]()
    raise ValueError(f"unknown tokenizer kind {kind!r}: choose one of {', '.join(TOKENIZER_FILES)}")


def load_tokenizer(path):
    """Load whichever tokenizer `path` holds: a tokenizer.json (char or bpe), a
    sentencepiece .model, or a run directory containing one of them."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in dict.fromkeys(TOKENIZER_FILES.values()) if (path / name).exists()]
        if not found:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}: train one with train.py --tokenizer")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.suffix == ".model":
        return SentencePieceTokenizer.load(path)
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        kind = None
    classes = {"char": CharTokenizer, "bpe": BPETokenizer, "hf": HFTokenizer}
    if kind not in classes:
        raise ValueError(f"{path} is neither a tokenizer.json of kind char/bpe/hf nor a sentencepiece .model file")
    return classes[kind].load(path)


def _demo():
    text = ("The king is dead; long live the king. The queen is here, and the "
            "kingdom is the queen's. Then the thing the king sings is the thing "
            "the queen sings: the king and the queen, the queen and the king.")
    tok = BPETokenizer.train(text, vocab_size=256 + 12 + 3, verbose=False)
    print("first merges (bytes shown as text):")
    for k, (a, b) in enumerate(tok.merges):
        print(f"  {256 + k}: {tok.vocab[a]!r} + {tok.vocab[b]!r} -> {tok.vocab[256 + k]!r}")
    for sample in ["the king sings", "王様は歌う"]:
        ids = tok.encode(sample)
        print(f"\n{sample!r}: {len(sample.encode())} bytes -> {len(ids)} tokens {ids}")
        print(f"  pieces: {[tok.token_bytes(i) for i in ids]}")
        print(f"  decode: {tok.decode(ids)!r}  (exact: {tok.decode(ids) == sample})")
    stream = StreamDecoder(tok)
    ids = tok.encode("王様")
    print(f"\nstreaming {ids} one id at a time: {[stream.push(i) for i in ids]} + flush {stream.flush()!r}")
    print(f"special tokens: {tok.special_tokens}; '<|eos|>' as plain text -> {tok.encode('<|eos|>')}, "
          f"allowed -> {tok.encode('<|eos|>', allowed_special='all')}")


if __name__ == "__main__":
    _demo()
