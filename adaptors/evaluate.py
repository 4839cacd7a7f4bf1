"""Full-ranking leave-one-out evaluation: every user's target against every item of the domain.

Shapes:
    U  users in a batch     N  items in the domain (indexes 1..N; 0 is padding)
    T  history positions    H  model hidden size

Ranking rule (ties broken at random, in expectation): for each target we count the items
scored *strictly higher* (``greater``) and the other items scored *exactly equal*
(``ties``). Under a uniformly random order of the tied items the target lands at each of
the 0-based positions ``greater .. greater + ties`` with probability ``1 / (ties + 1)``; its
expected rank is ``greater + 0.5 * ties``. Column 0 (padding) and the target itself never
count. With ``exclude_history`` the user's history items do not count either, except the
target when it repeats an earlier item. Ties are not rare in text-only mode: items with
identical text are the same item to the model (2.3% of Scientific test targets share their
text with another item), and they tie with the target by that fact, whatever rounding does
to their computed scores (:class:`TwinItems`); other items tie when their float scores are
equal. A model scoring everything equal ranks every target at (N-1)/2.

Metrics are the *exact expectations* under that random tie order, averaged over users
(one relevant item, so IDCG = 1; with no ties they are the paper's and RecBole's)::

    recall@k = P(position < k)           = clamp(k - greater, 0, ties + 1) / (ties + 1)
    ndcg@k   = E[[position < k] / log2(position + 2)]
             = sum_{p = greater}^{min(greater + ties, k - 1)} 1 / log2(p + 2) / (ties + 1)

Scaling: :func:`rank_split` scores users in blocks of ``batch_size`` against items in blocks
of ``item_block``, accumulating the two counts per block, so its working memory is
``O(batch_size * item_block)`` whatever N is (the catalogue's own ``(N+1, H)`` vectors
aside, computed once, also in blocks, and shared by the valid and test splits).

Cost: users are encoded in groups of equal history length (no padding) and the last
Transformer block runs at the last position only; one product per user block gives the
scores, the target's among them. Float rounding depends on the shapes a product runs on, so
a user's sequence vector can differ in its last bit from the one the padded, whole-sequence
encoder gives, and an item within that rounding of the target can change sides: on
Scientific (8,442 users) 5 users' counts moved by one, all ranked past 28, and
Recall/NDCG@10/50 stayed within 2e-7 (``tests/test_evaluate.py`` pins the ranking against a
dense reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pretrain.model import SequenceRecommender


@dataclass
class EvalSplit:
    """One leave-one-out split as tensors.

    histories: ``(U, T) int64`` item indexes, right-padded with 0; lengths: ``(U,) int64``
    (>= 1); targets: ``(U,) int64`` the held-out item of each user.
    """

    histories: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, max_seq_len: int) -> EvalSplit:
        """``frame``: a valid/test split (columns history, target); histories keep their
        last ``max_seq_len`` items (the model's limit may be shorter than the dataset's)."""
        histories = [np.asarray(h, dtype=np.int64)[-max_seq_len:] for h in frame["history"]]
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
        if len(histories) and int(lengths.min()) < 1:
            raise ValueError("every user needs at least one history item")
        padded = torch.zeros(
            len(histories), int(lengths.max()) if len(histories) else 1, dtype=torch.long
        )
        for row, history in enumerate(histories):
            padded[row, : len(history)] = torch.tensor(history)
        targets = torch.tensor(frame["target"].to_numpy(dtype=np.int64))
        return cls(padded, lengths, targets)

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class Ranks:
    """Where each user's target lands among the items.

    greater: ``(U,) int64`` items scored strictly higher than the target; ties: ``(U,) int64``
    other items scored exactly equal. ``expected`` is the rank under a random tie order.
    """

    greater: torch.Tensor
    ties: torch.Tensor

    @classmethod
    def untied(cls, ranks: torch.Tensor) -> Ranks:
        """Integer 0-based ranks ``(U,)`` with no ties."""
        ranks = ranks.long()
        return cls(ranks, torch.zeros_like(ranks))

    @property
    def expected(self) -> torch.Tensor:
        """``(U,) float64``: ``greater + 0.5 * ties``."""
        return self.greater.double() + 0.5 * self.ties.double()

    def __len__(self) -> int:
        return int(self.greater.shape[0])

    def __getitem__(self, index) -> Ranks:
        return Ranks(self.greater[index], self.ties[index])

    def cpu(self) -> Ranks:
        return Ranks(self.greater.cpu(), self.ties.cpu())


def rank_of_targets(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> Ranks:
    """Counts of items above and tied with each target, from one full score matrix.

    scores: ``(U, N+1)`` float, column 0 = padding (ignored); targets: ``(U,)`` long in 1..N;
    exclude: optional ``(U, N+1)`` bool, True = item takes no part in the ranking (the target
    itself always does). Used on small score matrices; :func:`rank_split` does the same in
    blocks.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_scores = scores[rows, targets].unsqueeze(1)
    counted = torch.ones_like(scores, dtype=torch.bool)
    counted[:, 0] = False
    counted[rows, targets] = False
    if exclude is not None:
        counted &= ~exclude
    greater = ((scores > target_scores) & counted).sum(dim=1)
    ties = ((scores == target_scores) & counted).sum(dim=1)
    return Ranks(greater, ties)


def metrics_from_ranks(ranks: Ranks | torch.Tensor, ks: list[int]) -> dict[str, float]:
    """``{"recall@k": .., "ndcg@k": ..}`` averaged over users, exact expectations under a
    random order of tied items (see the module docstring).

    ranks: :class:`Ranks`, or ``(U,)`` integer ranks without ties. An empty ``ranks`` gives
    zeros rather than NaNs.
    """
    if not isinstance(ranks, Ranks):
        ranks = Ranks.untied(ranks)
    greater, ties = ranks.greater.cpu().double(), ranks.ties.cpu().double()
    metrics: dict[str, float] = {}
    for k in ks:
        if not len(greater):
            metrics[f"recall@{k}"] = metrics[f"ndcg@{k}"] = 0.0
            continue
        places = ties + 1.0  # equally likely positions greater .. greater + ties
        recall = (k - greater).clamp(min=0.0, max=None).minimum(places) / places
        # gain_below[p] = sum of 1/log2(q+2) over positions q < p, for p = 0..k
        gain_below = F.pad(torch.cumsum(1.0 / torch.log2(torch.arange(k).double() + 2), 0), (1, 0))
        first = greater.clamp(max=k).long()
        stop = (greater + places).clamp(max=k).long()
        ndcg = (gain_below[stop] - gain_below[first]) / places
        metrics[f"recall@{k}"] = float(recall.mean())
        metrics[f"ndcg@{k}"] = float(ndcg.mean())
    return metrics


def item_popularity(train_sequences: list[np.ndarray], num_items: int) -> np.ndarray:
    """Training-set interaction count of every item: ``(N+1,) int64``, row 0 = 0."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for sequence in train_sequences:
        np.add.at(counts, np.asarray(sequence, dtype=np.int64), 1)
    counts[0] = 0
    return counts


def popularity_groups(counts: np.ndarray, num_groups: int) -> np.ndarray:
    """Split items 1..N into ``num_groups`` groups of (nearly) equal item count by training
    frequency, group 0 the least popular (the paper's long-tail analysis).

    counts: ``(N+1,)`` from :func:`item_popularity` -> ``(N+1,) int64`` group per item; item 0
    gets -1. Equal-frequency ties are split by item index, so groups never collapse.
    """
    order = np.lexsort((np.arange(1, len(counts)), counts[1:])) + 1  # least popular first
    groups = np.full(len(counts), -1, dtype=np.int64)
    for group, members in enumerate(np.array_split(order, num_groups)):
        groups[members] = group
    return groups


def metrics_by_group(
    ranks: Ranks | torch.Tensor,
    targets: torch.Tensor,
    groups: np.ndarray,
    counts: np.ndarray,
    k: int = 10,
) -> list[dict]:
    """Per popularity group of the target item: users, recall@k, ndcg@k and the group's
    training-frequency range. ranks: :class:`Ranks` (or untied ``(U,)``), targets: ``(U,)``;
    groups, counts: ``(N+1,)``."""
    if not isinstance(ranks, Ranks):
        ranks = Ranks.untied(ranks)
    target_group = torch.as_tensor(groups)[targets.cpu()]
    report = []
    for group in range(int(groups.max()) + 1):
        members = np.flatnonzero(groups == group)
        in_group = target_group == group
        metrics = metrics_from_ranks(ranks.cpu()[in_group], [k])
        report.append(
            {
                "group": group,
                "items": int(len(members)),
                "min_count": int(counts[members].min()) if len(members) else 0,
                "max_count": int(counts[members].max()) if len(members) else 0,
                "count": int(in_group.sum()),
                f"recall@{k}": metrics[f"recall@{k}"],
                f"ndcg@{k}": metrics[f"ndcg@{k}"],
            }
        )
    return report


ADAPTOR_BLOCK = 4096  # items per adaptor call in evaluation: ~40 MB of expert outputs


@torch.no_grad()
def catalogue_vectors_in_blocks(
    model: SequenceRecommender, text_table: torch.Tensor, item_block: int
) -> torch.Tensor:
    """:meth:`SequenceRecommender.catalogue_vectors` without gradients, ``item_block`` items at
    a time: text_table ``(N+1, D)`` -> ``(N+1, H)``, row 0 zeros. The adaptor's per-expert
    intermediates are ``(item_block, G, H)`` instead of ``(N, G, H)``.
    """
    n = text_table.shape[0] - 1
    out = text_table.new_zeros(n + 1, model.cfg.hidden_size)
    for start in range(1, n + 1, item_block):
        stop = min(start + item_block, n + 1)
        ids = torch.arange(start, stop, device=text_table.device)
        out[start:stop] = model.item_vectors(text_table[start:stop], ids)
    return out


@dataclass
class TwinItems:
    """Items a model cannot tell apart: for a text-only model, items whose text vectors are
    bitwise equal. ``group``: ``(N+1,) int64`` the first such item's index (row 0: 0);
    ``order``: ``(N+1,) int64`` item indexes sorted by group, ``sorted_group`` their groups.

    Matrix products may round the same dot product differently at different places (a
    one-row product does), so twins must be recognised by their inputs, not their scores.
    """

    group: torch.Tensor
    order: torch.Tensor
    sorted_group: torch.Tensor

    @classmethod
    def of(cls, model: SequenceRecommender, text_table: torch.Tensor) -> TwinItems:
        """text_table: ``(N+1, D)``; a model that reads item IDs has no twins."""
        n = text_table.shape[0] - 1
        group = torch.arange(n + 1)
        if n and not model.reads_item_ids:
            group[1:] = _first_equal_row(text_table[1:]) + 1
        sorted_group, order = torch.sort(group, stable=True)
        return cls(group, order, sorted_group)

    def pairs(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """targets: ``(U,)`` -> ``(rows, twins)``, both ``(P,) int64``: every other item
        ``twins[p]`` that is a twin of ``targets[rows[p]]``."""
        groups = self.group[targets.cpu()]
        low = torch.searchsorted(self.sorted_group, groups, right=False)
        sizes = torch.searchsorted(self.sorted_group, groups, right=True) - low
        rows = torch.repeat_interleave(torch.arange(len(targets)), sizes)
        starts = torch.repeat_interleave(low, sizes)
        offsets = torch.arange(len(rows)) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
        twins = self.order[starts + offsets]
        other = twins != targets.cpu()[rows]
        return rows[other].to(targets.device), twins[other].to(targets.device)


def _first_equal_row(rows: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """rows: ``(N, D)`` float32 -> ``(N,) int64``: index of the first row bitwise equal to each.

    Rows are grouped by a 64-bit hash of their bits (``O(N)`` memory, no sort of the rows),
    then each row is compared bit for bit with its group's first row; one whose hash collides
    with a different row's (odds ~N^2 / 2^64) is left on its own.
    """
    bits = np.ascontiguousarray(rows.detach().cpu().numpy()).view(np.int32)
    n, d = bits.shape
    multipliers = np.random.default_rng(0).integers(1, 2**63, size=d, dtype=np.uint64) | 1
    hashes = np.empty(n, dtype=np.uint64)
    for start in range(0, n, chunk):
        block = bits[start : start + chunk].astype(np.int64).view(np.uint64)
        hashes[start : start + chunk] = (block * multipliers).sum(axis=1)  # wraps mod 2^64
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    first = first[inverse.ravel()]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        same = (bits[start:stop] == bits[first[start:stop]]).all(axis=1)
        first[start:stop] = np.where(same, first[start:stop], np.arange(start, stop))
    return torch.from_numpy(first.astype(np.int64))


def count_ranks_in_blocks(
    model: SequenceRecommender,
    queries: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    *,
    item_block: int,
    twins: TwinItems | None = None,
    histories: torch.Tensor | None = None,
) -> Ranks:
    """Rank each query's target among items 1..N, ``item_block`` items at a time.

    queries: ``(U, H)`` sequence vectors; items: ``(N+1, H)`` from
    :func:`catalogue_vectors_in_blocks`; targets: ``(U,)`` long in 1..N; twins: items that
    tie with the target whatever their computed scores (see :class:`TwinItems`); histories:
    optional ``(U, T)`` long, items excluded from the ranking (0 = padding; the target is
    never excluded). Working memory ``O(U * item_block)``.

    The target's score is read from the same product as the items it is compared with (one
    item block), so an item with the target's exact dot product ties with it; over several
    item blocks it comes from a small product per 64 users, whose rows round as the large
    one's do (both keep MKL's many-row kernel).
    """
    u, n = len(targets), items.shape[0] - 1
    device = queries.device
    rows = torch.arange(u, device=device)
    target_scores = None
    if n > item_block:
        target_scores = torch.cat(
            [
                model.score(queries[c], items[targets[c]], temperature).diagonal()
                for c in rows.split(64)
            ]
        ).unsqueeze(1)  # (U, 1)
    twin_rows, twin_items = twins.pairs(targets) if twins is not None else (rows[:0], rows[:0])
    greater = torch.zeros(u, dtype=torch.long, device=device)
    ties = torch.zeros(u, dtype=torch.long, device=device)
    for start in range(1, n + 1, item_block):
        stop = min(start + item_block, n + 1)
        block = model.score(queries, items[start:stop], temperature)  # (U, stop - start)
        if target_scores is None:  # one block: every target is in it
            target_scores = block[rows, targets - start].unsqueeze(1)  # (U, 1)
        inside = (targets >= start) & (targets < stop)
        block[rows[inside], targets[inside] - start] = float("-inf")  # the target itself
        if histories is not None:
            seen = (histories >= start) & (histories < stop) & (histories != targets[:, None])
            row, col = seen.nonzero(as_tuple=True)
            block[row, histories[row, col] - start] = float("-inf")
        # int32 sums: a bool sum to int64 first copies the block into an int64 tensor
        greater += torch.gt(block, target_scores).sum(dim=1, dtype=torch.int32)
        ties += torch.eq(block, target_scores).sum(dim=1, dtype=torch.int32)
        # Twins counted above by their rounded scores are moved to the ties.
        here = (twin_items >= start) & (twin_items < stop)
        if bool(here.any()):
            row = twin_rows[here]
            score = block[row, twin_items[here] - start]
            target = target_scores[row, 0]
            counted = score > float("-inf")  # not excluded
            greater.index_add_(0, row, -(counted & (score > target)).long())
            ties.index_add_(0, row, (counted & (score != target)).long())
    return Ranks(greater, ties)


@dataclass
class Catalogue:
    """What ranking needs of a domain's items, computed once per model and text table:
    vectors ``(N+1, H)`` (row 0 zeros) and the items the model cannot tell apart."""

    vectors: torch.Tensor
    twins: TwinItems

    @classmethod
    def of(cls, model: SequenceRecommender, text_table: torch.Tensor, item_block: int) -> Catalogue:
        """text_table: ``(N+1, D)``; the adaptor runs ``min(item_block, ADAPTOR_BLOCK)`` items
        at a time. The model must already be in eval mode."""
        vectors = catalogue_vectors_in_blocks(model, text_table, min(item_block, ADAPTOR_BLOCK))
        return cls(vectors, TwinItems.of(model, text_table))


def length_buckets(lengths: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """lengths: ``(U,) int64`` -> user indexes grouped by equal history length (at most
    ``batch_size`` to a group, shortest lengths first): the encoder then runs over no padding.
    """
    order = torch.argsort(lengths, stable=True)
    sizes = torch.unique_consecutive(lengths[order], return_counts=True)[1]
    return [part for group in order.split(sizes.tolist()) for part in group.split(batch_size)]


def user_blocks(count: int, batch_size: int, least: int = 16) -> list[slice]:
    """``count`` rows in slices of ``batch_size``; a short last slice (< ``least`` rows)
    joins the one before, so every scoring product keeps MKL's many-row kernel, whose rows
    round the same whatever else is in the product."""
    if count <= 0:
        return []
    starts = list(range(0, count, max(batch_size, 1)))
    if len(starts) > 1 and count - starts[-1] < least:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [count], strict=True)]


def rank_split(
    model: SequenceRecommender,
    split: EvalSplit,
    text_table: torch.Tensor,
    *,
    temperature: float,
    exclude_history: bool = False,
    batch_size: int = 1024,
    item_block: int = 16384,
    catalogue: Catalogue | None = None,
) -> Ranks:
    """Rank every user's target against all N items; returns :class:`Ranks` on the CPU.

    text_table: ``(N+1, D)`` float32 on the model's device; catalogue: its
    :class:`Catalogue` if already computed for this model (else computed here). Users are
    encoded in groups of equal history length (no padding, the last Transformer block at the
    last position only: :meth:`SequenceRecommender.encode_last`), then scored ``batch_size``
    at a time against ``item_block`` items at a time (:func:`count_ranks_in_blocks`). The
    model is put in eval mode (no dropout, no gate noise) and left there.
    """
    model.eval()
    with torch.inference_mode():
        if catalogue is None:
            catalogue = Catalogue.of(model, text_table, item_block)
        items = catalogue.vectors
        device = items.device
        # 1. every user's sequence vector, users ordered by history length
        buckets = length_buckets(split.lengths, batch_size)
        order = torch.cat(buckets) if buckets else split.lengths[:0]
        queries = items.new_empty(len(split), items.shape[1])  # (U, H) in `order`
        done = 0
        for bucket in buckets:
            length = int(split.lengths[bucket[0]])
            histories = split.histories[bucket, :length].to(device)
            lengths = split.lengths[bucket].to(device)
            queries[done : done + len(bucket)] = model.encode_last(histories, lengths, items)
            done += len(bucket)
        # 2. rank each target against every item, batch_size users at a time
        targets = split.targets[order].to(device)
        greater = torch.zeros(len(split), dtype=torch.long)
        ties = torch.zeros(len(split), dtype=torch.long)
        for rows in user_blocks(len(split), batch_size):
            users = order[rows]
            histories = None
            if exclude_history:
                histories = split.histories[users, : int(split.lengths[users].max())].to(device)
            ranks = count_ranks_in_blocks(
                model,
                queries[rows],
                items,
                targets[rows],
                temperature,
                item_block=item_block,
                twins=catalogue.twins,
                histories=histories,
            )
            greater[users], ties[users] = ranks.greater.cpu(), ranks.ties.cpu()
    return Ranks(greater, ties)


@dataclass
class EvalData:
    """A domain's text vectors, valid and test splits, and training popularity."""

    text_table: torch.Tensor  # (N+1, D) float32 on the scoring device, row 0 = padding
    valid: EvalSplit
    test: EvalSplit
    popularity: np.ndarray  # (N+1,) int64 training interactions per item

    @property
    def num_items(self) -> int:
        return self.text_table.shape[0] - 1


def load_eval_data(dataset, domain: str, max_seq_len: int, device: torch.device) -> EvalData:
    """``dataset``: a :class:`sharding.dataset.Dataset`; histories cut to ``max_seq_len``."""
    train = list(dataset.split(domain, "train")["items"])
    return EvalData(
        text_table=torch.from_numpy(np.array(dataset.embeddings(domain), dtype=np.float32)).to(
            device
        ),
        valid=EvalSplit.from_frame(dataset.split(domain, "valid"), max_seq_len),
        test=EvalSplit.from_frame(dataset.split(domain, "test"), max_seq_len),
        popularity=item_popularity(train, dataset.domain(domain).num_items),
    )


def full_report(
    model: SequenceRecommender,
    data: EvalData,
    *,
    temperature: float,
    ks: list[int],
    exclude_history: bool = False,
    batch_size: int = 1024,
    item_block: int = 16384,
    groups: int = 5,
) -> dict:
    """``{"valid": metrics, "test": metrics, "test_by_popularity": [...]}``; the popularity
    breakdown uses the first cut-off in ``ks``."""
    options = {
        "temperature": temperature,
        "exclude_history": exclude_history,
        "batch_size": batch_size,
        "item_block": item_block,
    }
    model.eval()
    with torch.inference_mode():
        options["catalogue"] = Catalogue.of(model, data.text_table, item_block)
    valid_ranks = rank_split(model, data.valid, data.text_table, **options)
    test_ranks = rank_split(model, data.test, data.text_table, **options)
    return {
        "valid": metrics_from_ranks(valid_ranks, ks),
        "test": metrics_from_ranks(test_ranks, ks),
        "test_by_popularity": metrics_by_group(
            test_ranks,
            data.test.targets,
            popularity_groups(data.popularity, groups),
            data.popularity,
            k=ks[0],
        ),
    }
