"""Fine-tuning against a real MLflow store: frozen backbone, lineage, resume, tenant names.

One sqlite store per module (creating it takes seconds); a tiny randomly initialised
backbone is registered in it and pulled by alias, as a pretrained one would be.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers_data import write_small_dataset
from mlflow.tracking import MlflowClient

from adaptors.bundle import load_bundle
from adaptors.commands import register_commands
from adaptors.config import FinetuneConfig
from adaptors.finetune import (
    epoch_batches,
    next_item_loss,
    run_finetune,
    train_epoch,
    window_tensor,
)
from adaptors.rescore import evaluate_registered
from pretrain.model import BackboneConfig, UniSRec
from pretrain.registry import register_backbone
from unisrec.config import from_dict, load_config
from unisrec.errors import ConfigError

BACKBONE = "test-backbone"
BACKBONE_ALIAS = "prod"
TINY = {
    "hidden_size": 16,
    "inner_size": 32,
    "num_experts": 2,
    "max_seq_len": 10,
    "dropout": 0.1,
    "attn_dropout": 0.1,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    data = write_small_dataset(root / "data", domains=("office", "garden"))
    torch.manual_seed(0)
    backbone = UniSRec(from_dict(BackboneConfig, TINY), text_dim=8)
    mlflow.set_experiment("pretrain")
    with mlflow.start_run() as run:
        pass
    register_backbone(
        backbone,
        run_id=run.info.run_id,
        name=BACKBONE,
        alias=BACKBONE_ALIAS,
        data_digest="pretrain-digest",
        encoder="test-encoder",
        encoder_dim=8,
        config_hash="0" * 16,
    )
    return {"root": root, "uri": uri, "data": data, "backbone": backbone, "run_id": run.info.run_id}


def finetune_config(store: dict, tenant: str, **overrides) -> FinetuneConfig:
    raw = {
        "tenant": tenant,
        "data": {"dir": str(store["data"]), "domain": "office"},
        "backbone": f"models:/{BACKBONE}@{BACKBONE_ALIAS}",
        "model": TINY,
        "optim": {"max_epochs": 2, "batch_size": 16, "lr": 1e-2},
        "mlflow": {"tracking_uri": store["uri"]},
        "output_root": str(store["root"] / "runs"),
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(FinetuneConfig, raw)


def best_state(summary: dict) -> dict[str, torch.Tensor]:
    return torch.load(Path(summary["output_dir"]) / "best.pt", weights_only=False)["model"]


def test_inductive_finetune_leaves_backbone_bit_identical_and_changes_adaptor(store):
    summary = run_finetune(finetune_config(store, "acme"), progress=False)
    trained = best_state(summary)
    assert summary["best_epoch"] >= 1, "no epoch improved on the initial state"
    original = store["backbone"].state_dict()
    for name, value in original.items():
        if name.startswith("encoder.") and not name.startswith("encoder.norm."):
            assert torch.equal(trained[name], value), f"frozen {name} changed"
    changed = [
        n
        for n in original
        if n.startswith(("adaptor.", "encoder.norm.")) and not torch.equal(trained[n], original[n])
    ]
    assert any(n.startswith("adaptor.") for n in changed), "the adaptor did not train"
    assert any(n.startswith("encoder.norm.") for n in changed), "the input norm did not train"


def test_transductive_trains_id_embeddings_and_not_the_backbone(store):
    summary = run_finetune(finetune_config(store, "acme-ids", mode="transductive"), progress=False)
    trained = best_state(summary)
    assert trained["item_ids.weight"].shape == (31, 16)
    assert trained["item_ids.weight"][1:].abs().sum() > 0
    for name, value in store["backbone"].state_dict().items():
        if name.startswith("encoder.") and not name.startswith("encoder.norm."):
            assert torch.equal(trained[name], value)
    model, spec = load_bundle(Path(summary["output_dir"]) / "adaptor")
    assert spec.mode == "transductive" and not spec.trains_everything
    assert torch.equal(model.item_ids.weight, trained["item_ids.weight"])


def test_adaptor_is_registered_small_with_lineage_tags_and_latest_alias(store):
    summary = run_finetune(finetune_config(store, "lineage"), progress=False)
    client = MlflowClient()
    version = client.get_model_version_by_alias("unisrec-adaptor-lineage", "latest")
    assert str(version.version) == summary["model_version"]
    tags = version.tags
    assert tags["unisrec.tenant"] == "lineage"
    assert tags["unisrec.backbone_name"] == BACKBONE
    assert tags["unisrec.backbone_version"] == "1"
    assert tags["unisrec.backbone_run_id"] == store["run_id"]
    assert tags["unisrec.domain"] == "office"
    assert tags["unisrec.mode"] == "inductive"
    assert tags["unisrec.encoder"] == "test-encoder"
    assert (
        tags["unisrec.data_digest"]
        == json.loads((store["data"] / "manifest.json").read_text())["digest"]
    )
    stored = torch.load(Path(summary["output_dir"]) / "adaptor" / "trained.pt", weights_only=True)
    assert stored and all(k.startswith(("adaptor.", "encoder.norm.")) for k in stored), (
        "the backbone was copied"
    )
    assert {"encoder.norm.weight", "encoder.norm.bias"} <= set(stored)


def test_metrics_json_has_both_splits_popularity_groups_and_run_facts(store):
    summary = run_finetune(finetune_config(store, "metrics"), progress=False)
    metrics = json.loads((Path(summary["output_dir"]) / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert set(metrics[split]) == {"recall@10", "ndcg@10", "recall@50", "ndcg@50"}
        assert 0 <= metrics[split]["ndcg@10"] <= metrics[split]["recall@10"] <= 1
    assert metrics["test"]["recall@50"] == 1.0  # 30 items: every target is in the top 50
    assert len(metrics["test_by_popularity"]) == 5
    assert sum(g["count"] for g in metrics["test_by_popularity"]) == 40
    assert metrics["mode"] == "inductive" and metrics["backbone"] == f"models:/{BACKBONE}/1"
    assert 1 <= metrics["best_epoch"] <= 2


def test_evaluate_registered_reproduces_the_finetune_test_metrics(store):
    summary = run_finetune(finetune_config(store, "rescored"), progress=False)
    out = store["root"] / "evaluate"
    rescored = evaluate_registered(
        "models:/unisrec-adaptor-rescored@latest", str(store["data"]), "", str(out), ks=[10, 50]
    )
    assert rescored["test"] == pytest.approx(summary["test"])
    assert json.loads((out / "metrics.json").read_text())["domain"] == "office"


def test_inductive_adaptor_scores_another_domain_but_an_id_model_refuses(store):
    from unisrec.errors import DataError

    run_finetune(finetune_config(store, "cross"), progress=False)
    run_finetune(finetune_config(store, "cross-ids", mode="transductive"), progress=False)
    out = str(store["root"] / "evaluate-cross")
    garden = evaluate_registered(
        "models:/unisrec-adaptor-cross@latest", str(store["data"]), "garden", out, ks=[10]
    )
    assert garden["domain"] == "garden"
    with pytest.raises(DataError, match="only the 30 items of 'office'"):
        evaluate_registered(
            "models:/unisrec-adaptor-cross-ids@latest", str(store["data"]), "garden", out, ks=[10]
        )


def test_backbone_of_another_text_encoder_is_refused(store):
    other = write_small_dataset(store["root"] / "other-encoder", encoder_name="another-encoder")
    cfg = finetune_config(store, "mismatch", data__dir=str(other))
    with pytest.raises(ConfigError, match="another-encoder"):
        run_finetune(cfg, progress=False)


def test_missing_backbone_is_a_config_error(store):
    cfg = finetune_config(store, "nobackbone", backbone="models:/no-such-backbone@prod")
    with pytest.raises(ConfigError, match="not in the model registry"):
        run_finetune(cfg, progress=False)


@pytest.mark.parametrize(
    ("tenant", "overrides", "trains"),
    [
        ("scratch", {"backbone": "none"}, "unisrec"),
        ("full", {"full_finetune": True}, "unisrec"),
        ("sasrec", {"backbone": "none", "baseline": "sasrec"}, "sasrec"),
    ],
)
def test_from_scratch_full_and_sasrec_train_every_parameter(store, tenant, overrides, trains):
    summary = run_finetune(finetune_config(store, tenant, **overrides), progress=False)
    stored = torch.load(Path(summary["output_dir"]) / "adaptor" / "trained.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in stored), "the whole model should be stored"
    model, spec = load_bundle(Path(summary["output_dir"]) / "adaptor")
    assert spec.trains_everything and spec.baseline == trains
    if trains == "sasrec":
        assert not hasattr(model, "adaptor")


def test_resumed_run_ends_where_an_uninterrupted_run_ends(store):
    straight = run_finetune(finetune_config(store, "straight", optim__patience=5), progress=False)
    first = run_finetune(
        finetune_config(store, "resumed", optim__max_epochs=1, optim__patience=5), progress=False
    )
    resumed = run_finetune(finetune_config(store, "resumed", optim__patience=5), progress=False)
    assert resumed["run_id"] == first["run_id"]
    assert resumed["epochs_run"] == straight["epochs_run"] == 2
    last = {name: torch.load(Path(s["output_dir"]) / "last.pt", weights_only=False)["model"] for name, s in
            (("straight", straight), ("resumed", resumed))}  # fmt: skip
    for key, value in last["straight"].items():
        assert torch.equal(value, last["resumed"][key]), key
    assert resumed["test"] == straight["test"]


def test_each_tenant_logs_to_its_own_experiment_and_a_run_resumes_in_its_own(store):
    first = run_finetune(
        finetune_config(
            store, "legacy", optim__max_epochs=1, optim__patience=5, mlflow__experiment="shared"
        ),
        progress=False,
    )
    # The default experiment is the tenant's own; a run started in another goes on there.
    resumed = run_finetune(finetune_config(store, "legacy", optim__patience=5), progress=False)
    assert resumed["run_id"] == first["run_id"] and resumed["epochs_run"] == 2
    client = MlflowClient(store["uri"])
    experiment = client.get_run(resumed["run_id"]).info.experiment_id
    assert client.get_experiment(experiment).name == "shared"
    fresh = run_finetune(finetune_config(store, "fresh", optim__max_epochs=1), progress=False)
    experiment = client.get_run(fresh["run_id"]).info.experiment_id
    assert client.get_experiment(experiment).name == "unisrec-finetune-fresh"


def test_restart_ignores_last_checkpoint_and_changed_setup_is_refused(store):
    run_finetune(finetune_config(store, "restart", optim__max_epochs=1), progress=False)
    with pytest.raises(ConfigError, match="mode"):
        run_finetune(finetune_config(store, "restart", mode="transductive"), progress=False)
    again = run_finetune(
        finetune_config(store, "restart", mode="transductive", optim__max_epochs=1),
        restart=True,
        progress=False,
    )
    assert again["epochs_run"] == 1 and again["mode"] == "transductive"


@pytest.mark.parametrize("name", ["../x", "a/b", "Upper", "", "-lead", "a" * 64, "a..b/c"])
def test_bad_tenant_names_are_refused(tmp_path, name):
    path = tmp_path / "finetune.yaml"
    path.write_text("data: {domain: office}\n")
    with pytest.raises(ConfigError, match="tenant"):
        cfg = load_config(FinetuneConfig, path, [f"tenant={name!r}" if name else "tenant=''"])
        run_finetune(cfg, progress=False)


def test_a_tenant_cannot_take_another_tenants_or_a_backbones_model_name(store):
    run_finetune(finetune_config(store, "owner", optim__max_epochs=1), progress=False)
    # Refused when the config is read (issue 10); the registry check stays as a second guard.
    with pytest.raises(ConfigError, match="not a name tenant 'thief' may register"):
        finetune_config(
            store, "thief", optim__max_epochs=1, mlflow__registered_model="unisrec-adaptor-owner"
        )
    with pytest.raises(ConfigError, match="not a name tenant 'squatter' may register"):
        finetune_config(store, "squatter", optim__max_epochs=1, mlflow__registered_model=BACKBONE)
    assert not (store["root"] / "runs" / "thief" / "last.pt").exists(), "refused before training"


def test_windows_query_each_target_once_and_pad_with_zeros():
    windows = window_tensor(
        [np.array([1, 2, 3, 4, 5, 6]), np.array([8]), np.array([9, 10])], max_seq_len=3
    )
    assert windows.inputs.tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [9, 10, 0]]
    assert windows.targets.tolist() == [[2, 3, 4], [0, 0, 5], [0, 0, 6], [10, 0, 0]]


@pytest.mark.parametrize("max_seq_len", [1, 7, 50])
def test_finetune_windows_query_every_target_once_with_exactly_its_history(max_seq_len):
    """Property over random lengths 2..300: item ``1000 * user + t + 1`` is user's t-th."""
    rng = np.random.default_rng(max_seq_len)
    lengths = [2, 300, max_seq_len + 1, max_seq_len + 2, *rng.integers(2, 301, size=12)]
    sequences = [1000 * u + np.arange(n) + 1 for u, n in enumerate(lengths)]
    windows = window_tensor(sequences, max_seq_len)

    seen: dict[tuple[int, int], list[int]] = {}
    for w, j in (windows.targets > 0).nonzero().tolist():
        user, t = divmod(int(windows.targets[w, j]) - 1, 1000)
        assert (user, t) not in seen, f"target {t} of user {user} queried twice"
        seen[user, t] = windows.inputs[w, : j + 1].tolist()
    for user, seq in enumerate(sequences):
        for t in range(1, len(seq)):
            assert seen.pop((user, t)) == seq[max(0, t - max_seq_len) : t].tolist()
    assert not seen


@pytest.mark.parametrize("bucket", [False, True])
def test_epoch_batches_hold_about_batch_size_targets_and_visit_every_window_once(bucket):
    lengths = torch.tensor([1, 9, 2, 8, 1, 7, 3, 1, 9, 2])
    targets = torch.tensor([1, 4, 2, 8, 1, 1, 3, 1, 9, 2])

    def batches(seed):
        return epoch_batches(lengths, targets, 6, bucket, torch.Generator().manual_seed(seed))

    first = batches(0)
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    assert [b.tolist() for b in first] == [b.tolist() for b in batches(0)]
    for b in first:  # a window joins the step its first target falls in
        assert int(targets[b][:-1].sum()) < 6
    assert len(first) >= int(targets.sum()) // 6 // 2  # not one window a step
    if bucket:  # steps cut from windows sorted by length: their length ranges do not overlap
        ranges = sorted((int(lengths[b].min()), int(lengths[b].max())) for b in first)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))


def test_next_item_loss_is_cross_entropy_of_cosine_logits_over_all_items_at_target_positions():
    torch.manual_seed(0)
    model = UniSRec(
        from_dict(
            BackboneConfig, {**TINY, "dropout": 0.0, "attn_dropout": 0.0, "adaptor_dropout": 0.0}
        ),
        8,
    )
    model.eval()  # no gate noise: the loss is deterministic
    table = torch.nn.functional.pad(torch.randn(6, 8), (0, 0, 1, 0))
    inputs = torch.tensor([[1, 2, 3], [4, 0, 0]])
    targets = torch.tensor([[2, 3, 5], [0, 0, 0]])  # user 2 has no target: nothing to learn
    loss, count = next_item_loss(model, inputs, targets, table, temperature=0.5)

    with torch.no_grad():
        items = torch.nn.functional.normalize(
            model.item_vectors(table[1:], torch.arange(1, 7)), dim=-1
        )
        seq = torch.nn.functional.normalize(model(inputs[:1], table).outputs[0], dim=-1)
        logits = seq @ items.T / 0.5  # (3 positions, 6 items)
        expected = -torch.log_softmax(logits, dim=-1)[
            torch.arange(3), torch.tensor([1, 2, 4])
        ].sum()
    assert count == 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


class GradientRecorder(torch.optim.Optimizer):
    """Records every step's gradient (all parameters, flattened) and moves nothing."""

    def __init__(self, params):
        super().__init__(list(params), {})
        self.steps: list[torch.Tensor] = []

    def step(self, closure=None):
        self.steps.append(flat_grad(p for group in self.param_groups for p in group["params"]))


def flat_grad(params) -> torch.Tensor:
    return torch.cat(
        [torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in params]
    )


@pytest.mark.parametrize("bucket", [False, True], ids=["random", "bucketed"])
@pytest.mark.parametrize("batch_size", [1, 6])
def test_every_finetune_target_has_the_same_gradient_weight_in_any_batch(bucket, batch_size):
    """A window with 1 target and one with 5: each target's cross-entropy gradient must enter
    the step with the same weight, whichever batch holds it."""
    torch.manual_seed(0)
    quiet = {"dropout": 0.0, "attn_dropout": 0.0, "adaptor_dropout": 0.0}
    model = UniSRec(from_dict(BackboneConfig, {**TINY, **quiet, "max_seq_len": 5}), 8)
    model.eval()  # no gate noise for the reference; train_epoch switches to train mode
    params = list(model.parameters())
    table = torch.nn.functional.pad(torch.randn(9, 8), (0, 0, 1, 0))
    windows = window_tensor([np.array([1, 2]), np.array([3, 4, 5, 6, 7, 8])], max_seq_len=5)
    assert (windows.targets > 0).sum(dim=1).tolist() == [1, 5]

    per_window = []  # gradient of each window's summed cross-entropies, by hand
    for w in range(2):
        model.zero_grad()
        outputs = model(windows.inputs[w : w + 1], table).outputs[0]
        items = model.item_vectors(table[1:], torch.arange(1, 10))
        logits = (
            torch.nn.functional.normalize(outputs, dim=-1)
            @ torch.nn.functional.normalize(items, dim=-1).T
            / 0.07
        )
        has = windows.targets[w] > 0
        ce = torch.nn.functional.cross_entropy(
            logits[has], windows.targets[w][has] - 1, reduction="sum"
        )
        ce.backward()
        per_window.append(flat_grad(params))
    weight = 1.0 / batch_size  # batch_size counts targets

    cfg = from_dict(
        FinetuneConfig, {"optim": {"batch_size": batch_size, "bucket_by_length": bucket}}
    )
    recorder = GradientRecorder(params)
    model.adaptor.noise = False  # train mode, still deterministic
    train_epoch(model, windows, table, recorder, cfg, epoch=0)
    if batch_size == 1:
        assert len(recorder.steps) == 2
        for step in recorder.steps:
            assert any(
                torch.allclose(step, weight * g, rtol=1e-3, atol=1e-4) for g in per_window
            ), "a window's targets got another weight than the others'"
    else:
        torch.testing.assert_close(
            recorder.steps[0], weight * (per_window[0] + per_window[1]), rtol=1e-3, atol=1e-4
        )


def test_finetune_command_reads_yaml_and_overrides_and_prints_the_summary(store, tmp_path, capsys):
    config = tmp_path / "finetune.yaml"
    config.write_text(
        f"tenant: cli\ndata: {{dir: {store['data']}, domain: office}}\nbackbone: none\n"
        f"model: {json.dumps(TINY)}\noptim: {{max_epochs: 1, batch_size: 16}}\n"
        f"mlflow: {{tracking_uri: '{store['uri']}'}}\noutput_root: {tmp_path / 'runs'}\n"
    )
    parser = argparse.ArgumentParser(prog="unisrec")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["finetune", str(config), "mode=transductive", "-q"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["tenant"], summary["mode"], summary["epochs_run"]) == ("cli", "transductive", 1)
    assert (tmp_path / "runs" / "cli" / "metrics.json").is_file()


def test_train_fraction_keeps_a_seeded_subset_of_training_users_only(tmp_path):
    """data.train_fraction: windows of round(f * users) users, the same ones for the same
    seed; valid and test are not touched (they are read elsewhere, from every user)."""
    from adaptors.finetune import load_windows, training_users
    from sharding.dataset import Dataset

    ds = Dataset(write_small_dataset(tmp_path / "data", num_users=40))
    train = ds.split("office", "train")
    chosen = training_users(40, 0.25, seed=3)
    assert len(chosen) == 10 and len(set(chosen.tolist())) == 10
    assert (training_users(40, 0.25, seed=3) == chosen).all()
    assert (training_users(40, 0.25, seed=4) != chosen).any()
    expected = window_tensor([train["items"][u] for u in chosen], 10)
    got = load_windows(ds, "office", 10, fraction=0.25, seed=3)
    assert torch.equal(got.inputs, expected.inputs) and torch.equal(got.targets, expected.targets)
    every = load_windows(ds, "office", 10)
    assert torch.equal(every.inputs, window_tensor(list(train["items"]), 10).inputs)

    with pytest.raises(ConfigError, match="train_fraction"):
        load_config(FinetuneConfig, None, ["data.train_fraction=0"])


def test_a_zero_epoch_finetune_registers_the_backbones_adaptor_as_a_zero_shot_tenant(store):
    """optim.max_epochs=0: no training at all; the registered adaptor is the backbone's own,
    evaluated and served like any other (a new tenant's first recommendations)."""
    summary = run_finetune(finetune_config(store, "zeroshot", optim__max_epochs=0), progress=False)
    assert summary["best_epoch"] == 0
    assert summary["model_version"] == "1"
    assert 0 <= summary["test"]["ndcg@10"] <= 1 and summary["test"]["recall@10"] > 0
    model, _ = load_bundle(Path(summary["output_dir"]) / "adaptor")
    for name, value in store["backbone"].state_dict().items():
        assert torch.equal(model.state_dict()[name], value), f"{name} moved without training"
