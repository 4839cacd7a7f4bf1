"""A small, seeded, SYNTHETIC multi-domain data set with item text, for demos and tests.

Nothing here comes from real users or real products: every user, item, text and timestamp is
drawn from the generator below. It is shaped so that UniSRec's claim can be seen at small
scale: a model pretrained on the source domains transfers to target domains it never saw.

What is shared by every domain:

* **Topics.** Twelve interests, each a handful of real English words (``dog puppy leash
  kennel ...``, ``cat kitten litter scratching ...``, ``guitar strings amp pick ...``). Every
  item belongs to one topic, and its text carries two or three of that topic's words.
* **Topic transitions.** Topics form a fixed cycle (:data:`SUCCESSOR`: dog -> cat -> guitar
  -> ...). After an item of topic ``t`` a user next picks an item of ``SUCCESSOR[t]`` with
  probability :data:`P_FOLLOW`, stays in ``t`` with :data:`P_STAY`, and otherwise picks any
  topic at random. This is the paper's "users who bought dog things next buy cat things"
  pattern, and it is the same in every domain.

What differs by domain: the surface vocabulary. Each domain has its own product kinds and
brands (``Larkspur Press dog paperback`` in *books*, ``Tinker Tots dog plush`` in *toys*),
so no item text repeats across domains while the topic words do.

Sizes (at ``scale=1``): up to six SOURCE domains (default four) of 300-400 users and
150-250 items, and two small TARGET domains, *crafts* and *gifts*, of 150-300 users and 150
items; every sequence has 6-20 items. Targets are small on purpose: too little data to learn
the transitions well from scratch, enough to fine-tune an adaptor.

Each domain is written in the generic CSV format (``sharding/readers/csv_table.py``)::

    OUT/<domain>/interactions.csv   user_id,item_id,timestamp   (unix seconds, time order)
    OUT/<domain>/items.csv          item_id,text

:func:`write_synthetic` returns one ``DomainSource`` mapping per domain, ready for a shard
job config::

    sources = write_synthetic("runs/synthetic-raw", seed=0)
    cfg = from_dict(ShardJobConfig, {"domains": sources})
"""

from __future__ import annotations

import bisect
import csv
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Topic name -> its words. Dict order defines the transition cycle (see SUCCESSOR).
TOPICS: dict[str, tuple[str, ...]] = {
    "dog": ("dog", "puppy", "leash", "kennel", "collar", "fetch"),
    "cat": ("cat", "kitten", "litter", "scratching", "catnip", "whisker"),
    "guitar": ("guitar", "strings", "amp", "pick", "fret", "chord"),
    "garden": ("garden", "seeds", "trowel", "soil", "planter", "compost"),
    "coffee": ("coffee", "espresso", "beans", "grinder", "roast", "latte"),
    "baking": ("baking", "flour", "whisk", "oven", "muffin", "dough"),
    "camping": ("camping", "tent", "lantern", "campfire", "trail", "backpack"),
    "fitness": ("fitness", "yoga", "dumbbell", "treadmill", "protein", "stretching"),
    "baby": ("baby", "diaper", "stroller", "crib", "pacifier", "nursery"),
    "painting": ("painting", "canvas", "brush", "easel", "watercolor", "palette"),
    "fishing": ("fishing", "rod", "reel", "lure", "tackle", "bait"),
    "cycling": ("cycling", "bike", "helmet", "pedal", "saddle", "spokes"),
}
_TOPIC_NAMES = list(TOPICS)
# The shared sequential pattern: after topic t, users tend to move on to SUCCESSOR[t].
SUCCESSOR: dict[str, str] = {
    t: _TOPIC_NAMES[(i + 1) % len(_TOPIC_NAMES)] for i, t in enumerate(_TOPIC_NAMES)
}
P_FOLLOW = 0.6  # next item's topic is SUCCESSOR[current topic]
P_STAY = 0.25  # next item's topic is the current topic; the rest: a uniformly random topic

_WORD_TOPIC = {word: topic for topic, words in TOPICS.items() for word in words}
_ADJECTIVES = ("classic", "deluxe", "mini", "vintage", "premium", "everyday", "handmade", "eco")
_MIN_LEN, _MAX_LEN = 6, 20  # items per user sequence
_EPOCH = 1_672_531_200  # 2023-01-01T00:00:00Z: first possible interaction


@dataclass(frozen=True)
class DomainStyle:
    """One domain's surface vocabulary: what it sells and under which brands."""

    name: str
    kinds: tuple[str, ...]  # product kinds, e.g. "paperback", "plush"
    brands: tuple[str, ...]


SOURCE_DOMAINS: tuple[DomainStyle, ...] = (
    DomainStyle(
        "books",
        ("paperback", "hardcover", "handbook", "field guide", "magazine", "cookbook"),
        ("Larkspur Press", "Quillon Books", "Northgate Publishing", "Red Finch Editions"),
    ),
    DomainStyle(
        "apparel",
        ("t-shirt", "hoodie", "cap", "socks", "scarf", "jacket"),
        ("Threadline", "Urban Loom", "Kestrel Wear", "Cottonfield"),
    ),
    DomainStyle(
        "toys",
        ("plush", "jigsaw puzzle", "playset", "board game", "action figure", "building kit"),
        ("Tinker Tots", "Wondertoy", "Brightblock", "Pip and Pals"),
    ),
    DomainStyle(
        "home",
        ("cushion", "wall clock", "blanket", "lamp", "doormat", "wall print"),
        ("Hearthstone Living", "Nordhaus", "Maple and Moss", "Casa Verde"),
    ),
    DomainStyle(
        "stationery",
        ("notebook", "planner", "postcard set", "pencil case", "bookmark", "calendar"),
        ("Paperwren", "Inkhollow", "Foliohouse", "Scribe and Co"),
    ),
    DomainStyle(
        "media",
        ("documentary", "audiobook", "video course", "podcast season", "poster", "vinyl record"),
        ("Lumen Studios", "Bluehour Media", "Tallgrass Films", "Echo Vale"),
    ),
)
TARGET_DOMAINS: tuple[DomainStyle, ...] = (
    DomainStyle(
        "crafts",
        (
            "sticker pack",
            "embroidery patch",
            "enamel pin",
            "stencil kit",
            "keychain",
            "cross-stitch",
        ),
        ("Makers Lane", "Stitchwell", "Crafty Owl"),
    ),
    DomainStyle(
        "gifts",
        ("gift basket", "greeting card", "ornament", "gift box", "scented candle", "tin set"),
        ("Ribbon and Bow", "Goodwill Gifting", "Merrymade"),
    ),
)

_CSV_COLUMNS = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "text": "text"}


def topic_of(text: str) -> str | None:
    """The topic whose words appear most often in ``text`` (None when there are none)."""
    counts: dict[str, int] = {}
    for word in text.lower().split():
        topic = _WORD_TOPIC.get(word)
        if topic:
            counts[topic] = counts.get(topic, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def write_synthetic(
    out_dir: str | Path,
    seed: int = 0,
    scale: float = 1.0,
    num_sources: int = 4,
    target_scale: float | None = None,
) -> list[dict]:
    """Write ``num_sources`` source and two target domains under ``out_dir``.

    Same ``seed`` and ``scale`` -> byte-identical files. A domain's data depends only on
    ``seed``, ``scale`` and its own name, so adding sources leaves the others unchanged.
    ``scale`` multiplies the numbers of users and items (at least 24 items, 10 users);
    ``target_scale`` (default: ``scale``) does so for the two targets alone: a small, sparse
    target is where a pretrained backbone pays off.

    Returns one ``DomainSource`` mapping per domain (sources first, with ``pretrain: true``).
    """
    if not 1 <= num_sources <= len(SOURCE_DOMAINS):
        raise ValueError(f"num_sources: must be 1..{len(SOURCE_DOMAINS)}, got {num_sources}")
    target_scale = scale if target_scale is None else target_scale
    if scale <= 0 or target_scale <= 0:
        raise ValueError(f"scale, target_scale: must be > 0, got {scale}, {target_scale}")
    out = Path(out_dir)
    plans = [(style, True) for style in SOURCE_DOMAINS[:num_sources]]
    plans += [(style, False) for style in TARGET_DOMAINS]
    sources = []
    for style, is_source in plans:
        # crc32, not hash(): Python salts str hashes per process.
        rng = np.random.default_rng([seed, zlib.crc32(style.name.encode())])
        if is_source:
            num_users, num_items = int(rng.integers(300, 401)), int(rng.integers(150, 251))
        else:
            num_users, num_items = int(rng.integers(150, 301)), 150
        factor = scale if is_source else target_scale
        num_users = max(10, round(num_users * factor))
        num_items = max(2 * len(TOPICS), round(num_items * factor))
        item_topics, texts = _make_items(style, num_items, rng)
        events = _make_sequences(style.name, item_topics, num_users, rng)
        _write_domain(out / style.name, style.name, texts, events)
        sources.append(
            {
                "name": style.name,
                "format": "csv",
                "path": str(out / style.name),
                "interactions": "interactions.csv",
                "items": "items.csv",
                "columns": dict(_CSV_COLUMNS),
                "pretrain": is_source,
            }
        )
    _write_readme(out, seed, scale, sources)
    return sources


def _make_items(
    style: DomainStyle, num_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """Item topics ``(num_items,) int64`` (balanced over topics) and unique item texts."""
    topics = rng.permutation(np.arange(num_items) % len(TOPICS))
    texts: list[str] = []
    seen: set[str] = set()
    for topic in topics:
        words = TOPICS[_TOPIC_NAMES[topic]]
        for _ in range(100):
            w = rng.choice(len(words), size=int(rng.integers(2, 4)), replace=False)
            text = (
                f"{style.brands[rng.integers(len(style.brands))]} "
                f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} {words[w[0]]} "
                f"{style.kinds[rng.integers(len(style.kinds))]} with "
                + " and ".join(words[i] for i in w[1:])
            )
            if text not in seen:
                break
        seen.add(text)
        texts.append(text)
    return topics, texts


def _make_sequences(
    domain: str, item_topics: np.ndarray, num_users: int, rng: np.random.Generator
) -> list[tuple[str, int, int]]:
    """``(user_id, item_index, unix_seconds)`` rows following the shared topic transitions."""
    num_topics = len(TOPICS)
    by_topic = [np.flatnonzero(item_topics == t).tolist() for t in range(num_topics)]
    # Mild within-topic popularity (weight 1/sqrt(1 + rank)): a few bestsellers per topic.
    cumulative = [
        np.cumsum(1.0 / np.sqrt(1.0 + rng.permutation(len(items)))).tolist() for items in by_topic
    ]
    rows = []
    for u in range(num_users):
        user = f"{domain}-u{u:04d}"
        length = int(rng.integers(_MIN_LEN, _MAX_LEN + 1))
        moment = _EPOCH + int(rng.integers(0, 180 * 86_400))
        topic = int(rng.integers(num_topics))
        bought: set[int] = set()
        for _ in range(length):
            item = _pick_item(by_topic[topic], cumulative[topic], bought, rng)
            bought.add(item)
            rows.append((user, item, moment))
            moment += int(rng.integers(3_600, 14 * 86_400))
            draw = rng.random()
            if draw < P_FOLLOW:
                topic = (topic + 1) % num_topics  # SUCCESSOR in index form
            elif draw >= P_FOLLOW + P_STAY:
                topic = int(rng.integers(num_topics))
    return rows


def _pick_item(
    items: list[int], cumulative: list[float], bought: set[int], rng: np.random.Generator
) -> int:
    """An item of the topic by popularity, preferring one the user has not bought yet.

    Plain Python sampling: ``rng.choice(p=...)`` per draw made the generator 5x slower.
    """
    for _ in range(20):
        item = items[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]
        if item not in bought:
            return item
    fresh = [i for i in items if i not in bought]
    return fresh[0] if fresh else item


def _write_domain(
    directory: Path, domain: str, texts: list[str], events: list[tuple[str, int, int]]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "items.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["item_id", "text"])
        writer.writerows((_item_id(domain, i), text) for i, text in enumerate(texts))
    # A log in time order, as a shop would export it (ties keep user order: stable sort).
    events = sorted(events, key=lambda row: row[2])
    with open(directory / "interactions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["user_id", "item_id", "timestamp"])
        writer.writerows((user, _item_id(domain, item), ts) for user, item, ts in events)


def _item_id(domain: str, index: int) -> str:
    return f"{domain}-i{index:04d}"


def _write_readme(out: Path, seed: int, scale: float, sources: list[dict]) -> None:
    lines = [
        "# Synthetic data (generated, not real users or products)",
        "",
        f"Written by `sharding.synthetic.write_synthetic(seed={seed}, scale={scale})`;",
        "see that module's docstring for how users, items and texts are drawn.",
        "",
    ]
    lines += [
        f"- {s['name']}: {'source (pretrain)' if s['pretrain'] else 'target'}" for s in sources
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
