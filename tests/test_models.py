"""Aggregators: the output contract, masks, gradients, and learning on a small problem."""

from __future__ import annotations

import pytest
import torch

from pathmil.models import MILOutput, create_model, list_models
from pathmil.tasks import create_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Every registered aggregator keeps the contract: a new one is tested here without edits.
ALL_MODELS = list_models()
CORE = ["mean_pool", "max_pool", "abmil", "abmil_gated", "instance_regressor", "transmil", "mambamil"]
CORE += ["mhim_abmil", "mhim_abmil_gated", "mhim_transmil"]

# The sequence models at a size that learns this toy problem in seconds (their own tests cover full size).
SMALL = {
    "mambamil": {"d_model": 32, "n_layers": 1},
    "transmil": {"hidden": 64},
    "mhim_transmil": {"hidden": 64},
    "moe_pkt": {"hidden": 32, "attention_hidden": 16},
}


def inputs_for(name: str, in_dim: int) -> dict:
    """The inputs a model declares beyond its settings: MoE-PKT's sources, here two untrained models of
    other aggregators (as a checkpoint describes them; tests/test_transfer.py trains real ones)."""
    if name != "moe_pkt":
        return {}
    source = {"in_dim": in_dim, "n_outputs": 2, "features": {}}
    return {
        "sources": [
            {**source, "name": "a", "aggregator": "abmil", "model_settings": {"hidden": 16}},
            {**source, "name": "b", "aggregator": "mean_pool", "model_settings": {"hidden": 8}},
        ]
    }


def test_registry_lists_the_core_aggregators():
    assert set(CORE) <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_tensors_are_exactly_those_shaped_by_the_number_of_outputs(name):
    """``output_tensors()`` names the head, which ``train.init_from`` and MHIM-MIL's teacher load only where
    the outputs mean the same: for every aggregator, the tensors whose shape follows ``n_outputs`` (and
    for outputs of 1, 4 and 5 nothing else)."""
    states = {c: create_model(name, in_dim=16, n_outputs=c, **inputs_for(name, 16)) for c in (1, 4, 5)}
    shaped = {n for n, t in states[4].state_dict().items() if t.shape != states[5].state_dict()[n].shape}
    shaped |= {n for n, t in states[4].state_dict().items() if t.shape != states[1].state_dict()[n].shape}
    assert shaped and set(states[4].output_tensors()) == shaped


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_contract_and_mask(name):
    torch.manual_seed(0)
    model = create_model(name, in_dim=32, n_outputs=3, **inputs_for(name, 32)).eval()
    x = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    out = model(x, mask)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (2, 3) and out.instance_scores.shape == (2, 12) and out.embedding.shape[0] == 2
    # padded instances change nothing and get no score
    alone = model(x[1:2, :7])
    assert torch.allclose(out.logits[1], alone.logits[0], atol=1e-5)
    padded = x.clone()
    padded[1, 7:] = 1e3
    assert torch.allclose(model(padded, mask).logits[1], out.logits[1], atol=1e-5)
    assert torch.all(out.instance_scores[1, 7:] == 0)
    # a bag of one instance works
    assert model(x[:1, :1]).logits.shape == (1, 3)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_float64_scoring_agrees_across_thread_counts(name):
    """Written scores are computed in float64 on the CPU (pathmil.device.scoring_dtype): every aggregator
    runs in float64, close to its float32 self, and gives the same logits to 1e-12 on one or two threads
    (float32 differs by ~1e-7 there, which a regression target's scale turns into 1e-5 and more)."""
    from pathmil.training.run import scoring_model

    torch.manual_seed(0)
    model = create_model(name, in_dim=64, n_outputs=3, **SMALL.get(name, {}), **inputs_for(name, 64)).eval()
    x = torch.randn(1, 300, 64).half().float()
    wide = scoring_model(model, torch.device("cpu"))
    assert next(wide.parameters()).dtype == torch.float64 and next(model.parameters()).dtype == torch.float32
    outputs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            outputs.append(wide(x.double()).logits)
    torch.set_num_threads(1)
    assert outputs[0].dtype == torch.float64
    assert torch.allclose(outputs[0], outputs[1], rtol=0, atol=1e-12)
    with torch.inference_mode():
        assert torch.allclose(model(x).logits.double(), outputs[0], atol=1e-4)


def test_attention_sums_to_one_and_marks_the_evidence():
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=8, n_outputs=2).eval()
    out = model(torch.randn(3, 20, 8))
    assert torch.allclose(out.instance_scores.sum(dim=1), torch.ones(3), atol=1e-6)


def make_problem(task_name: str, n_bags: int = 48, n: int = 30, dim: int = 16, seed: int = 0):
    """Bags whose label depends on a few key instances (a direction in feature space) among noise."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    key = rng.normal(size=dim)
    key /= np.linalg.norm(key)
    bags, strength = [], []
    for _ in range(n_bags):
        x = rng.normal(size=(n, dim))
        s = rng.uniform(0, 1)
        k = rng.integers(1, 4)
        x[:k] += 4 * s * key
        bags.append(torch.tensor(x, dtype=torch.float32))
        strength.append(s)
    strength = np.array(strength)
    if task_name == "classification":
        labels = pd.DataFrame({"label": (strength > 0.5).astype(int)})
    elif task_name == "regression":
        labels = pd.DataFrame({"stil": 100 * strength})
    else:
        time = 100 * np.exp(-2 * strength) * rng.uniform(0.8, 1.2, n_bags)
        labels = pd.DataFrame({"time": time, "event": (rng.uniform(size=n_bags) < 0.8).astype(int)})
    return bags, labels


@pytest.mark.parametrize("task_name", ["classification", "survival", "regression"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradients_reach_every_parameter_and_loss_falls(name, task_name):
    torch.manual_seed(0)
    bags, labels = make_problem(task_name)
    task = create_task(task_name, **({"loss": "nll"} if task_name == "survival" else {}))
    task.fit(labels)
    targets = task.targets(labels)
    model = create_model(
        name, in_dim=16, n_outputs=task.n_outputs, dropout=0.0, **SMALL.get(name, {}), **inputs_for(name, 16)
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def epoch_loss(train: bool) -> float:
        model.train(train)
        total = []
        for start in range(0, len(bags), 8):
            forward = model.training_forward if train else model
            outputs = [forward(b[None]) for b in bags[start : start + 8]]
            loss = task.loss(torch.cat([o.logits for o in outputs]), targets[start : start + 8])
            aux = [o.aux_loss for o in outputs if o.aux_loss is not None]
            if aux:
                loss = loss + torch.stack(aux).mean()
            if train:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                model.after_step(1, 100)
            total.append(float(loss.detach()))
        return sum(total) / len(total)

    model.train()
    outputs = [model.training_forward(b[None]) for b in bags[:8]]
    loss = task.loss(torch.cat([o.logits for o in outputs]), targets[:8])
    aux = [o.aux_loss for o in outputs if o.aux_loss is not None]
    (loss + (torch.stack(aux).mean() if aux else 0)).backward()
    learnable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    silent = [n for n, p in learnable if p.grad is None or not torch.any(p.grad != 0)]
    assert not silent, f"no gradient reaches {silent}"
    optimizer.zero_grad()
    with torch.no_grad():
        before = epoch_loss(train=False)
    for _ in range(15):
        epoch_loss(train=True)
    with torch.no_grad():
        after = epoch_loss(train=False)
    assert after < 0.8 * before, (before, after)


def test_abmil_attention_dropout_is_its_own_setting():
    """``dropout`` acts after the embedding and, unless ``attention_dropout`` is given, in the attention
    network too (as before the setting existed: ``dropout: 0`` still turns all dropout off);
    ``attention_dropout: 0`` is Ilse et al.'s and the MHIM-MIL code's attention. ABMIL, gated ABMIL and
    MHIM-MIL's ABMIL alike."""

    def rates(model):
        found = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
        assert any("attention" in n for n in found) and any("attention" not in n for n in found)
        return {("attention" if "attention" in n else "embedding", p) for n, p in found.items()}

    cases = [
        ({}, {("attention", 0.25), ("embedding", 0.25)}),
        ({"dropout": 0.0}, {("attention", 0.0), ("embedding", 0.0)}),
        ({"attention_dropout": 0.0}, {("attention", 0.0), ("embedding", 0.25)}),
        ({"dropout": 0.1, "attention_dropout": 0.3}, {("attention", 0.3), ("embedding", 0.1)}),
    ]
    for name in ("abmil", "abmil_gated", "mhim_abmil"):
        for settings, expected in cases:
            model = create_model(name, in_dim=8, n_outputs=2, **settings)
            assert rates(model) == expected, (name, settings)
