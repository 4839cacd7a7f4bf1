"""The synthetic demo data: deterministic, shaped for transfer, readable by the shard job."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from sharding.config import ProcessingConfig, ShardJobConfig
from sharding.readers import read_domain
from sharding.synthetic import SUCCESSOR, TOPICS, topic_of, write_synthetic
from unisrec.config import from_dict

TARGETS = ("crafts", "gifts")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[dict]:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), seed=7)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def topic_sequences(source: dict) -> list[list[str]]:
    """Each user's item topics in time order, read back from the written CSV files."""
    items = pd.read_csv(Path(source["path"]) / source["items"])
    topic = dict(zip(items["item_id"], items["text"].map(topic_of), strict=True))
    events = pd.read_csv(Path(source["path"]) / source["interactions"])
    events = events.sort_values("timestamp", kind="stable")
    return [[topic[i] for i in group["item_id"]] for _, group in events.groupby("user_id")]


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path):
    write_synthetic(tmp_path / "a", seed=3, scale=0.3)
    write_synthetic(tmp_path / "b", seed=3, scale=0.3)
    write_synthetic(tmp_path / "c", seed=4, scale=0.3)
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["books/interactions.csv"] != c["books/interactions.csv"]


def test_adding_sources_leaves_existing_domains_unchanged(tmp_path):
    write_synthetic(tmp_path / "two", seed=1, scale=0.3, num_sources=2)
    write_synthetic(tmp_path / "four", seed=1, scale=0.3, num_sources=4)
    two, four = file_bytes(tmp_path / "two"), file_bytes(tmp_path / "four")
    for name in ("books/items.csv", "apparel/interactions.csv", "gifts/interactions.csv"):
        assert two[name] == four[name]
    assert "toys/items.csv" in four and "toys/items.csv" not in two


def test_next_topic_follows_the_shared_successor_in_every_domain(synthetic):
    for source in synthetic:
        pairs = [(a, b) for seq in topic_sequences(source) for a, b in zip(seq, seq[1:])]
        follow = sum(SUCCESSOR[a] == b for a, b in pairs) / len(pairs)
        backward = sum(SUCCESSOR[b] == a for a, b in pairs) / len(pairs)
        # P_FOLLOW = 0.6 (+ 0.15/12 by chance); stepping backward only happens at random.
        assert 0.5 < follow < 0.7, (source["name"], follow)
        assert backward < 0.05, (source["name"], backward)


def test_dog_buyers_next_buy_cat_things_in_the_targets(synthetic):
    for source in synthetic:
        if source["name"] not in TARGETS:
            continue
        after_dog = Counter(
            b for seq in topic_sequences(source) for a, b in zip(seq, seq[1:]) if a == "dog"
        )
        assert after_dog.most_common(1)[0][0] == "cat"
        assert after_dog["cat"] / sum(after_dog.values()) > 0.45


def test_target_texts_carry_the_topic_words_shared_with_the_sources(synthetic):
    texts = {
        s["name"]: pd.read_csv(Path(s["path"]) / "items.csv")["text"].tolist() for s in synthetic
    }
    source_words = {
        w
        for name, ts in texts.items()
        if name not in TARGETS
        for t in ts
        for w in t.lower().split()
    }
    topic_words = {w for words in TOPICS.values() for w in words}
    for name in TARGETS:
        assert all(topic_of(t) is not None for t in texts[name])
        target_topic_words = {w for t in texts[name] for w in t.lower().split()} & topic_words
        assert {topic_of(w) for w in target_topic_words} == set(TOPICS)
        assert target_topic_words <= source_words
    # Surface vocabulary is per domain: no item text appears in two domains.
    all_texts = [t for ts in texts.values() for t in ts]
    assert len(set(all_texts)) == len(all_texts)


def test_sources_build_a_shard_config_and_survive_the_default_kcore(synthetic):
    cfg = from_dict(ShardJobConfig, {"domains": synthetic})
    assert [d.name for d in cfg.domains] == ["books", "apparel", "toys", "home", "crafts", "gifts"]
    assert [d.pretrain for d in cfg.domains] == [True] * 4 + [False] * 2
    for source in cfg.domains:
        domain = read_domain(source, ProcessingConfig(kcore=5))
        lengths = [len(s) for s in domain.sequences]
        assert 6 <= min(lengths) and max(lengths) <= 20
        users, items = len(domain.user_keys), len(domain.item_keys)
        if source.pretrain:
            assert 300 <= users <= 400 and 150 <= items <= 250, (source.name, users, items)
        else:
            assert 150 <= users <= 300 and items == 150, (source.name, users, items)


def test_scale_shrinks_users_and_items(tmp_path):
    small = write_synthetic(tmp_path, seed=7, scale=0.25, num_sources=1)
    events = pd.read_csv(Path(small[0]["path"]) / "interactions.csv")
    items = pd.read_csv(Path(small[0]["path"]) / "items.csv")
    assert 75 <= events["user_id"].nunique() <= 100
    assert 37 <= len(items) <= 63


@pytest.mark.parametrize("kwargs", [{"num_sources": 0}, {"num_sources": 7}, {"scale": 0.0}])
def test_out_of_range_arguments_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_synthetic(tmp_path, **kwargs)
