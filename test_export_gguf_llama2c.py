"""Tests for export.py's GGUF and llama2.c formats, each read by something other than our code: gguf.GGUFReader
and transformers' GGUF loader (which undoes llama.cpp's q/k row order itself), llama.cpp where llama-cpp-python
is installed, and, for llama2.c, whose C code no registry package ships, a reader and forward pass written here
from the file format's description (interleaved RoPE pairs, base 10000, ids 1 = BOS, bytes at byte + 3)."""
import importlib.util
import re
import struct

import numpy as np
import pytest
import torch

from bpe_tokenizer import BPETokenizer
from char_tokenizer import CharTokenizer
from chat_format import add_chat_tokens, chat_ids, render_chat
from export import export_gguf, export_llama2c, main
from sample import generate, prompt_ids
from test_export import CHAT, EMOJI, ENGLISH, JAPANESE, TEXT, make_run, run_main, tokenizers  # noqa: F401 (fixture)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def half_split_rows(w, heads):
    """Undo llama.cpp's order: per head, row 2i + s holds our row s·D/2 + i (the neighbour pairs of Meta's Llama)."""
    D = w.shape[0] // heads
    return w.reshape(heads, D // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


# --- GGUF ---------------------------------------------------------------------------------------------------

GGUF_CASES = {  # name: (tokenizer kind, preset, overrides)
    "llama-bpe-gqa-bias-linear": ("bpe", "llama", dict(n_kv_head=2, bias=True, tie_weights=False, rope_theta=500.0,
                                                       rope_scaling="linear:2", attn_scale="learnable")),
    "llama-char": ("char", "llama", dict()),
    "moe-spm": ("spm", "moe", dict()),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_reader_reads_every_key_and_tensor(tmp_path, tokenizers, case):
    kind, preset, overrides = GGUF_CASES[case]
    tok = tokenizers[kind]
    model = make_run(tmp_path / "run", tok, preset, **overrides)
    export_gguf(tmp_path / "run", tmp_path / "model.gguf")
    reader, f = gguf_fields(tmp_path / "model.gguf")
    cfg, H, G, D = model.config, model.config.n_head, model.config.kv_heads, model.config.head_dim
    F = cfg.ffn_hidden or 192  # swiglu_hidden(64)
    expected = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 32,
                "llama.embedding_length": 64, "llama.feed_forward_length": F, "llama.attention.head_count": H,
                "llama.attention.head_count_kv": G, "llama.rope.dimension_count": D, "llama.vocab_size": tok.vocab_size,
                "tokenizer.ggml.add_bos_token": False}
    assert {k: f[k] for k in expected} == expected
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    if cfg.rope_scaling:
        assert (f["llama.rope.scaling.type"], f["llama.rope.scaling.factor"]) == ("linear", 2.0)
    if preset == "moe":
        assert (f["llama.expert_count"], f["llama.expert_used_count"]) == (cfg.n_experts, cfg.moe_top_k)
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == tok.vocab_size
    if kind == "spm":
        assert f["tokenizer.ggml.model"] == "llama" and not f["tokenizer.ggml.add_space_prefix"]
        assert tokens == [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
        assert f["tokenizer.ggml.scores"] == pytest.approx([tok.sp.get_score(i) for i in range(tok.vocab_size)])
        assert f["tokenizer.ggml.token_type"][tok.sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
        assert f["tokenizer.ggml.token_type"][tok.sp.piece_to_id("\n")] == gguf.TokenType.USER_DEFINED
        assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)
    elif kind == "bpe":
        assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
        assert tokens[ord("a")] == "a" and tokens[ord(" ")] == "Ġ" and tokens[-3:] == list(tok.special_tokens)
        assert len(f["tokenizer.ggml.merges"]) == len(tok.merges)
        assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)
    else:  # no BOS/EOS of its own: <unk>, never generated, stands in for llama.cpp's real-character defaults 1, 2
        assert tokens[tok.encode("e")[0]] == "e" and tokens[tok.unk_id] == "<unk>"
        cat = tokens[tok.encode("猫")[0]]  # three bytes, spelled as three characters; merged left to right
        assert len(cat) == 3 and {f"{cat[0]} {cat[1]}", f"{cat[:2]} {cat[2]}"} <= set(f["tokenizer.ggml.merges"])
        assert f["tokenizer.ggml.bos_token_id"] == f["tokenizer.ggml.eos_token_id"] == tok.unk_id
    state = {n: t.detach() for n, t in model.state_dict().items()}
    theirs = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    ours = {"token_embd.weight": state["embed.tok.weight"], "output_norm.weight": state["norm.weight"]}
    if not cfg.tie_weights:
        ours["output.weight"] = state["head.weight"]
    for i in range(2):
        b, blk = f"blocks.{i}.", f"blk.{i}."
        qkv = state[b + "attn.qkv.weight"]
        if cfg.attn_scale == "learnable":  # HF and llama.cpp scale by D^-0.5: the learnt scale is folded into q
            qkv = torch.cat([qkv[:H * D] * (state[b + "attn.scale"] * D ** 0.5).repeat_interleave(D)[:, None],
                             qkv[H * D:]])
        theirs[blk + "attn_q.weight"] = half_split_rows(theirs[blk + "attn_q.weight"], H)
        theirs[blk + "attn_k.weight"] = half_split_rows(theirs[blk + "attn_k.weight"], G)
        ours |= {blk + "attn_q.weight": qkv[:H * D], blk + "attn_k.weight": qkv[H * D:(H + G) * D],
                 blk + "attn_v.weight": qkv[(H + G) * D:], blk + "attn_output.weight": state[b + "attn.out_proj.weight"],
                 blk + "attn_norm.weight": state[b + "attn_norm.weight"], blk + "ffn_norm.weight": state[b + "ffn_norm.weight"]}
        if cfg.bias:
            bias = state[b + "attn.qkv.bias"]
            theirs[blk + "attn_q.bias"] = half_split_rows(theirs[blk + "attn_q.bias"], H)
            theirs[blk + "attn_k.bias"] = half_split_rows(theirs[blk + "attn_k.bias"], G)
            ours |= {blk + "attn_q.bias": bias[:H * D] * (state[b + "attn.scale"] * D ** 0.5).repeat_interleave(D),
                     blk + "attn_k.bias": bias[H * D:(H + G) * D], blk + "attn_v.bias": bias[(H + G) * D:],
                     blk + "attn_output.bias": state[b + "attn.out_proj.bias"]}
        for name, gguf_name in (("gate", "ffn_gate"), ("up", "ffn_up"), ("out_proj", "ffn_down")):
            if preset == "moe":
                ours[blk + gguf_name + "_exps.weight"] = torch.stack(
                    [state[f"{b}ffn.experts.{e}.{name}.weight"] for e in range(cfg.n_experts)])
            else:
                ours[blk + gguf_name + ".weight"] = state[f"{b}ffn.{name}.weight"]
        if preset == "moe":
            ours[blk + "ffn_gate_inp.weight"] = state[b + "ffn.router.weight"]
    assert sorted(theirs) == sorted(ours)
    for name, t in ours.items():
        assert theirs[name].shape == t.shape and torch.allclose(theirs[name], t, atol=1e-6), name


@pytest.mark.parametrize("overrides, trained", [(dict(n_kv_head=2, attn_scale="learnable"), False),
                                                (dict(tie_weights=False, rope_scaling="ntk:4"), False),
                                                (dict(), True)])
def test_transformers_gguf_loader_computes_our_logits(tmp_path, tokenizers, overrides, trained):
    """transformers reverses llama.cpp's q/k order when it loads a GGUF: equal logits prove our order is llama.cpp's."""
    tok = tokenizers["bpe"]
    model = make_run(tmp_path / "run", tok, "llama", train_steps=30 if trained else 0, **overrides)
    export_gguf(tmp_path / "run", tmp_path / "model.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    idx = torch.tensor([tok.encode(TEXT)[:32], tok.encode(TEXT)[100:132]])
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max() <= 1e-4


def test_transformers_gguf_tokenizer_gives_our_ids(tmp_path, tokenizers):
    """BPE only: transformers builds a BPE whose merges join tokens, and a char vocabulary's merges join the bytes of
    a character, which are no tokens of it (llama.cpp needs merges only by rank; see the llama.cpp test)."""
    tok = tokenizers["bpe"]
    make_run(tmp_path / "run", tok, "llama")
    export_gguf(tmp_path / "run", tmp_path / "model.gguf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in (ENGLISH, JAPANESE, EMOJI, "spaced , as in ' s and do n't .\n\n  x"):
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip builds llama.cpp from source, slow on 2 cores)")
@pytest.mark.parametrize("kind", ["bpe", "char", "spm"])
def test_llama_cpp_computes_our_logits_and_ids(tmp_path, tokenizers, kind):
    from llama_cpp import Llama

    tok = tokenizers[kind]
    model = make_run(tmp_path / "run", tok, "llama", train_steps=30, n_kv_head=2)
    export_gguf(tmp_path / "run", tmp_path / "model.gguf")
    llm = Llama(model_path=str(tmp_path / "model.gguf"), n_ctx=32, n_threads=1, logits_all=True, verbose=False)
    for text in (ENGLISH, JAPANESE, EMOJI):
        theirs = llm.tokenize(text.encode(), add_bos=False)
        # llama.cpp's "llama" tokenizer merges pieces greedily by score (right for sentencepiece BPE models): a
        # unigram model's text comes out in other pieces, but the same text
        assert theirs == tok.encode(text) if kind != "spm" else llm.detokenize(theirs).decode() == text, text
    ids = tok.encode(TEXT)[:32]
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    # ggml sums float32 products in its own order: a little looser than transformers' 1e-4
    assert (torch.from_numpy(np.array(llm.scores[:32])) - ours).abs().max() <= 1e-3


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_loads_an_ascii_char_run(tmp_path):
    """Tiny Shakespeare's char vocabulary is all ASCII: no character needs a merge, yet llama.cpp wants merges."""
    from llama_cpp import Llama

    tok = CharTokenizer.train(ENGLISH)
    make_run(tmp_path / "run", tok, "llama")
    export_gguf(tmp_path / "run", tmp_path / "model.gguf")
    llm = Llama(model_path=str(tmp_path / "model.gguf"), n_ctx=32, n_threads=1, verbose=False)
    assert llm.tokenize(ENGLISH.encode(), add_bos=False) == tok.encode(ENGLISH)


def test_gguf_refusals_write_nothing(tmp_path, tokenizers, capsys):
    out = tmp_path / "model.gguf"
    make_run(tmp_path / "gpt", tokenizers["char"], "gpt")
    assert "tanh approximation of GELU" in run_main([tmp_path / "gpt", "--format", "gguf", "--out", out], capsys)
    make_run(tmp_path / "top1", tokenizers["char"], "moe", moe_top_k=1)
    assert "moe_top_k=1" in run_main([tmp_path / "top1", "--format", "gguf", "--out", out], capsys)
    assert "moe_top_k=1" in run_main([tmp_path / "top1", "--format", "hf", "--out", tmp_path / "hf"], capsys)
    make_run(tmp_path / "split", BPETokenizer.train(TEXT, 300, pattern=r"\S+|\s+", verbose=False), "llama")
    assert "split pattern" in run_main([tmp_path / "split", "--format", "gguf", "--out", out], capsys)
    assert "--int8 is for --format llama2c" in run_main([tmp_path / "split", "--format", "gguf", "--out", out,
                                                         "--int8"], capsys)
    assert not out.exists() and not (tmp_path / "hf").exists()


# --- llama2.c -----------------------------------------------------------------------------------------------

def read_llama2c(model_path, tokenizer_path):
    """(config, weights as float64 arrays, Q8_0 scales, pieces) from a model.bin of version 0 or 2 and a tokenizer.bin.

    Version 0: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
    vocab_size means the classifier follows), then float32: embedding, per-layer attention norms, wq, wk, wv, wo,
    ffn norms, w1, w2, w3, final norm, two seq_len × head_size/2 RoPE tables, [classifier].
    Version 2: uint32 magic 0x616b3432, int32 version 2, the seven ints, a uint8 shared flag, an int32 group size,
    zeros to byte 256; the norms in float32; then embedding, wq, wk, wv, wo, w1, w2, w3, [classifier], each as
    int8 values followed by one float32 scale per group.
    """
    data = model_path.read_bytes()
    if struct.unpack_from("<I", data)[0] == 0x616B3432:
        version, dim, hidden, L, H, G, V, seq = struct.unpack_from("<8i", data, 4)
        shared, group = struct.unpack_from("<Bi", data, 36)
        pos = 256
    else:
        version, group = 0, None
        dim, hidden, L, H, G, V, seq = struct.unpack_from("<7i", data)
        shared, V, pos = V > 0, abs(V), 28
    cfg = dict(version=version, dim=dim, hidden=hidden, L=L, H=H, G=G, V=V, seq=seq, shared=shared, group=group)
    kv = G * dim // H
    scales = {}

    def take(dtype, n):
        nonlocal pos
        out = np.frombuffer(data, dtype, n, pos)
        pos += n * out.itemsize
        return out

    def matrix(name, rows, cols, layers=None):
        n = rows * cols * (layers or 1)
        if version == 0:
            w = take(np.float32, n).astype(np.float64)
        else:
            parts = [(take(np.int8, rows * cols), take(np.float32, rows * cols // group)) for _ in range(layers or 1)]
            scales[name] = np.concatenate([s for _, s in parts])
            w = np.concatenate([(q.reshape(-1, group) * s[:, None].astype(np.float64)).ravel() for q, s in parts])
        return w.reshape(*([layers] if layers else []), rows, cols)

    w = {}
    if version == 2:
        w["att_norm"], w["ffn_norm"] = (take(np.float32, L * dim).reshape(L, dim) for _ in range(2))
        w["final_norm"] = take(np.float32, dim)
    w["emb"] = matrix("emb", V, dim)
    if version == 0:
        w["att_norm"] = take(np.float32, L * dim).reshape(L, dim)
    for name, rows, cols in (("wq", dim, dim), ("wk", kv, dim), ("wv", kv, dim), ("wo", dim, dim)):
        w[name] = matrix(name, rows, cols, L)
    if version == 0:
        w["ffn_norm"] = take(np.float32, L * dim).reshape(L, dim)
    for name, rows, cols in (("w1", hidden, dim), ("w2", dim, hidden), ("w3", hidden, dim)):
        w[name] = matrix(name, rows, cols, L)
    if version == 0:
        w["final_norm"] = take(np.float32, dim)
        take(np.float32, seq * (dim // H))  # the old RoPE tables, unused
    w["cls"] = w["emb"] if shared else matrix("cls", V, dim)
    assert pos == len(data)
    tok_data = tokenizer_path.read_bytes()
    max_len, pos, pieces, piece_scores = struct.unpack_from("<I", tok_data)[0], 4, [], []
    for _ in range(V):
        score, n = struct.unpack_from("<fi", tok_data, pos)
        pieces.append(tok_data[pos + 8:pos + 8 + n])
        piece_scores.append(score)
        pos += 8 + n
    assert pos == len(tok_data) and max_len == max(map(len, pieces))
    return cfg, w, scales, pieces


def llama2c_forward(cfg, w, tokens):
    """run.c's computation on a whole sequence: logits (T, V). RMSNorm eps 1e-5; RoPE turns the neighbour pair
    (2i, 2i+1) of each head by pos · 10000^(−2i/head_size); query head h reads key/value head h // (H/G)."""
    T, H, G, dim = len(tokens), cfg["H"], cfg["G"], cfg["dim"]
    D = dim // H
    angle = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, D, 2) / D)  # (T, D/2)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

    def rope(v, heads):
        a, b = v.reshape(T, heads, D // 2, 2)[..., 0], v.reshape(T, heads, D // 2, 2)[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(T, heads * D)

    def rmsnorm(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-5) * g

    x = w["emb"][tokens]
    future = np.triu(np.ones((T, T), dtype=bool), 1)
    for layer in range(cfg["L"]):
        h = rmsnorm(x, w["att_norm"][layer])
        q, k, v = rope(h @ w["wq"][layer].T, H), rope(h @ w["wk"][layer].T, G), h @ w["wv"][layer].T
        heads = []
        for head in range(H):
            g = head // (H // G)
            scores = q[:, head * D:(head + 1) * D] @ k[:, g * D:(g + 1) * D].T / np.sqrt(D)
            scores[future] = -np.inf
            p = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append(p / p.sum(-1, keepdims=True) @ v[:, g * D:(g + 1) * D])
        x = x + np.concatenate(heads, axis=1) @ w["wo"][layer].T
        h = rmsnorm(x, w["ffn_norm"][layer])
        gate = h @ w["w1"][layer].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rmsnorm(x, w["final_norm"]) @ w["cls"].T


def run_c_greedy(cfg, w, pieces, steps):
    """run.c's generation from an empty prompt: feed BOS (id 1), take the argmax, stop if it is BOS; the text of
    the pieces, "<0xXX>" read as that byte."""
    tokens = [1]
    for _ in range(steps):
        nxt = int(np.argmax(llama2c_forward(cfg, w, tokens)[-1]))
        if nxt == 1:
            break
        tokens.append(nxt)
    raw = [re.fullmatch(rb"<0x([0-9A-F]{2})>", pieces[t]) for t in tokens[1:]]
    return b"".join(bytes([int(m[1], 16)]) if m else pieces[t] for m, t in zip(raw, tokens[1:])).decode(
        "utf-8", errors="replace")


def expected_rows(tok):
    """The run.c id -> (our embedding row, our head row) that the llama2.c layout rules give, derived here from them:
    ids 0-2 are <unk>/pad, BOS, EOS; bytes at byte + 3; everything else after, in our order."""
    if tok.kind == "bpe":
        specials = [tok.special_tokens[s] for s in ("<|pad|>", "<|bos|>", "<|eos|>")]
        return [(i, i) for i in specials + list(range(256 + len(tok.merges)))]
    if tok.kind == "spm":
        sp = tok.sp
        byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        rest = [i for i in range(3, tok.vocab_size) if i not in byte_ids]
        return [(i, i) for i in [0, 1, 2] + byte_ids + rest]
    unk, newline = tok.unk_id, tok.encode("\n")[0]
    return [(unk, unk), (newline, unk)] + [(unk, unk)] * 257 + [(i, i) for i in range(len(tok.chars))]


@pytest.mark.parametrize("kind, overrides", [("char", dict()), ("bpe", dict(n_kv_head=2, tie_weights=False)),
                                             ("spm", dict(n_kv_head=1, attn_scale="learnable"))])
def test_llama2c_reader_computes_our_logits_and_greedy_text(tmp_path, tokenizers, kind, overrides):
    tok = tokenizers[kind]
    model = make_run(tmp_path / "run", tok, "llama", train_steps=40, **overrides)
    export_llama2c(tmp_path / "run", tmp_path / "l2c")
    cfg, w, _, pieces = read_llama2c(tmp_path / "l2c" / "model.bin", tmp_path / "l2c" / "tokenizer.bin")
    rows = expected_rows(tok)
    assert (cfg["version"], cfg["V"], cfg["seq"], cfg["G"]) == (0, len(rows), 32, model.config.kv_heads)
    start = prompt_ids(tok, "")  # where sample.py starts from nothing: BOS, or a newline without one
    ours_ids = start + tok.encode(TEXT)[:31]
    ids_in = {ours: new for new, (ours, out) in enumerate(rows) if ours == out}
    theirs = llama2c_forward(cfg, w, [1] + [ids_in[i] for i in ours_ids[1:]])
    with torch.no_grad():
        ours = model(torch.tensor([ours_ids]))[0][0].double()
    assert np.abs(theirs - ours[:, [out for _, out in rows]].numpy()).max() <= 1e-4
    assert pieces[3 + ord("a")] in (b"a", b"<0x61>") and pieces[1] != pieces[2]
    text = tok.decode(generate(model, torch.tensor([start]), 25, temperature=0)[0, len(start):].tolist())
    assert run_c_greedy(cfg, w, pieces, 25) == text and len(text.strip()) > 5


def test_llama2c_int8_holds_each_weight_within_half_a_step(tmp_path, tokenizers):
    tok = tokenizers["bpe"]
    make_run(tmp_path / "run", tok, "llama", train_steps=40, tie_weights=False)
    export_llama2c(tmp_path / "run", tmp_path / "fp32")
    main([str(tmp_path / "run"), "--format", "llama2c", "--out", str(tmp_path / "q8"), "--int8"])
    cfg0, w0, _, pieces0 = read_llama2c(tmp_path / "fp32" / "model.bin", tmp_path / "fp32" / "tokenizer.bin")
    cfg8, w8, scales, pieces8 = read_llama2c(tmp_path / "q8" / "model.bin", tmp_path / "q8" / "tokenizer.bin")
    assert (cfg8["version"], cfg8["group"], pieces8) == (2, 64, pieces0)
    assert {k: v for k, v in cfg8.items() if k not in ("version", "group")} == {
        k: v for k, v in cfg0.items() if k not in ("version", "group")}
    for name, scale in scales.items():  # symmetric Q8_0: scale = max |w| / 127 over each group of 64
        exact = w0[name].reshape(-1, 64)
        assert np.allclose(scale, np.abs(exact).max(1) / 127, rtol=1e-6)
        assert (np.abs(w8[name].reshape(-1, 64) - exact) <= scale[:, None] / 2 * (1 + 1e-5)).all(), name
    for name in ("att_norm", "ffn_norm", "final_norm"):
        assert np.array_equal(w8[name], w0[name])
    idx = [1] + tok.encode(TEXT)[:20]
    logits0, logits8 = llama2c_forward(cfg0, w0, idx), llama2c_forward(cfg8, w8, idx)
    assert np.abs(logits8 - logits0).max() <= 0.05 * np.abs(logits0).max()


def test_llama2c_refusals_write_nothing(tmp_path, tokenizers, capsys):
    tok, out = tokenizers["char"], tmp_path / "l2c"
    cases = {"gpt": ("gpt", dict(), "--format hf"), "moe": ("moe", dict(), "no mixture of experts"),
             "theta": ("llama", dict(rope_theta=500.0), "RoPE base other than 10000"),
             "scaling": ("llama", dict(rope_scaling="linear:2"), "no RoPE scaling"),
             "bias": ("llama", dict(bias=True), "no biases")}
    for name, (preset, overrides, message) in cases.items():
        make_run(tmp_path / name, tok, preset, **overrides)
        err = run_main([tmp_path / name, "--format", "llama2c", "--out", out], capsys)
        assert message in err and ("gguf" in err or preset == "gpt"), err
    assert not out.exists()


def test_llama2c_pads_a_char_vocabulary_and_keeps_the_head_apart(tmp_path, tokenizers):
    """run.c's BOS must read as the newline sample.py starts from, yet score as <unk>: the head is written apart."""
    tok = tokenizers["char"]
    model = make_run(tmp_path / "run", tok, "llama")
    export_llama2c(tmp_path / "run", tmp_path / "l2c")
    cfg, w, _, pieces = read_llama2c(tmp_path / "l2c" / "model.bin", tmp_path / "l2c" / "tokenizer.bin")
    assert not cfg["shared"] and cfg["V"] == 3 + 256 + len(tok.chars)
    emb = model.embed.tok.weight.detach().double().numpy()
    assert np.allclose(w["emb"][1], emb[tok.encode("\n")[0]]) and np.allclose(w["cls"][1], emb[tok.unk_id])
    assert pieces[3 + 0xE3] == b"<0xE3>" and pieces[259:] == [c.encode() for c in tok.chars]
    assert model.config.tie_weights


def test_a_chat_run_carries_its_template_and_end_of_turn_into_gguf(tmp_path, tokenizers):
    tok = add_chat_tokens(tokenizers["bpe"])
    make_run(tmp_path / "run", tok, "llama")
    export_gguf(tmp_path / "run", tmp_path / "chat.gguf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="chat.gguf")
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        render_chat(CHAT, add_generation_prompt=True)
    field = gguf.GGUFReader(tmp_path / "chat.gguf").fields["tokenizer.ggml.eot_token_id"]
    assert int(field.parts[field.data[0]][0]) == chat_ids(tok)["<|end|>"]
