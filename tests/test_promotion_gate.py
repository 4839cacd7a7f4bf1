"""The promotion gate (``unisrec promote``): a version whose valid metric is worse than
production's beyond the tolerance is refused in one line naming both numbers, an equal or
better one passes, ``--force`` promotes anyway and the version's tags say who forced it and
the numbers, a rollback to an earlier production version passes. The rule alone
(``promotion_decision``) is pinned first, then the command on a real MLflow store.

The store: one tenant fine-tuned once (version 1), and versions 2-4 registered from the same
bundle under runs of their own, as a fine-tune registers (``register_adaptor``). Each run's
``best_valid_ndcg_at_10`` is set to a known number, so the lines can be compared exactly.
"""

from __future__ import annotations

import getpass
from pathlib import Path

import mlflow
import pytest
from helpers_data import write_small_dataset
from mlflow.tracking import MlflowClient

from adaptors.bundle import read_spec
from adaptors.config import FinetuneConfig
from adaptors.finetune import run_finetune
from adaptors.publish import register_adaptor
from recipes.cli import main as cli
from serving.gate import Contender, promotion_decision
from serving.lifecycle import alias_version
from unisrec import tags as T
from unisrec.config import from_dict

TINY = {"hidden_size": 16, "inner_size": 32, "num_experts": 2, "max_seq_len": 10}
NAME = T.adaptor_model_name("shop")
VALID_NDCG = {"1": 0.3, "2": 0.25, "3": 0.3, "4": 0.32}  # version -> its run's valid ndcg@10
METRIC = "best_valid_ndcg_at_10"


# --- the rule -------------------------------------------------------------------------------


def side(label: str, ndcg: float | None, was_production: bool = False) -> Contender:
    return Contender(label, {} if ndcg is None else {"ndcg@10": ndcg}, was_production)


def test_a_worse_challenger_is_refused_naming_both_numbers():
    decision = promotion_decision(side("production version 1", 0.3), side("version 2", 0.25))
    assert not decision.promote
    assert decision.reason == (
        "version 2: valid ndcg@10 0.25 vs production version 1's 0.3, a drop of 0.05 > tolerance 0"
    )


def test_an_equal_or_better_challenger_passes():
    for ndcg in (0.3, 0.31):
        decision = promotion_decision(side("production version 1", 0.3), side("version 2", ndcg))
        assert decision.promote and decision.reason.endswith("within tolerance 0")


def test_the_tolerance_is_an_absolute_drop_with_its_edge_included():
    champion = side("production version 1", 0.25)
    assert promotion_decision(champion, side("v", 0.24), tolerance=0.01).promote
    assert not promotion_decision(champion, side("v", 0.2399), tolerance=0.01).promote
    assert not promotion_decision(champion, side("v", 0.24), tolerance=0.005).promote


def test_a_first_promotion_and_a_rollback_pass_a_challenger_without_the_metric_does_not():
    assert promotion_decision(None, side("version 1", 0.1)).promote
    assert promotion_decision(side("p", 0.3), side("v", 0.1, was_production=True)).promote
    assert promotion_decision(side("p", None), side("v", 0.1)).promote  # nothing to compare
    refused = promotion_decision(side("p", 0.3), side("version 2", None))
    assert not refused.promote and "has no valid ndcg@10" in refused.reason


def test_other_metrics_are_compared_by_name():
    champion = Contender("p", {"ndcg@10": 0.3, "recall@10": 0.5})
    challenger = Contender("v", {"ndcg@10": 0.2, "recall@10": 0.6})
    assert promotion_decision(champion, challenger, metric="recall@10").promote
    assert not promotion_decision(champion, challenger, metric="ndcg@10").promote


# --- the command, on a real store -------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Tenant ``shop``: version 1 fine-tuned, versions 2-4 registered from its bundle under
    runs of their own; every run's valid ndcg@10 set to VALID_NDCG."""
    root = tmp_path_factory.mktemp("gate")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    data = write_small_dataset(root / "data")
    cfg = from_dict(
        FinetuneConfig,
        {
            "tenant": "shop",
            "data": {"dir": str(data), "domain": "office"},
            "model": TINY,
            "optim": {"max_epochs": 1, "batch_size": 16, "lr": 1e-2},
            "mlflow": {"tracking_uri": uri},
            "output_root": str(root / "runs"),
        },
    )
    summary = run_finetune(cfg, progress=False)
    out = Path(summary["output_dir"])
    client = MlflowClient()
    runs = {"1": summary["run_id"]}
    experiment = client.get_run(summary["run_id"]).info.experiment_id
    for version in ("2", "3", "4"):
        run_id = client.create_run(experiment, run_name=f"shop-{version}").info.run_id
        registered = register_adaptor(
            run_id=run_id,
            name=NAME,
            alias=T.CANDIDATE,
            bundle_dir=out / "adaptor",
            catalogue_dir=out / "catalogue",
            spec=read_spec(out / "adaptor"),
        )
        assert registered == version
        runs[version] = run_id
    for version, run_id in runs.items():  # step 1: the latest value, what the run reports
        client.log_metric(run_id, METRIC, VALID_NDCG[version], step=1)
    return {"uri": uri, "runs": runs}


def promote(store: dict, capsys, *options: str) -> tuple[int, str, str]:
    """``unisrec promote --tenant shop OPTIONS``: exit status, stdout, stderr."""
    capsys.readouterr()
    status = cli(["promote", "--tenant", "shop", *options, "--tracking-uri", store["uri"]])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def version_tags(version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(NAME, version).tags


def test_a_first_promotion_passes_the_gate_and_records_its_numbers(store, capsys):
    status, out, _ = promote(store, capsys, "--version", "1")
    assert status == 0
    assert out.splitlines() == [
        f"{NAME}: production -> version 1 (was none)",
        "  gate: version 1: valid ndcg@10 0.3; no production version yet",
    ]
    tags = version_tags("1")
    assert (tags[T.GATE_METRIC], tags[T.GATE_VALUE]) == ("ndcg@10", "0.3")
    assert (tags[T.GATE_PRODUCTION_VALUE], tags[T.GATE_TOLERANCE]) == ("none", "0")
    assert T.FORCED_BY not in tags


def test_a_worse_candidate_is_refused_in_one_line_naming_both_numbers(store, capsys):
    status, out, err = promote(store, capsys, "--version", "2")
    assert (status, out) == (2, "")
    assert err.splitlines() == [
        f"error: {NAME} not promoted: version 2: valid ndcg@10 0.25 vs production version 1's "
        "0.3, a drop of 0.05 > tolerance 0; --force promotes it anyway"
    ]
    status, _, err = promote(store, capsys, "--version", "2", "--tolerance", "0.04")
    assert status == 2 and "a drop of 0.05 > tolerance 0.04" in err
    assert alias_version(NAME, T.PRODUCTION) == "1"
    assert T.PROMOTED_BY not in version_tags("2")  # nothing was written


def test_bad_gate_options_are_named(store, capsys):
    status, _, err = promote(store, capsys, "--version", "3", "--metric", "mrr")
    assert status == 2 and err.startswith("error: --metric: 'mrr' is not a validation metric")
    status, _, err = promote(store, capsys, "--version", "3", "--tolerance", "-0.1")
    assert status == 2 and err.startswith("error: --tolerance:")
    assert alias_version(NAME, T.PRODUCTION) == "1"


def test_an_equal_then_a_better_candidate_pass(store, capsys):
    status, out, _ = promote(store, capsys, "--version", "3")
    assert status == 0
    assert "  gate: version 3: valid ndcg@10 0.3 vs production version 1's 0.3, within tolerance 0" in out  # fmt: skip
    status, out, _ = promote(store, capsys)  # the candidate: version 4, the last registered
    assert status == 0 and f"{NAME}: production -> version 4 (was 3)" in out
    assert "candidate version 4: valid ndcg@10 0.32 vs production version 3's 0.3" in out
    assert alias_version(NAME, T.PRODUCTION) == "4"


def test_force_promotes_a_worse_version_and_tags_who_forced_it_and_the_numbers(store, capsys):
    status, out, _ = promote(store, capsys, "--version", "2", "--force")
    assert status == 0 and f"{NAME}: production -> version 2 (was 4)" in out
    assert alias_version(NAME, T.PRODUCTION) == "2"
    tags = version_tags("2")
    who = getpass.getuser()  # no tracking server user here: the OS user
    assert tags[T.FORCED_BY] == tags[T.PROMOTED_BY] == who
    assert (tags[T.GATE_VALUE], tags[T.GATE_PRODUCTION_VALUE]) == ("0.25", "0.32")
    assert (tags[T.GATE_METRIC], tags[T.GATE_TOLERANCE], tags[T.PROMOTED_FROM]) == (
        "ndcg@10",
        "0",
        "4",
    )
    assert tags[T.GATE_DECISION] == (
        f"forced by {who}: version 2: valid ndcg@10 0.25 vs production version 4's 0.32, "
        "a drop of 0.07 > tolerance 0"
    )


def test_a_rollback_to_an_earlier_production_version_passes(store, capsys):
    assert promote(store, capsys, "--version", "4")[0] == 0  # production 4 again
    status, out, _ = promote(store, capsys, "--version", "2")  # worse, but was production
    assert status == 0 and "version 2 was in production before (a rollback)" in out
    tags = version_tags("2")
    assert T.FORCED_BY not in tags  # the tags describe the latest promotion, not forced
    assert tags[T.PROMOTED_FROM] == "4"
