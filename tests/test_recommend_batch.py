"""Batch recommendations (``unisrec recommend-batch``) on a tiny fine-tuned tenant and a local
Ray: the same answers as the serving top-k (what ``unisrec recommend`` and the endpoint
compute) for the same histories, unknown items left out and counted, the output's columns and
record as docs/data-format.md describes them, every user of the tenant's dataset found from
its lineage, clear errors for bad input, submission to a cluster, and the benchmark script's
real ``main()`` on tiny data. ``unisrec recommend`` reads the same registered version.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_data import write_small_dataset

from adaptors.bundle import load_bundle
from adaptors.catalogue import Catalogue
from adaptors.config import FinetuneConfig
from adaptors.finetune import run_finetune
from adaptors.topk import top_k
from recipes.cli import main as cli
from serving.batch import METADATA_KEY, OUTPUT_SCHEMA, BatchConfig, recommend_batch
from serving.lifecycle import promote
from sharding.dataset import Dataset
from unisrec.config import from_dict
from unisrec.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 16, "inner_size": 32, "num_experts": 2, "max_seq_len": 10}
K = 5


@pytest.fixture(scope="module")
def tenant(tmp_path_factory) -> dict:
    """One tenant fine-tuned from scratch on the small office domain, promoted to production."""
    root = tmp_path_factory.mktemp("batch")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    data = write_small_dataset(root / "data")
    cfg = from_dict(
        FinetuneConfig,
        {
            "tenant": "shop",
            "data": {"dir": str(data), "domain": "office"},
            "model": TINY,
            "mode": "transductive",
            "optim": {"max_epochs": 2, "batch_size": 16, "lr": 1e-2},
            "mlflow": {"tracking_uri": uri},
            "output_root": str(root / "runs"),
        },
    )
    summary = run_finetune(cfg, progress=False)
    promote("shop", by="test")
    return {"root": root, "uri": uri, "data": data, **summary}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; recommend_batch uses it and leaves it running."""
    import ray

    from unisrec.runtime import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def serving_top_k(tenant: dict, histories: list[list[str]]) -> list[list[tuple[str, float]]]:
    """Each history ranked alone by the serving top-k on the tenant's fine-tune output."""
    out = Path(tenant["output_dir"])
    model, spec = load_bundle(out / "adaptor")
    catalogue = Catalogue.load(out / "catalogue")
    return [top_k(model, spec, catalogue, [history], k=K)[0] for history in histories]


def read_recommendations(path: Path) -> dict[str, list[tuple[str, float]]]:
    """``{user: [(item, score), ...]}`` best first, from an output file."""
    frame = pd.read_parquet(path).sort_values(["user", "rank"])
    return {
        user: list(zip(rows["item"], rows["score"].astype(float), strict=True))
        for user, rows in frame.groupby("user")
    }


def assert_same_ranking(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [key for key, _ in got] == [key for key, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-4)


def write_users(path: Path, users: list[str], histories: list[list[str] | None]) -> Path:
    pq.write_table(
        pa.table({"user": users, "history": pa.array(histories, pa.list_(pa.string()))}), path
    )
    return path


# --- answers -------------------------------------------------------------------------------


def test_answers_equal_the_serving_top_k_and_unknown_items_are_counted(
    tenant, local_ray, tmp_path, capsys
):
    test = Dataset(tenant["data"]).split("office", "test").head(12)
    known = [[f"office-item-{i}" for i in history] for history in test["history"]]
    users = [f"user-{i}" for i in range(len(known))] + ["mixed", "lost", "empty", "null"]
    histories = known + [
        ["office-item-3", "no-such-item", "office-item-4"],
        ["ghost-1", "ghost-2"],
        [],
        None,
    ]
    path = write_users(tmp_path / "users.parquet", users, histories)
    out = tmp_path / "out" / "recs.parquet"

    argv = ["recommend-batch", "--tenant", "shop", "--users", str(path), "--out", str(out),
            "-k", str(K), "--batch-size", "5", "--actors", "2", "--tracking-uri", tenant["uri"],
            "-q"]  # fmt: skip
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "skipped 3 users with no known item" in printed
    assert "left out 3 unknown item(s) from 2 users" in printed

    got = read_recommendations(out)
    assert set(got) == {f"user-{i}" for i in range(len(known))} | {"mixed"}
    expected = serving_top_k(tenant, [*known, ["office-item-3", "office-item-4"]])
    for user, want in zip([*users[: len(known)], "mixed"], expected, strict=True):
        assert_same_ranking(got[user], want)

    record = json.loads((tmp_path / "out" / "recs.parquet.json").read_text())
    assert record["users"] == {
        "read": len(users),
        "recommended": len(known) + 1,
        "skipped_no_known_item": 3,
        "with_unknown_items": 2,
    }
    assert record["unknown_items"]["skipped"] == 3
    assert set(record["unknown_items"]["examples"]) == {"no-such-item", "ghost-1", "ghost-2"}
    assert record["rows"] == K * (len(known) + 1)
    assert not list(out.parent.glob(".*"))  # nothing staged or partial is left behind


def test_output_columns_and_record_are_the_documented_ones(tenant, local_ray, tmp_path):
    path = write_users(
        tmp_path / "users.parquet", ["a", "b"], [["office-item-1"], ["office-item-2"]]
    )
    out = tmp_path / "recs.parquet"
    recommend_batch(
        BatchConfig(tenant="shop", out=str(out), users=str(path), k=K, tracking_uri=tenant["uri"],
                    progress=False)
    )  # fmt: skip
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    ranks = table.to_pandas().groupby("user")["rank"].apply(list)
    assert ranks.to_dict() == {"a": list(range(1, K + 1)), "b": list(range(1, K + 1))}

    record = json.loads(table.schema.metadata[METADATA_KEY.encode()])
    assert record == json.loads(Path(f"{out}.json").read_text())
    assert record["format_version"] == 1
    assert (record["tenant"], record["model"]) == ("shop", "unisrec-adaptor-shop")
    assert (record["version"], record["alias"]) == ("1", "production")
    assert record["run_id"] == tenant["run_id"]
    assert (record["domain"], record["k"], record["exclude_history"]) == ("office", K, True)
    assert record["input"] == {"users": str(path), "all_users": False}
    assert record["data_digest"] == Dataset(tenant["data"]).digest
    documented = (REPO / "docs" / "data-format.md").read_text()
    for key in [*record, *record["users"], *record["unknown_items"], METADATA_KEY]:
        assert f"`{key}`" in documented, key


def test_all_users_are_ranked_on_their_whole_sequence(tenant, local_ray, tmp_path):
    out = tmp_path / "recs.parquet"
    record = recommend_batch(
        BatchConfig(tenant="shop", out=str(out), all_users=True, data_dir=str(tenant["data"]),
                    version="1", k=K, batch_size=7, tracking_uri=tenant["uri"], progress=False)
    )  # fmt: skip
    assert record["alias"] is None and record["version"] == "1"
    assert record["input"] == {"users": None, "all_users": True, "data_dir": str(tenant["data"])}

    dataset = Dataset(tenant["data"])
    keys = dataset.users("office").set_index("index")["key"]
    train, valid, test = (dataset.split("office", part) for part in ("train", "valid", "test"))
    sequences = [
        [f"office-item-{i}" for i in [*items, v, t]]
        for items, v, t in zip(train["items"], valid["target"], test["target"], strict=True)
    ]
    got = read_recommendations(out)
    assert set(got) == set(keys) and record["users"]["read"] == len(keys)
    for user, want in zip(train["user"], serving_top_k(tenant, sequences), strict=True):
        assert_same_ranking(got[keys[user]], want)


def test_all_users_without_data_dir_reads_the_dataset_its_lineage_names(
    tenant, local_ray, tmp_path, capsys
):
    out = tmp_path / "recs.parquet"
    argv = ["recommend-batch", "--tenant", "shop", "--all-users", "--out", str(out),
            "-k", str(K), "--tracking-uri", tenant["uri"], "-q"]  # fmt: skip
    assert cli(argv) == 0
    assert "unisrec-adaptor-shop version 1:" in capsys.readouterr().out
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["input"] == {"users": None, "all_users": True, "data_dir": str(tenant["data"])}
    users = Dataset(tenant["data"]).users("office")
    assert record["users"]["read"] == len(users) == len(read_recommendations(out))


def test_all_users_names_the_lineage_directory_that_no_longer_exists(tenant, tmp_path, capsys):
    moved = tmp_path / "moved"
    tenant["data"].rename(moved)
    try:
        argv = ["recommend-batch", "--tenant", "shop", "--all-users",
                "--out", str(tmp_path / "recs.parquet"), "--tracking-uri", tenant["uri"]]  # fmt: skip
        assert cli(argv) == 2
    finally:
        moved.rename(tenant["data"])
    assert capsys.readouterr().err.splitlines() == [
        f"error: --all-users: unisrec-adaptor-shop version 1 was fine-tuned on {tenant['data']}, "
        "which no longer exists; give --data-dir, where that dataset is now"
    ]
    assert not (tmp_path / "recs.parquet").exists()


# --- unisrec recommend: the same registered version ---------------------------------------


def test_recommend_reads_the_registered_version_without_a_fine_tune_directory(
    tenant, tmp_path, capsys, monkeypatch
):
    history = ["office-item-3", "office-item-4", "office-item-5"]
    expected = serving_top_k(tenant, [history])[0]
    output = Path(tenant["output_dir"])
    output.rename(tmp_path / "elsewhere")  # no fine-tune output anywhere it could look
    monkeypatch.chdir(tmp_path)
    try:
        for which in ([], ["--version", "1"], ["--alias", "candidate"]):
            capsys.readouterr()
            argv = ["recommend", "--tenant", "shop", "--history", ",".join(history),
                    "-k", str(K), "--tracking-uri", tenant["uri"], *which]  # fmt: skip
            assert cli(argv) == 0
            lines = capsys.readouterr().out.splitlines()
            got = [(line.split()[2], float(line.split()[1])) for line in lines]
            assert [key for key, _ in got] == [key for key, _ in expected]
            assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-4)
            assert "office item number" in lines[0]
    finally:
        (tmp_path / "elsewhere").rename(output)


def test_recommend_names_a_missing_version_alias_or_model(tenant, tmp_path, capsys):
    base = ["recommend", "--history", "office-item-1", "--tracking-uri", tenant["uri"]]
    for options, message in (
        (["--tenant", "shop", "--version", "7"], "error: --version: unisrec-adaptor-shop has no version 7"),
        (["--tenant", "shop", "--alias", "nightly"], "error: --alias: unisrec-adaptor-shop has no 'nightly' version"),
        (["--tenant", "nobody"], f"error: --tenant: no registered model 'unisrec-adaptor-nobody' in {tenant['uri']}"),
    ):  # fmt: skip
        assert cli([*base, *options]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(message), err


# --- bad input -----------------------------------------------------------------------------


def batch(tenant: dict, tmp_path: Path, **fields) -> dict:
    cfg = {"tenant": "shop", "out": str(tmp_path / "recs.parquet"), "tracking_uri": tenant["uri"]}
    return recommend_batch(BatchConfig(**(cfg | fields)))


def test_a_missing_users_file_is_named(tenant, tmp_path, capsys):
    missing = tmp_path / "nobody.parquet"
    with pytest.raises(DataError, match="no such file") as err:
        batch(tenant, tmp_path, users=str(missing))
    assert err.value.file == str(missing)
    argv = ["recommend-batch", "--tenant", "shop", "--users", str(missing), "--out",
            str(tmp_path / "recs.parquet"), "--tracking-uri", tenant["uri"]]  # fmt: skip
    assert cli(argv) == 2
    assert f"error: {missing}: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("columns", "field", "message"),
    [
        ({"user": ["a"], "items": [["office-item-1"]]}, "history", "missing column"),
        ({"history": [["office-item-1"]]}, "user", "missing column"),
        ({"user": ["a"], "history": ["office-item-1"]}, "history", "list of item keys"),
        ({"user": ["a"], "history": [[1, 2]]}, "history", "list of item keys"),
    ],
)
def test_a_users_file_with_wrong_columns_names_file_and_field(
    tenant, tmp_path, columns, field, message
):
    path = tmp_path / "users.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(DataError, match=message) as err:
        batch(tenant, tmp_path, users=str(path))
    assert (err.value.file, err.value.field) == (str(path), field)
    assert str(path) in str(err.value)


def test_a_users_file_that_is_not_parquet_is_named(tenant, tmp_path):
    path = tmp_path / "users.parquet"
    path.write_text("user,history\na,office-item-1\n")
    with pytest.raises(DataError, match="not a Parquet file") as err:
        batch(tenant, tmp_path, users=str(path))
    assert err.value.file == str(path)


def test_a_missing_version_or_alias_and_a_foreign_dataset_are_config_errors(tenant, tmp_path):
    users = write_users(tmp_path / "users.parquet", ["a"], [["office-item-1"]])
    with pytest.raises(ConfigError, match="no version 7"):
        batch(tenant, tmp_path, users=str(users), version="7")
    with pytest.raises(ConfigError, match="no 'nightly' version"):
        batch(tenant, tmp_path, users=str(users), alias="nightly")
    other = write_small_dataset(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="--data-dir"):
        batch(tenant, tmp_path, all_users=True, data_dir=str(other))
    with pytest.raises(ConfigError, match="one of --users"):
        batch(tenant, tmp_path)
    with pytest.raises(ConfigError, match="-k"):
        batch(tenant, tmp_path, users=str(users), k=0)


# --- on a cluster --------------------------------------------------------------------------


def test_submit_runs_recommend_batch_with_its_options_and_checks_them_first(tmp_path):
    import argparse

    from cluster.commands import register_commands
    from cluster.jobs import job_spec

    options = ["--tenant", "shop", "--users", "/mnt/shared/users.parquet",
               "--out", "/mnt/shared/recs.parquet", "-k", "50"]  # fmt: skip
    spec = job_spec("recommend-batch", None, options, working_dir=tmp_path)
    assert spec.entrypoint == "python -m recipes.cli recommend-batch " + " ".join(options)
    assert spec.metadata == {"unisrec.job": "recommend-batch"}

    parser = argparse.ArgumentParser(prog="unisrec")
    register_commands(parser.add_subparsers(dest="command", required=True))
    closed = "http://127.0.0.1:9"  # nothing listens there
    submit = ["submit", "--address", closed, "--working-dir", str(tmp_path), "recommend-batch"]
    with pytest.raises(SystemExit):  # argparse names the missing option, before any upload
        args = parser.parse_args([*submit, "--tenant", "shop", "--users", "u.parquet"])
        args.func(args)
    args = parser.parse_args([*submit, *options])
    with pytest.raises(ConfigError, match="no Ray cluster answers"):  # checks passed
        args.func(args)


# --- the benchmark -------------------------------------------------------------------------


def test_benchmark_runs_its_main_on_tiny_data(local_ray, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports machine_load, a sibling
    bench = importlib.import_module("bench_recommend_batch")
    out = tmp_path / "bench.json"
    bench.main(["--work", str(tmp_path / "work"), "--users", "40", "--items", "30",
                "--model", "tiny", "-k", "5", "--actors", "1", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["setup"]["users"] == 40 and result["rows"] == 40 * 5
    assert result["users_per_second"] > 0 and result["seconds"] > 0
    assert result["peak_rss_mb"]["with_ray"] >= result["peak_rss_mb"]["driver"] > 0
    assert sorted(result["load"]) == ["after", "before"]
    assert all(len(v) == 3 for v in result["load"].values())
