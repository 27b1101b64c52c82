"""TransMIL and its Nystrom attention: shapes, padding invariance, exactness where Nystrom is exact,
the class token's attention row, and gradients."""

from __future__ import annotations

import pytest
import torch
from test_models import make_problem

from pathmil.models import create_model
from pathmil.models.transmil import NystromAttention, iterative_pinv
from pathmil.tasks import create_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shapes_scores_and_padding_invariance():
    torch.manual_seed(0)
    model = create_model("transmil", in_dim=16, n_outputs=3, hidden=32, landmarks=8).eval()
    x = torch.randn(2, 30, 16)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 19:] = False
    out = model(x, mask)
    assert out.logits.shape == (2, 3) and out.embedding.shape == (2, 32)
    assert out.instance_scores.shape == (2, 30) and out.instance_embeddings.shape == (2, 30, 32)
    # scores: the class token's attention over real instances only, summing to one
    assert torch.allclose(out.instance_scores.sum(dim=1), torch.ones(2), atol=1e-5)
    assert torch.all(out.instance_scores >= 0) and torch.all(out.instance_scores[1, 19:] == 0)
    # a padded bag equals the bag alone, whatever the padding holds
    alone = model(x[1:2, :19])
    assert torch.allclose(out.logits[1], alone.logits[0], atol=1e-5)
    assert torch.allclose(out.instance_scores[1, :19], alone.instance_scores[0], atol=1e-6)
    garbage = x.clone()
    garbage[1, 19:] = 1e3
    assert torch.allclose(model(garbage, mask).logits, out.logits, atol=1e-5)
    # a bag of one instance, and a bag of a non-square size with repeated padding tokens
    assert model(x[:1, :1]).instance_scores.tolist() == [[1.0]]
    assert model(x[:1, :7]).instance_scores.shape == (1, 7)


def test_nystrom_is_exact_when_landmarks_are_the_distinct_tokens():
    """With tokens constant over each landmark segment, Nystrom's approximation is exact: the landmark
    kernel rows equal the token kernel rows and pinv(K2) K2 = I."""
    torch.manual_seed(1)
    attention = NystromAttention(16, heads=2, landmarks=4, pinv_iterations=25).eval()
    with torch.no_grad():
        attention.residual.weight.zero_()
    x = torch.randn(1, 4, 16).repeat_interleave(8, dim=1)  # 32 tokens, 4 segments of 8
    out, first = attention(x)
    q, k, v = attention.to_qkv(x).view(1, 32, 3, 2, 8).permute(2, 0, 3, 1, 4)
    exact = torch.softmax(q * 8**-0.5 @ k.transpose(-1, -2), dim=-1)
    expected = attention.to_out((exact @ v).transpose(1, 2).reshape(1, 32, 16))
    assert torch.allclose(out, expected, atol=1e-4)
    assert torch.allclose(first, exact[..., 0, :], atol=1e-4)


def test_class_token_row_is_the_attention_the_layer_applies():
    """The returned first row reproduces the first token's output (residual convolution zeroed)."""
    torch.manual_seed(2)
    attention = NystromAttention(32, heads=8, landmarks=4).eval()
    with torch.no_grad():
        attention.residual.weight.zero_()
    x = torch.randn(1, 21, 32)
    out, first = attention(x)
    v = attention.to_qkv(x).view(1, 21, 3, 8, 4).permute(2, 0, 3, 1, 4)[2]
    mixed = (first[..., None] * v).sum(dim=-2).reshape(1, 32)
    assert torch.allclose(attention.to_out(mixed), out[:, 0], atol=1e-5)


def test_iterative_pinv_converges_to_the_inverse():
    """The iteration converges fast once close (TransMIL runs 6 steps on its landmark kernels)."""
    torch.manual_seed(3)
    a = torch.softmax(torch.randn(3, 16, 16) + 4 * torch.eye(16), dim=-1).double()
    assert torch.allclose(iterative_pinv(a, iterations=12), torch.linalg.inv(a), atol=1e-8)
    rough = (iterative_pinv(a, iterations=4) - torch.linalg.inv(a)).abs().max()
    assert rough > 1e-3  # the test can tell a converged iteration from an unconverged one


@pytest.mark.parametrize("task_name", ["classification", "survival", "regression"])
def test_gradients_reach_every_parameter(task_name):
    torch.manual_seed(0)
    bags, labels = make_problem(task_name, n_bags=6, n=40)
    task = create_task(task_name, **({"loss": "nll"} if task_name == "survival" else {}))
    task.fit(labels)
    model = create_model("transmil", in_dim=16, n_outputs=task.n_outputs, hidden=32, landmarks=8)
    logits = torch.cat([model(b[None]).logits for b in bags])  # 41 tokens: the Nystrom path
    task.loss(logits, task.targets(labels)).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not silent, f"no gradient reaches {silent}"


def test_loss_falls_on_a_learnable_problem():
    torch.manual_seed(0)
    bags, labels = make_problem("classification", n_bags=16, n=30)
    task = create_task("classification")
    task.fit(labels)
    targets = task.targets(labels)
    model = create_model("transmil", in_dim=16, n_outputs=2, hidden=32, landmarks=16, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        return task.loss(torch.cat([model(b[None]).logits for b in bags]), targets)

    with torch.no_grad():
        before = float(loss())
    for _ in range(12):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert float(loss()) < 0.7 * before
