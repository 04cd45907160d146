"""The fast generation paths: a batch of prompts in one call, and --compile, each against the plain path."""
import dataclasses

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode

import sample
from sample import compile_for_generation, generate
from transformer import PRESETS, Transformer

TINY = dict(block_size=24, n_layer=2, n_head=2, n_embd=16, vocab_size=11)


def tiny(preset, seed=0):
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(PRESETS[preset], **TINY)).eval()


@pytest.mark.parametrize("preset", ["gpt", "llama"])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_a_batch_of_8_prompts_gives_each_row_what_it_gives_alone(preset, kv_cache):
    model = tiny(preset)
    prompts = torch.randint(TINY["vocab_size"], (8, 5), generator=torch.Generator().manual_seed(1))
    together = generate(model, prompts, 40, temperature=0, kv_cache=kv_cache)  # 45 tokens: the window jumps
    assert together.shape == (8, 45)
    for row in range(8):
        alone = generate(model, prompts[row:row + 1], 40, temperature=0, kv_cache=kv_cache)
        assert torch.equal(together[row], alone[0]), row


def test_rows_that_stop_early_keep_their_stop_id_and_the_others_go_on():
    model = tiny("llama")
    prompts = torch.randint(TINY["vocab_size"], (8, 3), generator=torch.Generator().manual_seed(2))
    free = generate(model, prompts, 12, temperature=0)
    stop = int(free[0, 3 + 4])  # the 5th new token of row 0: row 0 stops there, at the latest
    stopped = generate(model, prompts, 12, temperature=0, stop_ids=[stop])
    for row in range(8):
        new = free[row, 3:].tolist()
        if stop in new:
            cut = 3 + new.index(stop) + 1
            assert torch.equal(stopped[row, :cut], free[row, :cut])
            assert (stopped[row, cut:] == stop).all()
        else:
            assert torch.equal(stopped[row], free[row, :stopped.size(1)])


def test_the_token_buffer_is_written_once_not_copied_per_step(monkeypatch):
    """No per-step torch.cat of the growing sequence: the loop writes into one buffer allocated up front."""
    model = tiny("gpt")
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(sample.torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 30, temperature=0)
    assert out.shape == (1, 31) and calls == []


def test_compiled_greedy_output_equals_the_eager_output(monkeypatch):
    # Inductor's pool of compiling processes ends a pytest run that captures output, silently: compile here.
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    torch._dynamo.reset()
    counters.clear()
    eager = tiny("llama")
    compiled = compile_for_generation(tiny("llama"))  # the same seed: the same weights
    prompt = torch.randint(TINY["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(3))
    # 34 tokens: past the window (a new prefill). One prompt, as sample, cli and server generate; a batch
    # compiles again for its size, which would double this test's time
    assert torch.equal(generate(compiled, prompt, 30, temperature=0), generate(eager, prompt, 30, temperature=0))
    other = prompt[:, :2]  # another prompt length and number of new tokens, as a server's requests have
    assert torch.equal(generate(compiled, other, 9, temperature=0), generate(eager, other, 9, temperature=0))
    # the static KV cache: one graph served every position, both windows and both calls, with no recompilation
    assert counters["stats"]["unique_graphs"] == 1


class Calls(TorchFunctionMode):
    """Records every torch function that reaches it: entered below OneRowLinear, what that mode passes on."""

    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


def test_one_row_linear_computes_f_linear_as_a_product_and_a_sum_and_leaves_more_rows_to_it():
    torch.manual_seed(4)
    layer = torch.nn.Linear(128, 384)  # the llama preset's qkv width, with a bias
    one, two = torch.randn(1, 1, 128), torch.randn(2, 1, 128)
    with Calls() as seen_one, sample.OneRowLinear():
        got_one, no_bias = layer(one), F.linear(one, layer.weight)
    with Calls() as seen_two, sample.OneRowLinear():
        got_two = layer(two)
    assert F.linear not in seen_one.funcs and F.linear in seen_two.funcs
    torch.testing.assert_close(got_one, one @ layer.weight.T + layer.bias, rtol=0, atol=1e-5)
    torch.testing.assert_close(no_bias, one @ layer.weight.T, rtol=0, atol=1e-5)
    assert got_one.shape == (1, 1, 384) and torch.equal(got_two, layer(two))  # two rows: F.linear's own result
