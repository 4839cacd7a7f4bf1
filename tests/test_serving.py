"""Recommendations: catalogue files, new text-only items, the CLI and the MLflow pyfunc."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers_data import write_small_dataset

from adaptors.bundle import load_bundle
from adaptors.catalogue import Catalogue
from adaptors.config import FinetuneConfig
from adaptors.finetune import run_finetune
from adaptors.topk import ranking_table, top_k
from pretrain.model import BackboneConfig, SASRec, UniSRec
from serving.commands import register_commands
from serving.endpoint import rank_requests, share_frozen_encoder
from serving.new_items import add_items_from_csv, read_items_csv
from unisrec.config import from_dict
from unisrec.errors import DataError

TINY = {"hidden_size": 16, "inner_size": 32, "num_experts": 2, "max_seq_len": 10, "dropout": 0.1}


@pytest.fixture(scope="module")
def tenants(tmp_path_factory) -> dict:
    """Two fine-tuned tenants (inductive and transductive, trained from scratch)."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    data = write_small_dataset(root / "data")
    out = {"root": root, "uri": uri}
    for tenant, mode in (("shop", "inductive"), ("shop-ids", "transductive")):
        cfg = from_dict(
            FinetuneConfig,
            {
                "tenant": tenant,
                "data": {"dir": str(data), "domain": "office"},
                "model": TINY,
                "mode": mode,
                "optim": {"max_epochs": 2, "batch_size": 16, "lr": 1e-2},
                "mlflow": {"tracking_uri": uri},
                "output_root": str(root / "runs"),
            },
        )
        out[tenant] = Path(run_finetune(cfg, progress=False)["output_dir"])
    return out


def copy_tenant(src: Path, dst: Path) -> Path:
    """A scratch copy of a tenant's output, so adding items leaves the shared one alone."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_catalogue_round_trips_and_refuses_mismatched_rows(tmp_path):
    catalogue = Catalogue(
        ["a", "b"], ["A", "B"], np.zeros((3, 4), np.float32), 2, {"name": "e", "dim": 4}
    )
    catalogue.save(tmp_path)
    loaded = Catalogue.load(tmp_path)
    assert loaded.keys == ["a", "b"] and loaded.indexes(["b", "a"]) == [2, 1]
    with pytest.raises(ValueError, match="vector rows"):
        Catalogue(["a"], ["A"], np.zeros((3, 4), np.float32), 1, {})
    with pytest.raises(KeyError, match="zzz"):
        loaded.indexes(["zzz"])


@pytest.mark.parametrize(
    ("content", "line", "field"),
    [
        ("item,text\nx1,hello\nx2,\n", 3, "text"),
        ("item,text\nx1,hello\nx1,again\n", 3, "item"),
        ("item,title\nx1,hello\n", 1, "text"),
    ],
)
def test_bad_item_csv_names_file_line_and_field(tmp_path, content, line, field):
    path = tmp_path / "new.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_items_csv(path)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), line, field)


def test_new_text_only_item_is_recommended_without_retraining(tenants, tmp_path):
    out = copy_tenant(tenants["shop"], tmp_path / "shop")
    model, spec = load_bundle(out / "adaptor")
    catalogue = Catalogue.load(out / "catalogue")
    history = ["office-item-3", "office-item-4", "office-item-5"]
    best_key, best_score = top_k(model, spec, catalogue, [history], k=1)[0][0]

    # The new item's text encodes exactly like the current favourite's, so it must tie with it.
    twin = catalogue.vectors[catalogue.indexes([best_key])[0]]
    csv_path = tmp_path / "new.csv"
    csv_path.write_text("item,text\nbrand-new,a twin of the favourite\n")
    add_items_from_csv(
        out / "catalogue", csv_path, encode=lambda texts, enc: np.stack([twin] * len(texts))
    )

    updated = Catalogue.load(out / "catalogue")
    assert len(updated) == 31 and updated.trained_items == 30
    recs = dict(top_k(model, spec, updated, [history], k=2)[0])
    assert set(recs) == {best_key, "brand-new"}
    assert recs["brand-new"] == pytest.approx(best_score, abs=1e-5)


def test_transductive_model_scores_new_items_by_text_alone(tenants, tmp_path):
    out = copy_tenant(tenants["shop-ids"], tmp_path / "shop-ids")
    model, spec = load_bundle(out / "adaptor")
    catalogue = Catalogue.load(out / "catalogue")
    extended = catalogue.with_items(["fresh"], ["fresh item"], catalogue.vectors[1:2].copy())
    recs = dict(top_k(model, spec, extended, [["office-item-1"]], k=31, exclude_history=False)[0])
    assert "fresh" in recs
    # Same text as item 1 but no ID embedding: a different score from item 1's.
    assert recs["fresh"] != pytest.approx(recs["office-item-1"])


def test_history_items_are_not_recommended_again_by_default(tenants):
    model, spec = load_bundle(tenants["shop"] / "adaptor")
    catalogue = Catalogue.load(tenants["shop"] / "catalogue")
    history = [f"office-item-{i}" for i in range(1, 26)]
    keys = [k for k, _ in top_k(model, spec, catalogue, [history], k=10)[0]]
    assert len(keys) == 5 and not set(keys) & set(history)


def test_recommend_command_prints_top_k_with_item_text(tenants, capsys):
    parser = argparse.ArgumentParser(prog="unisrec")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["recommend", "--tenant", "shop", "--history", "office-item-7,office-item-8", "-k", "3",
         "--alias", "candidate", "--tracking-uri", tenants["uri"]]
    )  # fmt: skip
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].split()[0] == "1" and "office item number" in lines[0]


def test_registered_pyfunc_returns_top_k_item_keys_for_list_and_string_histories(tenants):
    mlflow.set_tracking_uri(tenants["uri"])
    served = mlflow.pyfunc.load_model("models:/unisrec-adaptor-shop@latest")
    frame = pd.DataFrame(
        {"history": [["office-item-1", "office-item-2"], "office-item-1 office-item-2"]}
    )
    result = served.predict(frame, params={"k": 4})
    assert list(result.columns) == ["items", "scores"]
    assert result["items"][0] == result["items"][1] and len(result["items"][0]) == 4
    assert list(result["scores"][0]) == sorted(result["scores"][0], reverse=True)

    model, spec = load_bundle(tenants["shop"] / "adaptor")
    local = top_k(
        model,
        spec,
        Catalogue.load(tenants["shop"] / "catalogue"),
        [["office-item-1", "office-item-2"]],
        k=4,
    )
    assert list(result["items"][0]) == [key for key, _ in local[0]]


# --- ranking many histories at once (what the endpoint does with a batch) ------------------


def test_ranking_table_scores_bit_for_bit_as_the_models_own_score(tenants):
    """The table normalises UniSRec's candidates once; the scores must not move by one bit."""
    torch.manual_seed(0)
    models = [load_bundle(tenants[t] / "adaptor")[0] for t in ("shop", "shop-ids")]
    models.append(SASRec(from_dict(BackboneConfig, TINY), num_items=30))
    for model in models:
        model.eval()
        vectors = torch.randn(31, TINY["hidden_size"])
        vectors[0] = 0
        table = ranking_table(model, None, None, item_vectors=vectors)
        queries = torch.randn(7, TINY["hidden_size"])
        expected = model.score(queries, vectors[1:], 0.07)
        assert torch.equal(model.score_candidates(queries, table.candidates, 0.07), expected), type(
            model
        ).__name__


def test_top_k_with_a_kept_table_equals_top_k_without(tenants):
    model, spec = load_bundle(tenants["shop"] / "adaptor")
    catalogue = Catalogue.load(tenants["shop"] / "catalogue")
    histories = [["office-item-3", "office-item-9"], ["office-item-1"]]
    table = ranking_table(model, spec, catalogue)
    assert top_k(model, spec, catalogue, histories, k=5, table=table) == top_k(
        model, spec, catalogue, histories, k=5
    )


@pytest.mark.parametrize("tenant", ["shop", "shop-ids"])
def test_requests_ranked_together_each_get_their_own_answer(tenants, tenant):
    """One batch: histories of different lengths, different k, a bad request among them;
    each answer is top_k's for that history alone (same items, same scores to float rounding
    of the batched products), the bad one gets its own error."""
    model, spec = load_bundle(tenants[tenant] / "adaptor")
    catalogue = Catalogue.load(tenants[tenant] / "catalogue")
    recommender = SimpleNamespace(model=model, spec=spec, catalogue=catalogue)
    requests = [
        (["office-item-3", "office-item-4", "office-item-5", "office-item-6"], 5),
        (["office-item-2"], 1),
        (["office-item-2", "no-such-item"], 3),
        ([f"office-item-{i}" for i in range(1, 13)], 10),
        (["office-item-7"], 31),
        (["office-item-8", "office-item-8"], 3),
    ]
    answers = rank_requests(recommender, ranking_table(model, spec, catalogue), requests)
    assert answers[2] == {"status": 400, "error": "history: unknown item key(s) ['no-such-item']"}
    assert answers[4]["status"] == 400 and "exceeds" in answers[4]["error"]
    for (history, k), answer in zip(requests, answers, strict=True):
        if "error" in answer:
            continue
        alone = top_k(model, spec, catalogue, [history], k=k)[0]
        assert [i["key"] for i in answer["items"]] == [key for key, _ in alone]
        assert [i["score"] for i in answer["items"]] == pytest.approx(
            [score for _, score in alone], abs=1e-5
        )
        texts = dict(zip(catalogue.keys, catalogue.texts, strict=True))
        assert all(i["text"] == texts[i["key"]] for i in answer["items"])


def test_tenants_on_one_backbone_share_its_frozen_encoder_parts_only():
    """Fine-tuning trains the encoder's input LayerNorm per tenant: sharing the whole encoder
    gave the second tenant loaded the first one's LayerNorm (and its scores)."""
    torch.manual_seed(0)
    cfg = from_dict(BackboneConfig, TINY)
    first, second = UniSRec(cfg, text_dim=8).eval(), UniSRec(cfg, text_dim=8).eval()
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        second.encoder.norm.weight.mul_(3.0)  # what fine-tuning changes
    vectors, seqs = torch.randn(31, cfg.hidden_size), torch.randint(1, 31, (4, 6))
    expected = [m.encode(seqs, vectors) for m in (first, second)]
    shared: dict = {}
    share_frozen_encoder(first, shared)
    share_frozen_encoder(second, shared)
    assert second.encoder.blocks is first.encoder.blocks
    assert second.encoder.position is first.encoder.position
    assert second.encoder.norm is not first.encoder.norm
    for model, want in zip((first, second), expected, strict=True):
        assert torch.equal(model.encode(seqs, vectors), want)
