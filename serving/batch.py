"""Recommendations for many users at once (``unisrec recommend-batch``), on Ray Data.

    unisrec recommend-batch --tenant shop --users users.parquet --out recs.parquet -k 50
    unisrec recommend-batch --tenant shop --all-users --out recs.parquet   # data from lineage
    unisrec recommend-batch --tenant shop --all-users --data-dir runs/data --out recs.parquet

The users stream through a Ray Data actor pool. Each actor loads the tenant's adaptor version
once from the registry, as the endpoint does, which runs the adaptor over the catalogue once;
then it ranks batches of histories with the endpoint's top-k (``adaptors/topk.py``). The
driver appends each ranked batch to one Parquet file as it arrives, so memory holds a few
batches whatever the number of users.

Input: ``--users`` is Parquet with ``user`` and ``history`` (a list of item keys, oldest
first). ``--all-users`` takes every user of the dataset domain the tenant was fine-tuned on
(from ``--data-dir``, else the directory the version's fine-tune run read: its ``data.dir``),
each with the whole sequence the dataset holds (training items, then the validation and test
targets): the history the endpoint would be sent for that user now. An item not in the
catalogue is left out of its history and counted; a user with no known item left is counted
and gets no rows.

Output (format in docs/data-format.md, "Batch recommendations"): ``RECS.parquet`` with
columns user, rank, item, score, whose schema metadata holds the run's record under
``unisrec.recommend_batch`` (tenant, version, alias, MLflow run id, counts), and the same
record beside it as ``RECS.parquet.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unisrec import tags as T
from unisrec.errors import ConfigError, DataError

FORMAT_VERSION = 1
METADATA_KEY = "unisrec.recommend_batch"  # in the output's Parquet schema metadata
RECORD_SUFFIX = ".json"  # the record beside the output: RECS.parquet.json
UNKNOWN_EXAMPLES = 10  # unknown item keys quoted in the record
USERS_SCHEMA = pa.schema([("user", pa.string()), ("history", pa.list_(pa.string()))])
OUTPUT_SCHEMA = pa.schema(
    [("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()), ("score", pa.float32())]
)


@dataclass
class BatchConfig:
    tenant: str
    out: str  # RECS.parquet; its record goes beside it as RECS.parquet.json
    users: str = ""  # Parquet file or directory with user, history ("" with all_users)
    all_users: bool = False  # the tenant's own users, from data_dir
    data_dir: str = ""  # with all_users: the tenant's dataset directory ("" = from lineage)
    version: str = ""  # "" = the version ``alias`` points at
    alias: str = T.PRODUCTION
    k: int = 50  # rows per user (fewer when the catalogue runs out)
    exclude_history: bool = True  # as the endpoint: no item of the history comes back
    batch_size: int = 256  # users an actor ranks at once: scores are (batch_size, C) float32
    actors: int = 2  # at most this many model copies, one per actor (the pool starts with one)
    torch_threads: int = 1  # per actor
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    progress: bool = True

    def validate(self) -> None:
        T.validate_tenant_name(self.tenant)
        if bool(self.users) == self.all_users:
            raise ConfigError("give one of --users USERS.parquet and --all-users")
        if not self.out:
            raise ConfigError("--out: name the Parquet file to write")
        for name, value in (
            ("-k", self.k),
            ("--batch-size", self.batch_size),
            ("--actors", self.actors),
            ("--torch-threads", self.torch_threads),
        ):
            if value < 1:
                raise ConfigError(f"{name}: expected at least 1, got {value}")


@dataclass(frozen=True)
class AdaptorVersion:
    """The registered adaptor version a batch ranks with, and its lineage."""

    name: str
    version: str
    alias: str  # the alias it was reached by ("" for --version)
    run_id: str  # the fine-tune's MLflow run
    domain: str
    data_digest: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve_version(tenant: str, version: str = "", alias: str = T.PRODUCTION) -> AdaptorVersion:
    """The tenant's adaptor ``version``, or the one ``alias`` points at now (pinned for the
    whole batch, so a promotion meanwhile does not mix two versions); ConfigError if none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from serving.lifecycle import alias_version

    name = T.adaptor_model_name(tenant)
    if not version:
        version = alias_version(name, alias)
        if version is None:
            raise ConfigError(
                f"--alias: {name} has no {alias!r} version; promote one "
                f"(unisrec promote --tenant {tenant}) or name --version"
            )
    else:
        alias = ""
    try:
        found = MlflowClient().get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ConfigError(f"--version: {name} has no version {version}") from None
    tags = found.tags
    return AdaptorVersion(
        name=name,
        version=str(found.version),
        alias=alias,
        run_id=found.run_id or "",
        domain=tags.get(T.DOMAIN, ""),
        data_digest=tags.get(T.DATA_DIGEST, ""),
    )


# --- input ---------------------------------------------------------------------------------


def lineage_data_dir(model: AdaptorVersion) -> str:
    """The dataset directory ``model`` was fine-tuned on, from its fine-tune run's
    ``data.dir``; ConfigError asking for ``--data-dir`` when the run names none or the
    directory no longer exists."""
    from serving.lifecycle import run_data_dir

    where = f"{model.name} version {model.version}"
    found = run_data_dir(model.run_id) if model.run_id else None
    if not found:
        raise ConfigError(
            f"--all-users: the fine-tune run of {where} names no dataset directory; "
            "give --data-dir, the dataset directory it was fine-tuned on"
        )
    if not Path(found).is_dir():
        raise ConfigError(
            f"--all-users: {where} was fine-tuned on {found}, which no longer exists; "
            "give --data-dir, where that dataset is now"
        )
    return found


def check_users_file(path: Path) -> int:
    """The number of users in a ``--users`` Parquet file (or directory of them); DataError
    naming the file and the field when it is missing or has the wrong columns."""
    import pyarrow.dataset as pads

    if not path.exists():
        raise DataError("no such file", file=path)
    try:
        data = pads.dataset(path, format="parquet")
        schema = data.schema
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a Parquet file ({err})", file=path) from None
    missing = [c for c in USERS_SCHEMA.names if c not in schema.names]
    if missing:
        raise DataError(
            f"missing column(s) {missing}; expected user and history (a list of item keys, "
            "oldest first)",
            file=path,
            field=missing[0],
        )
    history = schema.field("history").type
    if not (pa.types.is_list(history) or pa.types.is_large_list(history)) or not (
        pa.types.is_string(history.value_type) or pa.types.is_large_string(history.value_type)
    ):
        raise DataError(
            f"expected a list of item keys (strings), got {history}", file=path, field="history"
        )
    return data.count_rows()


def write_domain_users(
    data_dir: Path, domain: str, data_digest: str, path: Path, chunk: int = 65536
) -> int:
    """Every user of ``domain`` with their whole sequence of item keys (training items, the
    validation target, the test target), written to ``path`` as a ``--users`` file, ``chunk``
    users at a time. ConfigError if the dataset is not the one the adaptor was fine-tuned on
    (``data_digest``). Returns the number of users."""
    from sharding.dataset import Dataset

    dataset = Dataset(data_dir)
    if data_digest and dataset.digest != data_digest:
        raise ConfigError(
            f"--data-dir: {data_dir} holds dataset {dataset.digest[:12]}, but the adaptor was "
            f"fine-tuned on {data_digest[:12]}; point --data-dir at that one"
        )
    dataset.domain(domain)  # DataError naming the domains it has
    keys = np.array([None, *dataset.items(domain).sort_values("index")["key"]], dtype=object)
    files = {
        name: dataset.root / record["path"]
        for name, record in dataset.manifest["domains"][domain]["files"].items()
    }
    columns = {"users": ["index", "key"], "train": ["user", "items"]}
    columns |= {"valid": ["user", "target"], "test": ["user", "target"]}
    rows = {name: pq.ParquetFile(files[name]).metadata.num_rows for name in columns}
    if len(set(rows.values())) != 1:
        raise DataError(f"users, train, valid and test differ in rows: {rows}", file=data_dir)
    parts = [_chunks(files[name], cols, chunk) for name, cols in columns.items()]
    with pq.ParquetWriter(path, USERS_SCHEMA) as writer:
        for users, train, valid, test in zip(*parts, strict=True):
            index = users.column("index").to_numpy()
            for part, name in ((train, "train"), (valid, "valid"), (test, "test")):
                if not np.array_equal(part.column("user").to_numpy(), index):
                    raise DataError("rows not in the order of users.parquet", file=files[name])
            last_two = np.stack(
                [valid.column("target").to_numpy(), test.column("target").to_numpy()], axis=1
            )
            histories = [
                keys[np.concatenate([np.asarray(items, dtype=np.int64), tail])].tolist()
                for items, tail in zip(train.column("items").to_pylist(), last_two, strict=True)
            ]
            writer.write_table(
                pa.table(
                    [
                        users.column("key").cast(pa.string()),
                        pa.array(histories, pa.list_(pa.string())),
                    ],
                    schema=USERS_SCHEMA,
                )
            )
    return next(iter(rows.values()))


def _chunks(path: Path, columns: list[str], rows: int) -> Iterator[pa.Table]:
    """``columns`` of a Parquet file as tables of exactly ``rows`` rows (the last one may be
    shorter), so several files with the same rows can be read side by side."""
    pending: pa.Table | None = None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns):
        table = pa.Table.from_batches([batch])
        if pending is not None:
            table = pa.concat_tables([pending, table])
        while table.num_rows >= rows:
            yield table.slice(0, rows)
            table = table.slice(rows)
        pending = table
    if pending is not None and pending.num_rows:
        yield pending


# --- ranking (on the actors) ---------------------------------------------------------------


class TenantRanker:
    """Ray Data callable class: ``user``, ``history`` batches -> one row per user: ``user``,
    ``items`` and ``scores`` (best first; empty when no history item is known), ``known``
    (history items in the catalogue) and ``unknown`` (the other history keys)."""

    def __init__(
        self,
        uri: str,
        tracking_uri: str,
        k: int,
        exclude_history: bool,
        torch_threads: int,
        credentials=None,  # unisrec.access.Credentials: the driver's tracking user
    ):
        import torch

        from adaptors.publish import load_adaptor
        from unisrec.access import use_credentials
        from unisrec.tracking import configure_mlflow

        torch.set_num_threads(torch_threads)
        use_credentials(credentials)
        configure_mlflow(tracking_uri)
        self.recommender = load_adaptor(uri)  # its catalogue's item vectors: computed once
        self.k = k
        self.exclude_history = exclude_history

    def __call__(self, batch: pa.Table) -> pa.Table:
        from adaptors.topk import top_k

        catalogue = self.recommender.catalogue
        known, unknown = [], []
        for history in batch.column("history").to_pylist():
            known.append([key for key in history or () if key in catalogue])
            unknown.append([key for key in history or () if key not in catalogue])
        ranked = [row for row, keys in enumerate(known) if keys]
        items: list[list[str]] = [[] for _ in known]
        scores: list[list[float]] = [[] for _ in known]
        if ranked:
            recs = top_k(
                self.recommender.model,
                self.recommender.spec,
                catalogue,
                [known[row] for row in ranked],
                k=self.k,
                exclude_history=self.exclude_history,
                item_vectors=self.recommender.item_vectors,
            )
            for row, best in zip(ranked, recs, strict=True):
                items[row] = [key for key, _ in best]
                scores[row] = [score for _, score in best]
        return pa.table(
            {
                "user": batch.column("user").cast(pa.string()),
                "items": pa.array(items, pa.list_(pa.string())),
                "scores": pa.array(scores, pa.list_(pa.float32())),
                "known": pa.array([len(keys) for keys in known], pa.int32()),
                "unknown": pa.array(unknown, pa.list_(pa.string())),
            }
        )


def output_rows(ranked: pa.Table) -> pa.Table:
    """One :class:`TenantRanker` batch as output rows: user, rank (1 = best), item, score."""
    items = ranked.column("items").combine_chunks()
    scores = ranked.column("scores").combine_chunks()
    lengths = pc.list_value_length(items).fill_null(0).to_numpy()
    starts = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(lengths)), lengths)
    rank = np.arange(int(lengths.sum())) - np.repeat(starts, lengths) + 1
    return pa.table(
        [
            ranked.column("user").take(pa.array(owner, pa.int64())),
            pa.array(rank, pa.int32()),
            items.flatten(),
            scores.flatten(),
        ],
        schema=OUTPUT_SCHEMA,
    )


# --- the job -------------------------------------------------------------------------------


def recommend_batch(cfg: BatchConfig) -> dict:
    """Rank every input user with the tenant's adaptor into ``cfg.out`` (and its record
    beside it); returns the record. Uses the Ray this process has, else joins
    ``$RAY_ADDRESS``, else starts a loopback-only local Ray for the call."""
    from unisrec.runtime import ensure_ray
    from unisrec.tracking import configure_mlflow

    cfg.validate()
    tracking_uri = configure_mlflow(cfg.tracking_uri)
    model = resolve_version(cfg.tenant, cfg.version, cfg.alias)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.users.parquet")  # --all-users input, removed after
    partial = out.with_name(f".{out.name}.partial")  # renamed to out when complete
    record = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tenant": cfg.tenant,
        "model": model.name,
        "version": model.version,
        "alias": model.alias or None,
        "run_id": model.run_id,
        "domain": model.domain,
        "data_digest": model.data_digest,
        "k": cfg.k,
        "exclude_history": cfg.exclude_history,
        "input": {"users": str(cfg.users) or None, "all_users": cfg.all_users},
    }
    try:
        if cfg.all_users:
            data_dir = cfg.data_dir or lineage_data_dir(model)
            record["input"]["data_dir"] = str(data_dir)
            total = write_domain_users(Path(data_dir), model.domain, model.data_digest, staged)
            users = staged
        else:
            users = Path(cfg.users)
            total = check_users_file(users)
        started = ensure_ray()
        import ray

        try:
            # Without a stored Arrow schema, readers build the schema from the Parquet footer,
            # whose metadata gets the record (counts and all) only once every row is written.
            with pq.ParquetWriter(partial, OUTPUT_SCHEMA, store_schema=False) as writer:
                record |= _rank(cfg, model, tracking_uri, users, total, writer)
                writer.add_key_value_metadata({METADATA_KEY: json.dumps(record)})
        finally:
            if started:
                ray.shutdown()
        partial.replace(out)
    finally:
        staged.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    sidecar = out.with_name(out.name + RECORD_SUFFIX)
    sidecar.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _rank(
    cfg: BatchConfig,
    model: AdaptorVersion,
    tracking_uri: str,
    users: Path,
    total: int,
    writer: pq.ParquetWriter,
) -> dict:
    """Stream ``users`` through the actor pool into ``writer``; returns the counts."""
    import logging

    import ray
    from tqdm import tqdm

    from unisrec.access import Credentials
    from unisrec.runtime import verbose

    if not verbose():  # our bar counts users; Ray Data's own bars and logs with -v
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    # Reading is light; asking no CPU for it, it never waits behind actors that hold them all.
    read = ray.data.read_parquet(str(users), columns=USERS_SCHEMA.names, num_cpus=0)
    ranked = read.map_batches(
        TenantRanker,
        fn_constructor_kwargs={
            "uri": model.uri,
            "tracking_uri": tracking_uri,
            "k": cfg.k,
            "exclude_history": cfg.exclude_history,
            "torch_threads": cfg.torch_threads,
            # Actors load the adaptor as this process's tracking user, in a Ray it did not
            # start too: an argument (shown by name only), never env_vars of a runtime_env.
            "credentials": Credentials.current(),
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        # One actor at first, more while users queue: actors holding every CPU from the start
        # would leave none for listing the input files.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_cpus=cfg.torch_threads,
    )
    counts = {"read": 0, "recommended": 0, "skipped_no_known_item": 0, "with_unknown_items": 0}
    unknown_total, examples, rows = 0, [], 0
    label = f"{model.name} v{model.version}"
    with tqdm(total=total, unit="user", desc=label, disable=not cfg.progress) as bar:
        for batch in ranked.iter_batches(batch_size=None, batch_format="pyarrow"):
            table = output_rows(batch)
            writer.write_table(table)
            rows += table.num_rows
            known = batch.column("known").to_numpy()
            unknown = batch.column("unknown").to_pylist()
            counts["read"] += batch.num_rows
            counts["recommended"] += int((known > 0).sum())
            counts["skipped_no_known_item"] += int((known == 0).sum())
            counts["with_unknown_items"] += sum(1 for keys in unknown if keys)
            unknown_total += sum(len(keys) for keys in unknown)
            for key in (key for keys in unknown for key in keys):
                if len(examples) < UNKNOWN_EXAMPLES and key not in examples:
                    examples.append(key)
            bar.update(batch.num_rows)
    return {
        "rows": rows,
        "users": counts,
        "unknown_items": {"skipped": unknown_total, "examples": examples},
    }


def summary(record: dict) -> str:
    """What a batch did, in one paragraph for the terminal."""
    users, unknown = record["users"], record["unknown_items"]
    lines = [
        f"{record['model']} version {record['version']}: {users['recommended']} of "
        f"{users['read']} users ranked, {record['rows']} rows (k={record['k']})"
    ]
    if users["skipped_no_known_item"]:
        lines.append(f"  skipped {users['skipped_no_known_item']} users with no known item")
    if unknown["skipped"]:
        lines.append(
            f"  left out {unknown['skipped']} unknown item(s) from {users['with_unknown_items']} "
            f"users' histories, e.g. {unknown['examples'][:3]}"
        )
    return "\n".join(lines)
