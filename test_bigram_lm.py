import math

import torch
import torch.nn.functional as F

from bigram_lm import BigramLM, next_token_loss


def test_loss_at_initialisation_is_near_ln_v():
    torch.manual_seed(0)
    V = 65
    model = BigramLM(V)
    idx = torch.randint(V, (8, 32))
    logits, loss = model(idx, torch.randint(V, (8, 32)))
    assert logits.shape == (8, 32, V)
    assert abs(loss.item() - math.log(V)) < 0.1


def test_logits_are_the_table_rows():
    model = BigramLM(5)
    idx = torch.tensor([[3, 1]])
    logits, loss = model(idx)
    assert loss is None
    assert torch.equal(logits[0, 0], model.table.weight[3]) and torch.equal(logits[0, 1], model.table.weight[1])


def test_loss_matches_hand_computed_cross_entropy():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    targets = torch.tensor([[0, 2]])
    by_hand = (-(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))) + math.log(3)) / 2
    assert abs(next_token_loss(logits, targets).item() - by_hand) < 1e-6
    ignored = torch.tensor([[0, -1]])
    assert torch.allclose(next_token_loss(logits, ignored), F.cross_entropy(logits[0, :1], targets[0, :1]))


def test_bigram_learns_the_bigram_distribution():
    torch.manual_seed(0)
    text = torch.tensor([0, 1, 2] * 40)  # 0 -> 1 -> 2 -> 0 ...: each next token is certain
    model = BigramLM(3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(100):
        _, loss = model(text[None, :-1], text[None, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert model(torch.tensor([[0, 1, 2]]))[0].argmax(-1).tolist() == [[1, 2, 0]]
