"""Knowledge transfer: `train.init_from` (fine-tuning) and the MoE-PKT aggregator (Path-PKT)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import make_synthetic_cohort

from pathmil.cli import main
from pathmil.errors import PathmilError
from pathmil.models import create_model
from pathmil.models.moe_pkt import MoEPKT, MoEPKTConfig, build_source
from pathmil.tasks import Task, create_task
from pathmil.training.run import TrainConfig, load_run
from pathmil.training.transfer import init_from

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--set", "epochs=3", "--set", "min_epochs=1", "--no-progress"]


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Synthetic bags, 2-fold splits per task and a source: a packaged 2-fold classification ABMIL."""
    root = tmp_path_factory.mktemp("transfer")
    features, table = make_synthetic_cohort(root, n_patients=16, extra_slides=4, dim=16)
    out = {"root": root, "features": features, "cohort": table}
    for task in ("classification", "survival", "regression"):
        splits = root / f"splits_{task}.csv"
        assert (
            main(["split", "--cohort", str(table), "--task", task, "--folds", "2", "--out", str(splits)]) == 0
        )
        out[task] = splits
    runs = [train(out, "classification", root / f"source{fold}", fold=fold) for fold in (0, 1)]
    package = root / "source.pathmil"
    assert main(["package", "--runs", *map(str, runs), "--out", str(package), "--n-bootstrap", "10"]) == 0
    out["package"] = package
    out["runs"] = runs
    return out


def train(data: dict, task: str, out: Path, fold: int = 0, *extra: str) -> Path:
    args = ["train", "--features", str(data["features"]), "--cohort", str(data["cohort"])]
    args += ["--splits", str(data[task]), "--fold", str(fold), "--task", task, "--out", str(out)]
    assert main([*args, *TINY, "--set", "model.hidden=16", *extra]) == 0
    return out


# ------------------------------------------------------------------------------------- fine-tuning


def test_init_from_loads_what_fits_and_says_what_did_not(cohort, caplog):
    """A survival model with 3 time bins starts from the 2-class source: everything but the head loads,
    and one log line names the head's tensors with both shapes."""
    source = load_run(cohort["runs"][0])
    task = create_task("survival", n_bins=3)
    task.fit(pd.DataFrame({"time": [1.0, 2, 3, 4, 5, 6], "event": [1, 1, 1, 1, 1, 1]}))
    model = create_model("abmil", in_dim=16, n_outputs=task.n_outputs, hidden=16)
    head = model.classifier.weight.detach().clone()
    info = {"dim": 16, "encoder": "synthetic", "random_init": False}
    with caplog.at_level(logging.INFO, logger="pathmil.training.transfer"):
        result = init_from(model, cohort["package"], info, task)
    assert result["differ"] == ["classifier.weight", "classifier.bias"] and not result["absent"]
    for name in result["loaded"]:
        assert torch.equal(model.state_dict()[name], source.model.state_dict()[name]), name
    assert torch.equal(model.classifier.weight, head)  # left as initialised
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "classifier.weight (2x16 in the source, 3x16 here)" in lines[0]
    assert "the source has 2 outputs, this task 3" in lines[0]


def fitted(name: str, n_bins: int = 3, **labels: list) -> Task:
    task = create_task(name, **({"n_bins": n_bins} if name == "survival" else {}))
    task.fit(pd.DataFrame(labels))
    return task


def test_init_from_refuses_a_source_of_other_features(cohort, tmp_path):
    model = create_model("abmil", in_dim=16, n_outputs=2, hidden=16)
    binary = fitted("classification", label=[0, 1, 0, 1])
    with pytest.raises(PathmilError, match="trained on features of encoder synthetic, these bags hold uni"):
        init_from(model, cohort["package"], {"dim": 16, "encoder": "uni", "random_init": False}, binary)
    with pytest.raises(PathmilError, match="was trained on 16-d features"):
        init_from(create_model("abmil", in_dim=8, n_outputs=2), cohort["runs"][0], {"dim": 8}, binary)
    with pytest.raises(PathmilError, match="none of its tensors fits"):
        model = create_model("mean_pool", in_dim=16, n_outputs=3, hidden=4)
        init_from(model, cohort["runs"][0], {"dim": 16}, fitted("classification", label=[0, 1, 2]))


@pytest.mark.parametrize(
    ("task", "loads_head"),
    [
        (fitted("classification", label=[0, 1, 1, 0]), True),  # the source's classes 0, 1
        (fitted("classification", label=["LUAD", "LUSC", "LUAD"]), False),  # two other classes
        (fitted("survival", n_bins=2, time=[1.0, 2, 3, 4], event=[1, 1, 0, 1]), False),  # 2 time bins
    ],
    ids=["same-classes", "other-classes", "survival"],
)
def test_init_from_loads_the_head_only_where_the_outputs_mean_the_same(cohort, caplog, task, loads_head):
    """A head of the right shape but another meaning (another cohort's two classes, two survival time
    bins) is left as initialised, with one warning that names both; the same classes load it."""
    source = load_run(cohort["runs"][0]).model.state_dict()
    model = create_model("abmil", in_dim=16, n_outputs=task.n_outputs, hidden=16)
    fresh = model.classifier.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="pathmil.training.transfer"):
        result = init_from(model, cohort["runs"][0], {"dim": 16, "encoder": "synthetic"}, task)
    head = ["classifier.weight", "classifier.bias"]
    for name in result["loaded"]:
        assert torch.equal(model.state_dict()[name], source[name]), name
    assert any("attention" in n for n in result["loaded"])  # the rest of the model loads
    if loads_head:
        assert set(head) <= set(result["loaded"]) and not result["other_outputs"]
        assert torch.equal(model.classifier.weight, source["classifier.weight"])
    else:
        assert task.n_outputs == 2 and result["other_outputs"] == head
        assert torch.equal(model.classifier.weight, fresh)
        this = "classification (classes LUAD, LUSC)" if task.name == "classification" else "survival (nll loss; 2"
        assert f"the source's outputs are classification (classes 0, 1), this run's {this}" in caplog.text


def test_a_head_of_the_same_classes_but_another_label_column_loads_with_a_warning(cohort, caplog):
    """Classes 0, 1 of column event and classes 0, 1 of column label: the head has the right shape and
    maybe the right meaning (the same label renamed in another cohort), so it loads, and a warning names
    both columns."""
    task = create_task("classification", target=["event"])
    task.fit(pd.DataFrame({"event": [0, 1, 0, 1]}))
    model = create_model("abmil", in_dim=16, n_outputs=2, hidden=16)
    with caplog.at_level(logging.INFO, logger="pathmil.training.transfer"):
        result = init_from(model, cohort["runs"][0], {"dim": 16, "encoder": "synthetic"}, task)
    assert "classifier.weight" in result["loaded"]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "the source predicted column label and this run predicts event" in lines[0]


def test_a_source_that_trained_on_this_folds_test_patients_is_named_in_a_warning(cohort, caplog):
    """Fine-tuning fold 0 from fold 1's run of the same cohort starts from weights that learned fold 0's
    test patients: the metrics would be optimistic. A warning names the source and the count; fold 0's own
    run, or a package whose first fold model (the one init_from loads) is fold 0's, does not trigger it."""
    test = read_csv(cohort["classification"]).query("fold == 0 and split == 'test'")["patient_id"].nunique()
    # a package: init_from loads its first fold model only (fold 0's), so fold 1's member is not named
    for name, source, warned in (("fold1", cohort["runs"][1], True), ("fold0", cohort["runs"][0], False),
                                 ("package", cohort["package"], False)):  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pathmil.training.fit"):
            train(cohort, "classification", cohort["root"] / f"ft_{name}", 0, "--set", f"init_from={source}")
        lines = [r.getMessage() for r in caplog.records if "of this fold's" in r.getMessage()]
        assert bool(lines) == warned, lines
        if warned:
            assert f"source model {source / 'best.pt'} trained on {test} of this fold's {test} test" in lines[0]


def test_fine_tuning_runs_repeat_exactly_with_a_seed(cohort):
    extra = ["--set", f"init_from={cohort['package']}", "--set", "seed=3"]
    first = train(cohort, "survival", cohort["root"] / "ft_a", 0, *extra)
    second = train(cohort, "survival", cohort["root"] / "ft_b", 0, *extra)
    assert read_csv(first / "predictions.csv").equals(read_csv(second / "predictions.csv"))
    scratch = train(cohort, "survival", cohort["root"] / "scratch", 0, "--set", "seed=3")
    assert not read_csv(scratch / "predictions.csv").equals(read_csv(first / "predictions.csv"))
    # another source: compare keeps the two fine-tunings apart, each named by its source
    run_source = str(cohort["runs"][1])
    other = train(
        cohort, "survival", cohort["root"] / "ft_c", 0, "--set", f"init_from={run_source}", "--set", "seed=3"
    )
    out = cohort["root"] / "compare_sources"
    assert (
        main(
            [
                "compare",
                "--runs",
                str(first),
                str(other),
                str(scratch),
                "--out",
                str(out),
                "--n-bootstrap",
                "10",
            ]
        )
        == 0
    )
    labels = set(read_csv(out / "comparison.csv")["configuration"])
    assert labels == {
        "abmil",
        f"abmil (fine-tuned) from {cohort['package']}",
        f"abmil (fine-tuned) from {run_source}",
    }


# ------------------------------------------------------------------------------------------ MoE-PKT


def random_sources(n: int, in_dim: int = 16) -> list[dict]:
    return [
        {
            "name": f"s{i}",
            "aggregator": "abmil",
            "model_settings": {"hidden": 8 + i},
            "in_dim": in_dim,
            "n_outputs": 2,
            "features": {},
        }
        for i in range(n)
    ]


def test_router_weights_sum_to_one_and_keep_the_top_k():
    torch.manual_seed(0)
    model = create_model("moe_pkt", 16, 3, top_k=2, hidden=8, sources=random_sources(4)).eval()
    assert model.n_experts == 5  # four sources and the target's own expert
    x = torch.randn(6, 20, 16)
    gates, probabilities, _, attention, _ = model.route(x)
    assert torch.allclose(gates.sum(-1), torch.ones(6), atol=1e-6)
    assert ((gates > 0).sum(-1) == 2).all()
    chosen = probabilities.topk(2, dim=-1).indices
    assert torch.equal((gates > 0), torch.zeros_like(gates, dtype=torch.bool).scatter(-1, chosen, True))
    assert torch.allclose(attention.sum(-1), torch.ones(6), atol=1e-6)
    everyone = create_model("moe_pkt", 16, 3, top_k=9, hidden=8, sources=random_sources(2)).eval()
    assert everyone.top_k == 3 and (everyone.route(x)[0] > 0).all()  # fewer experts than k: all of them


def test_router_losses_follow_their_definitions():
    """Load balancing (Switch Transformers): K sum_i f_i P_i; z-loss (ST-MoE): mean logsumexp^2."""
    model = create_model(
        "moe_pkt", 16, 2, top_k=1, balance_weight=1.0, z_weight=0.0, sources=random_sources(1)
    )
    probabilities = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    one_expert = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    logits = torch.log(probabilities)
    assert torch.isclose(model.router_losses(one_expert, probabilities, logits), torch.tensor(2 * 0.65))
    balanced = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.isclose(model.router_losses(balanced, torch.full((2, 2), 0.5), logits), torch.tensor(1.0))
    model.config.balance_weight, model.config.z_weight = 0.0, 1.0
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    expected = torch.logsumexp(logits, -1).pow(2).mean()
    assert torch.isclose(model.router_losses(balanced, probabilities, logits), expected)


def test_with_one_source_moe_pkt_is_a_head_fine_tuned_on_its_embeddings(cohort):
    """One source, no own expert: the gate is 1, the output is Linear(ReLU(W e_s)) of the frozen source's
    embedding, and training it is training that head on the precomputed embeddings (same steps, same
    weights), while the source stays as it was."""
    torch.manual_seed(0)
    config = {"hidden": 8, "self_expert": False, "dropout": 0.0, "balance_weight": 0.0, "z_weight": 0.0}
    model = create_model("moe_pkt", 16, 1, sources=[str(cohort["runs"][0])], **config)
    source = load_run(cohort["runs"][0]).model
    head = torch.nn.Sequential(*model.experts[0], model.classifier)
    reference = torch.nn.Sequential(
        torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Dropout(0.0), torch.nn.Linear(8, 1)
    )
    reference.load_state_dict(head.state_dict())
    rng = np.random.default_rng(0)
    bags = [
        torch.tensor(rng.normal(size=(int(rng.integers(5, 30)), 16)), dtype=torch.float32) for _ in range(12)
    ]
    targets = torch.tensor(rng.normal(size=12), dtype=torch.float32)
    with torch.no_grad():
        embeddings = torch.cat([source(b[None]).embedding for b in bags])
    ours = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    theirs = torch.optim.Adam(reference.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.sources.state_dict().items()}
    model.train()
    for _ in range(5):
        out = model.training_forward(torch.nn.utils.rnn.pad_sequence(bags, batch_first=True), _mask(bags))
        assert torch.equal(model.route(bags[0][None])[0], torch.ones(1, 1))
        loss = ((out.logits[:, 0] - targets) ** 2).mean() + out.aux_loss
        ours.zero_grad()
        loss.backward()
        ours.step()
        ref_loss = ((reference(embeddings)[:, 0] - targets) ** 2).mean()
        theirs.zero_grad()
        ref_loss.backward()
        theirs.step()
        assert torch.isclose(loss, ref_loss, atol=1e-6)
    for (name, ours_p), theirs_p in zip(
        head.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.allclose(ours_p, theirs_p, atol=1e-6), name
    assert all(torch.equal(v, before[k]) for k, v in model.sources.state_dict().items())


def _mask(bags: list[torch.Tensor]) -> torch.Tensor:
    lengths = torch.tensor([len(b) for b in bags])
    return torch.arange(int(lengths.max()))[None] < lengths[:, None]


@pytest.mark.parametrize("task", ["classification", "survival", "regression"])
def test_moe_pkt_trains_for_every_task_and_predicts_without_its_sources(cohort, task, tmp_path):
    """Sources: the packaged classification folds (two experts); the trained model's checkpoint carries
    them, so it predicts after the package is gone, exactly as training scored its bags."""
    package = tmp_path / "source.pathmil"
    shutil.copytree(cohort["package"], package)
    extra = ["--aggregator", "moe_pkt", "--set", f"sources=[{package}]", "--set", "model.attention_hidden=8"]
    run = train(cohort, task, tmp_path / "moe", 0, *extra)
    history = read_csv(run / "history.csv")
    assert np.isfinite(history["train_loss"]).all()
    shutil.rmtree(package)
    loaded = load_run(run)
    assert isinstance(loaded.model, MoEPKT) and len(loaded.model.sources) == 2
    out = tmp_path / "p.csv"
    args = ["predict", "--model", str(run / "best.pt"), "--cohort", str(cohort["cohort"])]
    assert main([*args, "--features-dir", str(cohort["features"]), "--out", str(out)]) == 0
    ours = read_csv(out).set_index("slide_id")
    theirs = read_csv(run / "predictions.csv").set_index("slide_id")
    np.testing.assert_allclose(ours.loc[theirs.index, "score"], theirs["score"], rtol=0, atol=1e-6)


def test_moe_pkt_runs_repeat_exactly_with_a_seed(cohort):
    extra = ["--aggregator", "moe_pkt", "--set", f"sources=[{cohort['package']}]", "--set", "seed=5"]
    first = train(cohort, "survival", cohort["root"] / "moe_a", 1, *extra)
    second = train(cohort, "survival", cohort["root"] / "moe_b", 1, *extra)
    assert read_csv(first / "predictions.csv").equals(read_csv(second / "predictions.csv"))


def test_moe_pkt_needs_sources_of_the_same_features(cohort, tmp_path, capsys):
    with pytest.raises(PathmilError, match=r"moe_pkt needs source models: set train\.sources to"):
        TrainConfig.build({"aggregator": "moe_pkt"})
    with pytest.raises(PathmilError, match="trained on 16-d features, these bags are 8-d"):
        create_model("moe_pkt", 8, 2, sources=[str(cohort["package"])])
    with pytest.raises(PathmilError, match="use the models it was built from as sources"):
        build_source({**random_sources(1)[0], "aggregator": "moe_pkt"})
    assert MoEPKTConfig().top_k == 5 and MoEPKTConfig().balance_weight == 0.01  # Path-PKT's settings
