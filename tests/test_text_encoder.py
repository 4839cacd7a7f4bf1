"""Item-text encoding: pooling, length bucketing, padding, the embedding cache, word drop, Ray."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from sharding.config import EncoderConfig
from sharding.embedding_cache import EmbeddingCache
from sharding.encoding import EncoderInfo, cached_encode, encode_texts
from sharding.text_encoder import PACKAGED_NAME, TextEncoder, word_drop
from unisrec.errors import ConfigError

WORDS = (
    "red green blue black white small large steel glass paper pen pencil ruler tape glue "
    "lamp desk chair shelf box bag cup plate knife fork spoon bottle jar lid cap sensor "
    "meter scale drill saw sand grit roll sheet pack set kit tool wire cable plug socket"
).split()
TEXTS = [
    "red pen",
    "large steel ruler with glass cap",
    "tape",
    "small black desk lamp and white shelf box set",
    "glue",
    "sand grit roll sheet pack for drill and saw tool kit with wire cable plug socket",
    "blue cup",
    "jar lid",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A random 2-layer, 32-d BERT with its own word-level vocabulary, saved as a local folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


def _encoder(model: str, **kwargs) -> TextEncoder:
    return TextEncoder(model, device="cpu", **kwargs)


class CountingEncoder(TextEncoder):
    """A real encoder that remembers which texts it was asked to encode."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []

    def encode(self, texts, progress=True):
        self.seen.extend(texts)
        return super().encode(texts, progress=progress)


def test_a_local_folder_loads_by_config_and_names_itself_by_path(tiny_bert):
    enc = _encoder(tiny_bert)
    vectors = enc.encode(TEXTS, progress=False)
    assert enc.name == tiny_bert
    assert enc.dim == 32
    assert vectors.shape == (len(TEXTS), 32) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()


def test_cls_pooling_is_the_first_token_state_and_differs_from_mean(tiny_bert):
    cls = _encoder(tiny_bert, pooling="cls").encode(TEXTS, progress=False)
    mean = _encoder(tiny_bert, pooling="mean").encode(TEXTS, progress=False)

    tokenizer = BertTokenizer.from_pretrained(tiny_bert)
    model = BertModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        for i, text in enumerate(TEXTS):
            batch = tokenizer([text], return_tensors="pt")
            hidden = model(**batch).last_hidden_state[0]  # (T, 32)
            np.testing.assert_allclose(cls[i], hidden[0].numpy(), atol=1e-5)
            np.testing.assert_allclose(mean[i], hidden.mean(dim=0).numpy(), atol=1e-5)
    assert not np.allclose(cls, mean, atol=1e-3)


def test_length_bucketing_gives_the_same_vectors_in_input_order(tiny_bert):
    texts = TEXTS * 3  # several batches of 4, lengths interleaved
    bucketed = _encoder(tiny_bert, batch_size=4, bucket_by_length=True).encode(texts, False)
    plain = _encoder(tiny_bert, batch_size=4, bucket_by_length=False).encode(texts, False)
    np.testing.assert_allclose(bucketed, plain, atol=1e-5)
    one_by_one = _encoder(tiny_bert, batch_size=1).encode(TEXTS, False)
    np.testing.assert_allclose(bucketed[: len(TEXTS)], one_by_one, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_in_a_batch_does_not_change_a_text_vector(tiny_bert, pooling):
    enc = _encoder(tiny_bert, pooling=pooling, bucket_by_length=False, batch_size=8)
    alone = enc.encode(["red pen"], progress=False)
    beside_long = enc.encode(["red pen", TEXTS[5]], progress=False)
    np.testing.assert_allclose(alone[0], beside_long[0], atol=1e-5)


def test_texts_are_cut_to_max_length_tokens(tiny_bert):
    short = _encoder(tiny_bert, max_length=4, pooling="mean")
    # [CLS] sand grit [SEP]: everything after the second word is cut away.
    cut = short.encode([TEXTS[5], "sand grit"], progress=False)
    np.testing.assert_allclose(cut[0], cut[1], atol=1e-5)


def test_an_empty_list_encodes_to_zero_rows(tiny_bert):
    assert _encoder(tiny_bert).encode([], progress=False).shape == (0, 32)


def test_a_missing_model_folder_is_named_in_the_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="no-such-model"):
        TextEncoder(str(missing))


def test_the_cache_encodes_each_distinct_text_once_across_runs(tiny_bert, tmp_path):
    enc = CountingEncoder(tiny_bert, device="cpu")
    info = EncoderInfo(enc.name, enc.dim, enc.pooling, enc.max_length)
    texts = TEXTS[:5] + TEXTS[:2]  # repeats are encoded once

    def encode(missing):
        return enc.encode(missing, progress=False)

    first, hits = cached_encode(
        texts, enc.dim, EmbeddingCache(tmp_path, info.identity, enc.dim), encode
    )
    assert hits == 0 and sorted(enc.seen) == sorted(TEXTS[:5])

    enc.seen.clear()
    # A new process (a fresh cache object) with one new text, as when a domain is added.
    again, hits = cached_encode(
        texts + [TEXTS[6]], enc.dim, EmbeddingCache(tmp_path, info.identity, enc.dim), encode
    )
    assert enc.seen == [TEXTS[6]]
    assert hits == len(texts)
    np.testing.assert_array_equal(again[: len(texts)], first)
    np.testing.assert_allclose(again[-1], enc.encode([TEXTS[6]], progress=False)[0], atol=1e-5)


def test_another_encoder_identity_does_not_reuse_cached_vectors(tmp_path):
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    cls = EmbeddingCache(tmp_path, "model-a|pooling=cls|max_length=128", 4)
    cls.put_many(["a", "b", "c"], vectors)

    _, found = EmbeddingCache(tmp_path, "model-a|pooling=mean|max_length=128", 4).get_many(
        ["a", "b"]
    )
    assert not found.any()
    got, found = EmbeddingCache(tmp_path, "model-a|pooling=cls|max_length=128", 4).get_many(
        ["c", "zzz", "a"]
    )
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(got[[0, 2]], vectors[[2, 0]])


def test_cache_writers_add_chunks_side_by_side_and_a_broken_chunk_is_skipped(tmp_path, caplog):
    identity = "m|pooling=cls|max_length=8"
    first, second = EmbeddingCache(tmp_path, identity, 2), EmbeddingCache(tmp_path, identity, 2)
    first.put_many(["x"], np.ones((1, 2), np.float32))
    second.put_many(["y", "y"], np.full((2, 2), 2.0, np.float32))
    assert second.put_many(["y"], np.zeros((1, 2), np.float32)) == 0  # known: not rewritten

    chunks = sorted(first.directory.glob("chunk-*.npz"))
    assert len(chunks) == 2
    (first.directory / "chunk-0-truncated.npz").write_bytes(chunks[0].read_bytes()[:40])

    with caplog.at_level(logging.WARNING):
        reopened = EmbeddingCache(tmp_path, identity, 2)
    assert "chunk-0-truncated.npz" in caplog.text
    got, found = reopened.get_many(["x", "y"])
    assert found.all() and len(reopened) == 2
    np.testing.assert_array_equal(got, [[1.0, 1.0], [2.0, 2.0]])


def test_encode_texts_returns_input_order_and_answers_a_rerun_from_cache(
    tiny_bert, tmp_path, caplog
):
    cfg = EncoderConfig(model=tiny_bert, batch_size=3, cache_dir=str(tmp_path / "cache"))
    texts = TEXTS[::-1]
    direct = _encoder(tiny_bert, bucket_by_length=False).encode(texts, progress=False)

    vectors, info = encode_texts(texts, cfg, progress=False)
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    assert (info.name, info.dim, info.pooling, info.max_length) == (tiny_bert, 32, "cls", 128)

    with caplog.at_level(logging.INFO, logger="sharding.encoding"):
        again, _ = encode_texts(texts, cfg, progress=False)
    assert f"{len(texts)} from cache, 0 not" in caplog.text
    np.testing.assert_array_equal(again, vectors)


def test_word_drop_drops_about_p_of_the_words_and_never_empties_a_text():
    rng = random.Random(7)
    text = " ".join(WORDS * 20)  # 960 words
    kept = [len(word_drop(text, 0.15, rng).split()) for _ in range(20)]
    dropped = 1 - sum(kept) / (20 * len(text.split()))
    assert 0.13 < dropped < 0.17

    assert word_drop("steel ruler", 0.0, rng) == "steel ruler"
    singles = {word_drop("steel ruler", 1.0, rng) for _ in range(50)}
    assert singles == {"steel", "ruler"}
    assert word_drop("  a   b ", 0.0, rng) == "a b"

    again = [word_drop(text, 0.15, random.Random(7)) for _ in range(2)]
    assert again[0] == again[1]


def test_the_packaged_minilm_loads_offline_as_a_384_d_encoder():
    enc = TextEncoder("packaged", pooling="mean", device="cpu")
    texts = [
        "Adhesive-backed sanding roll, 80 grit",
        "Sandpaper sheets for wood sanding, 120 grit",
        "Digital laboratory thermometer probe",
    ]
    vectors = enc.encode(texts, progress=False)
    assert enc.name == PACKAGED_NAME and enc.dim == 384 and vectors.shape == (3, 384)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    # A pretrained model, not random weights: the two abrasives are closer than the thermometer.
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.1


@pytest.mark.slow
def test_ray_data_actors_give_the_local_vectors_in_input_order_on_loopback(tiny_bert, caplog):
    from sharding.ray_encoding import encode_with_ray

    texts = [" ".join(random.Random(i).sample(WORDS, 1 + i % 9)) for i in range(20)]
    cfg = EncoderConfig(model=tiny_bert, batch_size=4, ray_actors=2, device="cpu", cache_dir="")
    local = TextEncoder.from_config(cfg).encode(texts, progress=False)
    with caplog.at_level(logging.WARNING, logger="sharding.ray_encoding"):
        remote = encode_with_ray(texts, cfg, progress=False)
    np.testing.assert_allclose(remote, local, atol=1e-5)
    assert "not loopback" not in caplog.text


def test_a_domain_without_word_drop_is_not_encoded_twice_and_reads_its_plain_vectors(
    tiny_bert, tmp_path
):
    """domains[].word_drop: false -> no word-drop pass for that domain: no
    embeddings_worddrop.npy, and the word-drop table reads its plain vectors; a domain
    with word_drop keeps its own word-drop vectors."""
    from sharding.config import DomainSource, ShardJobConfig
    from sharding.dataset import Dataset
    from sharding.job import run_shard_job

    sources = []
    for name, word_drop_on in (("books", True), ("games", False)):
        folder = tmp_path / name
        folder.mkdir()
        rows = [f"u{u},i{(u + t) % 8},{t}" for u in range(6) for t in range(6)]
        (folder / "interactions.csv").write_text("user,item,timestamp\n" + "\n".join(rows))
        (folder / "items.csv").write_text(
            "item,text\n" + "\n".join(f"i{i},{name} {TEXTS[i]}" for i in range(8))
        )
        sources.append(
            DomainSource(
                name=name,
                format="csv",
                path=str(folder),
                interactions="interactions.csv",
                items="items.csv",
                pretrain=True,
                word_drop=word_drop_on,
            )
        )
    cfg = ShardJobConfig(
        domains=sources,
        encoder=EncoderConfig(model=tiny_bert, cache_dir="", word_drop_prob=0.5),
    )
    cfg.processing.kcore = 0
    run_shard_job(cfg, tmp_path / "data", progress=False)
    ds = Dataset(tmp_path / "data")
    files = {n: ds.manifest["domains"][n]["files"] for n in ("books", "games")}
    assert "embeddings_worddrop" in files["books"]
    assert "embeddings_worddrop" not in files["games"]
    assert np.array_equal(ds.embeddings("games", worddrop=True), ds.embeddings("games"))
    assert not np.array_equal(ds.embeddings("books", worddrop=True), ds.embeddings("books"))


def test_auto_pooling_is_mean_for_the_packaged_minilm_and_cls_for_other_checkpoints(tiny_bert):
    """encoder.pooling: auto (the default) -> mean for all-MiniLM-L6-v2, which was trained
    with mean pooling and measured better on Scientific; cls for any other BERT; an
    explicit choice is kept. The resolved pooling names the cache identity."""
    assert EncoderConfig().pooling == "auto"
    assert EncoderConfig().resolved_pooling() == "mean"
    assert EncoderConfig(model=tiny_bert).resolved_pooling() == "cls"
    assert EncoderConfig(pooling="cls").resolved_pooling() == "cls"
    assert EncoderConfig(model=tiny_bert, pooling="mean").resolved_pooling() == "mean"
    _, info = encode_texts(TEXTS[:2], EncoderConfig(model=tiny_bert, cache_dir=""), progress=False)
    assert info.pooling == "cls" and "pooling=cls" in info.identity
    assert TextEncoder.from_config(EncoderConfig(model=tiny_bert)).pooling == "cls"
