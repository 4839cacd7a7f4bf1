"""Bad-input drills on the data path (issue 10).

* a 1 MB item description used to fail on the csv module's 131,072-character field limit,
  and ``on_bad_row: skip`` could not skip it: now it is read, cut to ``max_text_chars`` and
  counted (``skipped["text_truncated"]``, which reaches the manifest and the log);
* an empty domain (header-only interactions, or everything filtered away) used to crash
  with ``UnboundLocalError`` (pretraining domain) or write a domain of 0 users: now a
  DataError names the domain and what each filter left.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sharding.config import DomainSource, ProcessingConfig, ShardJobConfig
from sharding.readers import read_domain
from unisrec.errors import DataError


@dataclass
class StubEncoder:
    name: str = "stub"
    dim: int = 4


LONG = "word " * 200_000  # 1 MB, far over the csv module's default field limit


def _write_domain(directory, interactions: list[str], items: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "interactions.csv").write_text(
        "user,item,timestamp\n" + "".join(f"{r}\n" for r in interactions), encoding="utf-8"
    )
    (directory / "items.csv").write_text(
        "item,text\n" + "".join(f"{r}\n" for r in items), encoding="utf-8"
    )


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_1mb_description_is_cut_to_max_text_chars_and_counted(tmp_path, on_bad_row):
    _write_domain(tmp_path, ["u,a,1", "u,b,2", "u,c,3"], [f'a,"{LONG}"', "b,B", "c,C"])
    source = DomainSource(name="c", format="csv", path=str(tmp_path), on_bad_row=on_bad_row)
    seqs = read_domain(source, ProcessingConfig(kcore=0, max_text_chars=100))
    assert seqs.item_keys == ["a", "b", "c"]
    assert 0 < len(seqs.item_texts[0]) <= 100 and seqs.item_texts[0].startswith("word word")
    assert seqs.skipped == {"text_truncated": 1}


def test_truncations_reach_the_manifest(tmp_path, monkeypatch):
    import numpy as np

    from sharding import job

    _write_domain(
        tmp_path / "raw",
        ["u,a,1", "u,b,2", "u,c,3", "v,a,1", "v,b,2", "v,c,3"],
        [f'a,"{LONG}"', "b,B", "c,C"],
    )
    # A stand-in text encoder: the test is about the reader, not the vectors.
    monkeypatch.setattr(
        job,
        "encode_texts",
        lambda texts, cfg, progress=True: (np.ones((len(texts), 4), np.float32), StubEncoder()),
    )
    cfg = ShardJobConfig(
        domains=[DomainSource(name="c", format="csv", path=str(tmp_path / "raw"))],
        processing=ProcessingConfig(kcore=0, max_text_chars=50),
    )
    manifest = job.run_shard_job(cfg, tmp_path / "data", progress=False)
    assert manifest["domains"]["c"]["skipped"] == {"text_truncated": 1}


@pytest.mark.parametrize("pretrain", [True, False])
def test_a_header_only_domain_is_a_data_error_naming_it(tmp_path, pretrain):
    from sharding.job import run_shard_job

    _write_domain(tmp_path / "raw", [], ["a,A"])
    cfg = ShardJobConfig(
        domains=[
            DomainSource(name="empty", format="csv", path=str(tmp_path / "raw"), pretrain=pretrain)
        ]
    )
    with pytest.raises(DataError, match="domain 'empty'") as err:
        run_shard_job(cfg, tmp_path / "data", progress=False)
    assert "0 interactions read" in str(err.value)
    assert not (tmp_path / "data").exists()


def test_a_domain_emptied_by_kcore_says_what_each_filter_left(tmp_path):
    _write_domain(
        tmp_path,
        ["u,a,1", "u,b,2", "u,c,3", "u,c,3", "v,a,1", "v,zz,2"],
        ["a,A", "b,B", "c,C", "zz,<br>"],
    )
    source = DomainSource(name="tiny", format="csv", path=str(tmp_path), on_bad_row="skip")
    with pytest.raises(DataError) as err:
        read_domain(source, ProcessingConfig(kcore=5))
    message = str(err.value)
    assert "domain 'tiny'" in message
    assert "5 interactions read" in message
    assert "unknown_item 1" in message and "duplicate 1" in message
    assert "5-core" in message and "0 users" in message
