"""Stage 6 — the bigram language model.

The smallest model that learns anything: the next character depends only on
the current one. A single V×V table holds, in row i, the logits (unnormalised
log-probabilities) of every token that may follow token i. Training it by
cross-entropy is counting bigrams by gradient descent; on Tiny Shakespeare it
plateaus near 2.45 nats per character.

New since stage 5: a model with the call every later model shares,
`logits, loss = model(idx, targets)`, and the one loss function
(`next_token_loss`) that training and evaluation both use.
Run the demo: `python bigram_lm.py`
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Shapes: B batch, T time (positions), V vocabulary.


def next_token_loss(logits, targets):
    """Mean cross-entropy of next-token prediction, the loss of every model here.

    logits (B, T, V) float, targets (B, T) int64 (−1 marks a position not scored).
    Returns a scalar tensor in nats per token.
    """
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), ignore_index=-1)


class BigramLM(nn.Module):
    """Logits for the next token read straight from a (V, V) table."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.table = nn.Embedding(vocab_size, vocab_size)  # row i: logits of what follows token i
        nn.init.normal_(self.table.weight, std=0.02)  # near-uniform start: loss ≈ ln(V)

    def forward(self, idx, targets=None):
        """idx (B, T) int64 -> logits (B, T, V), loss (scalar or None)."""
        logits = self.table(idx)  # (B, T) -> (B, T, V)
        loss = None if targets is None else next_token_loss(logits, targets)
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def _demo():
    torch.manual_seed(0)
    V = 65
    model = BigramLM(V)
    idx = torch.randint(V, (4, 8))
    logits, loss = model(idx, torch.roll(idx, -1, dims=1))
    print(f"idx {tuple(idx.shape)} -> logits {tuple(logits.shape)}")
    print(f"loss at init {loss.item():.3f} nats; ln(V) = {math.log(V):.3f}")


if __name__ == "__main__":
    _demo()
