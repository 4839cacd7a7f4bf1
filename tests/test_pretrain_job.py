"""Pretraining end to end on real Ray Train + DeepSpeed ZeRO-2 + MLflow, tiny data, few steps.

Three runs share one dataset and one sqlite store: an uninterrupted one, one whose worker is
killed mid-run (Ray restarts the group from the last checkpoint), and one that fails outright
and is continued with ``--resume``. All three must end on the same loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import PretrainConfig
from sharding.config import DomainSource, ShardJobConfig, ShardOutputConfig
from sharding.dataset_writer import EncodedDomain, write_dataset
from sharding.types import DomainSequences
from unisrec.config import load_config

pytestmark = pytest.mark.slow


def _write_pretraining_dataset(root: Path, heldout_fraction: float = 0.0) -> Path:
    rng = np.random.default_rng(0)
    domains = []
    for name in ("books", "games"):
        n_items = 40
        sequences = [rng.integers(1, n_items + 1, size=rng.integers(5, 15)) for _ in range(48)]
        seqs = DomainSequences(
            name,
            [f"{name}{i}" for i in range(1, n_items + 1)],
            [f"{name} item {i}" for i in range(1, n_items + 1)],
            [f"u{u}" for u in range(48)],
            sequences,
        )
        vectors = rng.normal(size=(n_items, 16)).astype(np.float32)
        domains.append(EncodedDomain(seqs, True, vectors, vectors + 0.1))
    cfg = ShardJobConfig(
        domains=[
            DomainSource(name=n, format="csv", path=".", pretrain=True) for n in ("books", "games")
        ],
        shards=ShardOutputConfig(num_shards=4, heldout_fraction=heldout_fraction),
    )
    write_dataset(
        root, domains, {"name": "test-encoder", "dim": 16, "pooling": "cls", "max_length": 32}, cfg
    )
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = _write_pretraining_dataset(root / "data")
    return root, data


def _config(root: Path, data: Path, name: str, *extra: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        None,
        [
            f"data.dir={data}",
            "data.batch_size=12",
            "data.loader_workers=0",
            "model.hidden_size=32",
            "model.inner_size=32",
            "model.max_seq_len=50",
            "optim.epochs=2",
            "optim.lr=0.005",
            "distributed.num_workers=2",
            "distributed.zero_stage=2",
            "distributed.checkpoint_every=3",
            "log_every=1",
            f"output_dir={root / name}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    from pretrain.job import run_pretrain

    root, data = workspace
    return run_pretrain(_config(root, data, "plain"))


def test_pretraining_registers_a_backbone_and_the_loss_falls(uninterrupted):
    assert uninterrupted["registered_model"] == "unisrec-backbone"
    assert uninterrupted["model_version"] == "1"
    assert uninterrupted["final_loss"] < uninterrupted["first_loss"]
    assert uninterrupted["samples_seen"] == 2 * 96 + 0  # two epochs over every window
    assert uninterrupted["sequences_per_second"] > 0
    assert uninterrupted["targets_per_second"] > 0
    summary = json.loads(
        (Path(uninterrupted["checkpoint"]).parents[2] / "summary.json").read_text()
    )
    assert summary["run_id"] == uninterrupted["run_id"]


def test_run_logs_config_metrics_dataset_input_and_commit(uninterrupted):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uninterrupted["tracking_uri"]).get_run(uninterrupted["run_id"])
    assert run.data.params["distributed.zero_stage"] == "2"
    assert run.data.params["loss.temperature"] == "0.07"
    for key in (
        "loss",
        "loss_seq_item",
        "loss_seq_seq",
        "lr",
        "sequences_per_second",
        "tokens_per_second",
        "targets_per_second",
    ):
        assert key in run.data.metrics
    assert run.data.tags["git_commit"]
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest


def test_backbone_tags_carry_lineage(uninterrupted):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uninterrupted["tracking_uri"])
    version = client.get_model_version_by_alias("unisrec-backbone", "current")
    assert str(version.version) == uninterrupted["model_version"]
    assert version.tags["unisrec.encoder"] == "test-encoder"
    assert version.tags["unisrec.encoder_dim"] == "16"
    assert version.tags["unisrec.run_id"] == uninterrupted["run_id"]
    assert len(version.tags["unisrec.data_digest"]) == 64


def test_registered_backbone_loads_by_alias_in_another_process_without_training_code(uninterrupted):
    script = (
        "import sys, mlflow.pytorch, torch\n"
        f"mlflow.set_tracking_uri({uninterrupted['tracking_uri']!r})\n"
        "m = mlflow.pytorch.load_model('models:/unisrec-backbone@current')\n"
        "out = m(torch.tensor([[1, 2, 3]]), torch.randn(81, 16)).outputs\n"
        "print(type(m).__name__, tuple(out.shape), 'deepspeed' in sys.modules, 'ray' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-6:] == ["UniSRec", "(1,", "3,", "32)", "False", "False"]


def test_killed_worker_is_restarted_and_reaches_the_same_final_loss(workspace, uninterrupted):
    from pretrain.job import run_pretrain

    root, data = workspace
    summary = run_pretrain(
        _config(root, data, "killed", "fault.kill_at_step=5", "fault.kill_rank=1")
    )
    assert (root / "killed" / ".killed-rank1-step5").exists()
    assert summary["steps"] == uninterrupted["steps"]
    assert summary["samples_seen"] == uninterrupted["samples_seen"]
    assert summary["final_loss"] == pytest.approx(uninterrupted["final_loss"], abs=1e-5)


def test_a_users_deepspeed_file_runs_its_zero_stage_with_the_same_result(workspace, uninterrupted):
    """ZeRO-3 from the user's own JSON (the preset says 2): the run uses it, logs the merged
    config, and ends on the preset run's loss (ZeRO stages are exact in fp32)."""
    from mlflow.tracking import MlflowClient

    from pretrain.job import run_pretrain

    root, data = workspace
    ds_file = root / "my-deepspeed.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": False}}))
    summary = run_pretrain(
        _config(root, data, "user-ds", f"distributed.deepspeed_config={ds_file}")
    )
    assert summary["zero_stage"] == 3
    logged = MlflowClient(summary["tracking_uri"]).download_artifacts(
        summary["run_id"], "deepspeed_config.json", str(root / "downloaded")
    )
    merged = json.loads(Path(logged).read_text())
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": False}
    assert merged["train_batch_size"] == 2 * 12
    assert summary["final_loss"] == pytest.approx(uninterrupted["final_loss"], abs=1e-4)


def test_stopped_run_continues_with_resume(workspace, uninterrupted):
    from ray.train import TrainingFailedError

    from pretrain.job import run_pretrain

    root, data = workspace
    cfg = _config(root, data, "stopped", "fault.kill_at_step=7", "distributed.max_failures=0")
    with pytest.raises(TrainingFailedError):
        run_pretrain(cfg)
    summary = run_pretrain(cfg, resume=True)
    assert summary["run_id"] == json.loads((root / "stopped" / "run.json").read_text())["run_id"]
    assert summary["samples_seen"] == uninterrupted["samples_seen"]
    assert summary["final_loss"] == pytest.approx(uninterrupted["final_loss"], abs=1e-5)


@pytest.fixture(scope="module")
def with_heldout(workspace):
    from pretrain.job import run_pretrain

    root, _ = workspace
    data = _write_pretraining_dataset(root / "data-heldout", heldout_fraction=0.25)
    cfg = _config(root, data, "heldout", "optim.epochs=3", "heldout_every=2")
    cfg.mlflow.registered_model = "unisrec-backbone-heldout"
    return run_pretrain(cfg), data


def test_heldout_loss_is_logged_per_domain_and_the_best_checkpoint_is_registered(with_heldout):
    from mlflow.tracking import MlflowClient

    summary, _ = with_heldout
    client = MlflowClient(summary["tracking_uri"])
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(summary["run_id"], key))
        for key in ("heldout_loss", "heldout_loss_books", "heldout_loss_games")
    }
    # 12 of 48 users held out per domain -> 72 training windows, 3 steps an epoch on 2 ranks
    # of 12; evaluated every 2 steps and at each epoch end (steps 3, 6, 9).
    assert summary["samples_seen"] == 3 * 72
    assert [s for s, _ in history["heldout_loss"]] == [2, 3, 4, 6, 8, 9]
    assert [s for s, _ in history["heldout_loss_books"]] == [2, 3, 4, 6, 8, 9]
    best_step, best_loss = min(history["heldout_loss"], key=lambda sv: sv[1])
    version = client.get_model_version_by_alias("unisrec-backbone-heldout", "current")
    assert version.tags["unisrec.checkpoint_step"] == str(best_step)
    assert float(version.tags["unisrec.heldout_loss"]) == pytest.approx(best_loss, abs=1e-6)
    assert summary["registered_step"] == best_step
    assert summary["best_heldout"]["heldout_loss"] == pytest.approx(best_loss)


def test_pretraining_again_from_the_same_seed_and_data_gives_the_same_backbone(
    workspace, with_heldout
):
    """A backbone lost with its output directory (a fresh machine) is pretrained again: the
    same config, seed and shards give the same held-out losses, to 4 decimals."""
    from pretrain.job import run_pretrain

    root, _ = workspace
    first, data = with_heldout
    cfg = _config(root, data, "heldout-again", "optim.epochs=3", "heldout_every=2")
    cfg.mlflow.registered_model = "unisrec-backbone-heldout-again"
    again = run_pretrain(cfg)
    assert again["registered_step"] == first["registered_step"]
    for key, value in first["best_heldout"].items():
        assert round(again["best_heldout"][key], 4) == round(value, 4), key


@pytest.fixture(scope="module")
def continued(workspace, with_heldout):
    """One step of pretraining continued from the held-out run's backbone, same data."""
    from pretrain.job import run_pretrain

    root, _ = workspace
    _, data = with_heldout
    cfg = _config(
        root, data, "continued", "optim.max_steps=1",
        "init.backbone=models:/unisrec-backbone-heldout@current",
    )  # fmt: skip
    cfg.mlflow.registered_model = "unisrec-backbone-continued"
    return run_pretrain(cfg)


def test_continuing_a_backbone_starts_from_its_weights(with_heldout, continued):
    """Before its first step the continued run scores the parent's held-out loss."""
    parent, _ = with_heldout
    start = continued["initial_heldout"]
    for key in ("heldout_loss", "heldout_loss_books", "heldout_loss_games"):
        assert start[key] == pytest.approx(parent["best_heldout"][key], rel=1e-5), key


def test_a_continued_backbone_records_its_parent(with_heldout, continued):
    from mlflow.tracking import MlflowClient

    from pretrain.registry import backbone_lineage
    from unisrec import tags
    from unisrec.tracking import logged_model_id

    parent, _ = with_heldout
    client = MlflowClient(continued["tracking_uri"])
    version = client.get_model_version("unisrec-backbone-continued", continued["model_version"])
    assert (
        version.tags[tags.PARENT_BACKBONE] == f"unisrec-backbone-heldout/{parent['model_version']}"
    )
    assert version.tags[tags.PARENT_RUN_ID] == parent["run_id"]
    run = client.get_run(continued["run_id"])
    assert run.data.tags[tags.PARENT_BACKBONE] == version.tags[tags.PARENT_BACKBONE]
    parent_version = client.get_model_version("unisrec-backbone-heldout", parent["model_version"])
    assert [m.model_id for m in run.inputs.model_inputs] == [logged_model_id(parent_version)]
    assert backbone_lineage("unisrec-backbone-continued", continued["model_version"], client) == [
        ("unisrec-backbone-continued", continued["model_version"]),
        ("unisrec-backbone-heldout", parent["model_version"]),
    ]


def test_a_backbone_of_another_shape_is_refused_before_training(workspace, with_heldout):
    from pretrain.job import run_pretrain
    from unisrec.errors import ConfigError

    root, _ = workspace
    _, data = with_heldout
    cfg = _config(
        root, data, "misfit", "model.hidden_size=16", "model.inner_size=16",
        "init.backbone=models:/unisrec-backbone-heldout@current",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"init\.backbone: .* hidden_size 32 \(config: 16\)"):
        run_pretrain(cfg)
    assert not (root / "misfit" / "run.json").exists()


def test_registered_backbone_reproduces_its_heldout_loss_in_one_process(with_heldout):
    """An independent recomputation: the registered weights, one process, the held-out shard
    read in file order, eval mode -> the loss the 2-rank job logged for that checkpoint
    (each domain's single held-out shard sits on one rank; the other rank adds only filler
    rows, which are neither queries nor keys)."""
    import mlflow
    import torch

    from pretrain.config import LossConfig
    from pretrain.gather import Gather
    from pretrain.heldout import HELDOUT_AUGMENT_STEP
    from pretrain.losses import pretrain_loss
    from pretrain.registry import load_backbone
    from sharding.dataset import Dataset
    from sharding.stream import ShardStream

    summary, data = with_heldout
    mlflow.set_tracking_uri(summary["tracking_uri"])
    model = load_backbone("models:/unisrec-backbone-heldout@current").eval()
    ds = Dataset(data)
    text = torch.from_numpy(ds.global_embeddings())
    worddrop = torch.from_numpy(ds.global_embeddings(worddrop=True))
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for _, specs in sorted(ds.heldout_specs().items()):
            for batch in ShardStream(specs, batch_size=12, shuffle_buffer=1, seed=42).epoch(0):
                out = pretrain_loss(
                    model, batch, text, worddrop, LossConfig(),
                    step=HELDOUT_AUGMENT_STEP, seed=42, gather=Gather.single(),
                )  # fmt: skip
                loss_sum += (out["seq_item"] + 1e-3 * out["seq_seq"]) * out["queries"]
                targets += out["queries"]
    assert loss_sum / targets == pytest.approx(summary["best_heldout"]["heldout_loss"], rel=1e-5)


def test_pretraining_stops_at_the_first_epoch_whose_heldout_gain_is_below_the_bar(with_heldout):
    """min_heldout_gain 0.9: no epoch can cut the held-out loss by 90%, so the run stops at
    the end of epoch 2 of 6 (epoch 1 has nothing to compare with) and says why."""
    from pretrain.job import run_pretrain

    _, data = with_heldout
    root = data.parent
    cfg = _config(root, data, "plateau", "optim.epochs=6", "optim.min_heldout_gain=0.9")
    cfg.mlflow.registered_model = "unisrec-backbone-plateau"
    summary = run_pretrain(cfg)
    assert summary["stopped_on_plateau"] is True
    assert summary["samples_seen"] == 2 * 72
    assert summary["steps"] == 2 * 3
    # Resumed after its last step (as when the driver died while registering): nothing is
    # trained again, and the same backbone is consolidated and registered once more.
    again = run_pretrain(cfg, resume=True)
    assert again["run_id"] == summary["run_id"]
    assert (again["steps"], again["samples_seen"]) == (summary["steps"], summary["samples_seen"])
    assert again["registered_step"] == summary["registered_step"]
    assert int(again["model_version"]) == int(summary["model_version"]) + 1


def test_plateau_rule_compares_with_the_previous_epochs_heldout_loss():
    from pretrain.worker import _plateaued

    assert not _plateaued({}, 5.0, 0.01)  # no previous epoch
    assert not _plateaued({"epoch_heldout": 5.0}, 4.9, 0.01)  # 2% better
    assert _plateaued({"epoch_heldout": 5.0}, 4.96, 0.01)  # 0.8% better
    assert _plateaued({"epoch_heldout": 5.0}, 5.2, 0.01)  # worse
    assert not _plateaued({"epoch_heldout": 5.0}, 5.2, 0.0)  # rule off


def test_a_truncated_newest_checkpoint_is_named_and_the_run_resumes_from_a_whole_one(
    workspace, uninterrupted, capfd
):
    """A run checkpointing every step keeps its last three (6, 7, 8 of 8); 7 and 8 cut short
    on disk: --resume names the broken newest one, continues from step 6 and ends where the
    uninterrupted run ended."""
    from pretrain.checkpoint_files import incomplete_reason
    from pretrain.job import run_pretrain

    root, data = workspace
    cfg = _config(
        root, data, "truncated", "distributed.checkpoint_every=1", "distributed.keep_checkpoints=3"
    )
    first = run_pretrain(cfg)
    assert first["steps"] == uninterrupted["steps"] == 8
    steps = {p.name: p for p in (root / "truncated" / "ray").glob("*/step_*")}
    assert {"step_0000006", "step_0000007", "step_0000008"} <= set(steps)
    for name in ("step_0000007", "step_0000008"):
        states = sorted((steps[name] / "ds").glob("*model_states.pt"))[0]
        states.write_bytes(states.read_bytes()[:100])
        assert "of its" in incomplete_reason(steps[name], 2)
    capfd.readouterr()

    summary = run_pretrain(cfg, resume=True)
    captured = capfd.readouterr()
    printed = captured.out
    assert "is incomplete" in printed and "resuming from step_0000006" in printed
    # Quiet by default: none of DeepSpeed's or MLflow's chatter reaches the user.
    for noise in (
        "Setting accelerator to CPU", "built successfully", "Processing zero checkpoint",
        "Reconstructed fp32", "Loading checkpoint shards", "Successfully registered model",
        "Creating initial MLflow database tables", "Started a local Ray instance",
    ):  # fmt: skip
        assert noise not in printed + captured.err, noise
    assert summary["resumed_from_step"] == 6
    assert summary["samples_seen"] == uninterrupted["samples_seen"]
    assert summary["final_loss"] == pytest.approx(uninterrupted["final_loss"], abs=1e-5)


def test_a_second_run_on_an_output_dir_in_use_is_refused_naming_the_holder(workspace):
    """Another process holds output_dir (as a running job does): the second run stops at
    once with a StorageError naming it, and nothing in the directory changes."""
    import multiprocessing

    from pretrain.job import run_pretrain
    from unisrec.errors import StorageError

    root, data = workspace
    out = root / "busy"
    out.mkdir()
    (out / "run.json").write_text('{"run_id": "first-run", "ray_run_name": "x"}')
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.get_context("fork").Process(
        target=_hold_output_dir, args=(out, ready, release)
    )
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(
            StorageError, match=r"in use by another pretraining run \(run first-run, pid"
        ):
            run_pretrain(_config(root, data, "busy"), resume=True)
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == {
            k: v for k, v in before.items() if k != ".lock"
        }
    finally:
        release.set()
        holder.join(10)


def _hold_output_dir(out, ready, release) -> None:
    from pretrain.output_lock import OutputDirLock

    with OutputDirLock(out) as lock:
        lock.describe(run_id="first-run")
        ready.set()
        release.wait(30)


def test_a_full_disk_while_checkpointing_is_one_error_and_resume_finishes_the_run(
    workspace, uninterrupted, tmp_path
):
    """output_dir on a small tmpfs with room for about one checkpoint: the second checkpoint
    fails with one StorageError naming the path, no restart is spent on it, the first
    checkpoint stays whole, and --resume after freeing space ends like the uninterrupted run."""
    import os
    import shutil

    from pretrain.checkpoint_files import incomplete_reason
    from pretrain.job import run_pretrain
    from unisrec.errors import StorageError

    root, data = workspace
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        one = sum(
            f.stat().st_size for f in Path(uninterrupted["checkpoint"]).rglob("*") if f.is_file()
        )
        free = shutil.disk_usage(mount).free
        (mount / "filler").write_bytes(b"\0" * (free - int(1.6 * one) - (64 << 10)))
        out = mount / "run"
        cfg = _config(root, data, "unused", "distributed.max_failures=3")
        cfg.output_dir = str(out)
        with pytest.raises(StorageError, match="no space left on device") as err:
            run_pretrain(cfg)
        assert str(out / "ray") in str(err.value)
        kept = sorted((out / "ray").glob("*/step_*"))
        assert kept and incomplete_reason(kept[0], 2) is None
        (mount / "filler").unlink()
        summary = run_pretrain(cfg, resume=True)
        assert summary["resumed_from_step"] == 3
        assert summary["samples_seen"] == uninterrupted["samples_seen"]
        assert summary["final_loss"] == pytest.approx(uninterrupted["final_loss"], abs=1e-5)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
