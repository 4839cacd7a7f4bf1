"""Read a dataset directory written by ``unisrec shard`` (layout in docs/data-format.md).

ds = Dataset("runs/data")
ds.domains["scientific"].num_items          # 4385
ds.embeddings("scientific")                 # (num_items + 1, D) float32, memory-mapped
ds.split("scientific", "test")              # user, history, target (local indexes)
ds.shard_specs()                            # pretraining shards with sample counts
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from unisrec.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DomainInfo:
    name: str
    domain_id: int
    num_users: int
    num_items: int
    num_interactions: int
    offset: int  # global index of local item i is offset + i
    pretrain: bool


class Dataset:
    """A validated, read-only view of a dataset directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise DataError(
                "no manifest: not a dataset directory, or its shard job did not finish", file=path
            )
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON: {err}", file=path, line=err.lineno) from err
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"format version {version!r}, this reader reads {FORMAT_VERSION}",
                file=path,
                field="format_version",
            )
        self.domains = {
            name: DomainInfo(
                name=name,
                domain_id=d["domain_id"],
                num_users=d["num_users"],
                num_items=d["num_items"],
                num_interactions=d["num_interactions"],
                offset=d["offset"],
                pretrain=d["pretrain"],
            )
            for name, d in self.manifest["domains"].items()
        }

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def encoder_name(self) -> str:
        return self.manifest["encoder"]["name"]

    @property
    def encoder_dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    @property
    def num_global_items(self) -> int:
        """Items over all domains; global indexes run 1..num_global_items (0 = padding)."""
        return sum(d.num_items for d in self.domains.values())

    def domain(self, name: str) -> DomainInfo:
        if name not in self.domains:
            raise DataError(
                f"no domain {name!r}; it has {sorted(self.domains)}", file=self.root / MANIFEST
            )
        return self.domains[name]

    def items(self, name: str) -> pd.DataFrame:
        """Columns ``index`` (local, 1-based), ``global_index``, ``key``, ``text``."""
        return pd.read_parquet(self._file(name, "items"))

    def users(self, name: str) -> pd.DataFrame:
        """Columns ``index`` (0-based), ``key``."""
        return pd.read_parquet(self._file(name, "users"))

    def split(self, name: str, part: str) -> pd.DataFrame:
        """``train``: user, items (whole training sequence); ``valid``/``test``: user, history, target."""
        if part not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {part!r}")
        return pd.read_parquet(self._file(name, part))

    def embeddings(self, name: str, worddrop: bool = False) -> np.ndarray:
        """``(num_items + 1, D) float32`` text vectors by local index, row 0 all zeros.

        ``worddrop=True`` gives the word-drop variant (pretraining domains only; other
        domains fall back to the plain vectors).
        """
        key = "embeddings_worddrop" if worddrop else "embeddings"
        files = self.manifest["domains"][self.domain(name).name]["files"]
        if key not in files:
            key = "embeddings"
        return np.load(self.root / files[key]["path"], mmap_mode="r")

    def global_embeddings(self, worddrop: bool = False) -> np.ndarray:
        """``(1 + num_global_items, D) float32`` over all domains, indexed by global index."""
        table = np.zeros((1 + self.num_global_items, self.encoder_dim), dtype=np.float32)
        for info in self.domains.values():
            table[info.offset + 1 : info.offset + 1 + info.num_items] = self.embeddings(
                info.name, worddrop
            )[1:]
        return table

    def shard_specs(self, base: str | None = None, domains: list[str] | None = None):
        """Pretraining shards as :class:`sharding.stream.ShardSpec`, under ``base`` (default:
        this directory's ``shards/``; a URL or ``pipe:`` prefix reads them from elsewhere).
        ``domains``: read only these pretraining domains' samples (None or [] = all)."""
        from sharding.pretrain_shards import SAMPLE_VERSION
        from sharding.stream import ShardSpec

        shards = self.manifest.get("shards")
        if not shards or not shards["files"]:
            raise DataError(
                "no pretraining shards (no domain has pretrain: true)", file=self.root / MANIFEST
            )
        version = shards.get("sample_version", 1)
        if version != SAMPLE_VERSION:
            raise DataError(
                f"pretraining shard samples are version {version}, this reader reads "
                f"{SAMPLE_VERSION} (windows with first_query); run `unisrec shard` again",
                file=self.root / MANIFEST,
                field="shards.sample_version",
            )
        prefix = base.rstrip("/") if base else str(self.root / shards["dir"])
        if not domains:
            return [ShardSpec(f"{prefix}/{f['name']}", f["num_samples"]) for f in shards["files"]]
        unknown = sorted(set(domains) - set(shards["domains"]))
        if unknown:
            raise DataError(
                f"data.domains: {unknown} are not pretraining domains of this dataset "
                f"(it has {shards['domains']})",
                file=self.root / MANIFEST,
                field="shards.domains",
            )
        wanted = tuple(sorted(domains))
        return [
            ShardSpec(f"{prefix}/{f['name']}", sum(f["domains"].get(d, 0) for d in wanted), wanted)
            for f in shards["files"]
        ]

    def heldout_specs(self, base: str | None = None, domains: list[str] | None = None) -> dict:
        """Held-out pretraining shards by domain, ``{domain: [ShardSpec]}`` (empty when the
        shard job held out no users; see ``shards.heldout_fraction``), of ``domains`` only
        when given."""
        from sharding.stream import ShardSpec

        shards = self.manifest.get("shards") or {}
        prefix = base.rstrip("/") if base else str(self.root / shards.get("dir", "shards"))
        return {
            f["domain"]: [ShardSpec(f"{prefix}/{f['name']}", f["num_samples"])]
            for f in shards.get("heldout", [])
            if not domains or f["domain"] in domains
        }

    def check_shards(self, base: str | None = None) -> None:
        """Check each local pretraining shard's size and sha256 against the manifest.

        Cheap next to a training run, and a bad shard is named here, once, instead of failing
        every worker that reads it. Shards read from a URL or a ``pipe:`` are not checked.
        """
        from sharding.atomic import sha256_file

        if base and ("://" in base or base.startswith("pipe:")):
            return
        shards = self.manifest.get("shards") or {"files": []}
        prefix = Path(base) if base else self.root / shards.get("dir", "shards")
        for record in shards["files"]:
            path = prefix / record["name"]
            fix = "re-run `unisrec shard` or restore the file"
            if not path.is_file():
                raise DataError(f"shard listed in the manifest is missing; {fix}", file=path)
            size = path.stat().st_size
            if "bytes" in record and size != record["bytes"]:
                raise DataError(
                    f"shard is {size} bytes, the manifest says {record['bytes']} "
                    f"(truncated or replaced); {fix}",
                    file=path,
                )
            if "sha256" in record and sha256_file(path) != record["sha256"]:
                raise DataError(
                    f"shard content differs from the manifest's sha256 (corrupt or replaced); {fix}",
                    file=path,
                )

    def verify(self) -> None:
        """Check every file against the manifest's sha256 digests."""
        from sharding.atomic import sha256_file

        for rel, digest in self.manifest["files"].items():
            path = self.root / rel
            if not path.is_file():
                raise DataError("missing file listed in the manifest", file=path)
            if sha256_file(path) != digest:
                raise DataError(
                    "content digest differs from the manifest (corrupt or changed)", file=path
                )

    def _file(self, name: str, key: str) -> Path:
        return self.root / self.manifest["domains"][self.domain(name).name]["files"][key]["path"]


def log_mlflow_input(dataset: Dataset, context: str, domains: list[str] | None = None) -> None:
    """Log ``dataset`` (its ``domains``, default all) as a dataset input of the active MLflow
    run: one row per domain, the manifest's digest, and a ``unisrec.domain`` input tag."""
    import warnings

    import mlflow
    import mlflow.data

    names = domains or list(dataset.domains)
    rows = [
        {
            "domain": d.name,
            "users": d.num_users,
            "items": d.num_items,
            "interactions": d.num_interactions,
            "pretrain": d.pretrain,
        }
        for d in (dataset.domain(n) for n in names)
    ]
    label = "shards" if domains is None else "-".join(names)
    # Integer counts: MLflow's "integer columns cannot hold missing values" hint does not
    # apply (it is raised both when the dataset is made and when its schema is logged), and
    # a local directory as the source is a local artifact source whichever way MLflow reads it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        warnings.filterwarnings(
            "ignore", message=".*interpreted in multiple ways", category=UserWarning
        )
        source = mlflow.data.from_pandas(
            pd.DataFrame(rows),
            source=str(dataset.root),
            name=f"unisrec-{label}-{dataset.digest[:8]}",
            digest=dataset.digest[:32],
        )
        mlflow.log_input(source, context=context, tags={"unisrec.domain": ",".join(names)})
