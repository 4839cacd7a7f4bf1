"""The whole platform end to end (``unisrec demo``): data -> shards -> backbone -> adaptors.

On the embedded default it makes a seeded *synthetic* multi-domain data set
(:mod:`sharding.synthetic`), whose source and target domains share latent topics and a
topic-to-topic sequential pattern, so transfer from pretraining is real and measurable. With
``data.shard_config`` it runs on real data instead.

    1. shard   raw files -> dataset directory (text vectors from the packaged MiniLM)
    2. pretrain  2 Ray workers, DeepSpeed ZeRO-2, local MLflow store, backbone registered
    3. finetune  tenants from the registry (inductive, transductive) and from scratch,
                 in parallel Ray tasks; full-ranking evaluation; adaptors registered
    4. report    metric table, example recommendations, PNG plots, where everything is
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from adaptors.config import TenantSpec

log = logging.getLogger(__name__)

BACKBONE = "models:/unisrec-backbone@current"


@dataclass
class SyntheticData:
    seed: int = 0
    scale: float = 1.0  # users per domain relative to the default sizes
    num_sources: int = 4  # pretraining domains (targets: crafts and gifts)
    target_scale: float = (
        0.35  # small targets (~50-100 users, ~50 items): where pretraining pays off
    )


@dataclass
class DemoData:
    shard_config: str = ""  # a shard-job YAML for real data; "" = the synthetic set below
    synthetic: SyntheticData = field(default_factory=SyntheticData)


def _default_tenants() -> list[TenantSpec]:
    return [
        TenantSpec("crafts", {"data.domain": "crafts", "mode": "inductive", "backbone": BACKBONE}),
        TenantSpec("gifts", {"data.domain": "gifts", "mode": "transductive", "backbone": BACKBONE}),
        TenantSpec(
            "crafts-scratch", {"data.domain": "crafts", "mode": "inductive", "backbone": "none"}
        ),
        TenantSpec(
            "gifts-scratch", {"data.domain": "gifts", "mode": "transductive", "backbone": "none"}
        ),
    ]


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    data: DemoData = field(default_factory=DemoData)
    # key=value overrides of the pretraining and fine-tuning configs
    pretrain: list[str] = field(
        default_factory=lambda: [
            "data.batch_size=64",
            "optim.epochs=8",
            "optim.lr=0.001",
            "distributed.num_workers=2",
            "distributed.zero_stage=2",
            "distributed.checkpoint_every=100",
            "log_every=5",
        ]
    )
    finetune: list[str] = field(
        default_factory=lambda: ["optim.max_epochs=40", "optim.patience=8", "optim.batch_size=1024"]
    )
    tenants: list[TenantSpec] = field(default_factory=_default_tenants)


SMOKE = [
    "data.synthetic.scale=0.4",
    "data.synthetic.target_scale=0.4",
    "data.synthetic.num_sources=2",
    'pretrain=["data.batch_size=32","optim.epochs=1","distributed.num_workers=2","distributed.zero_stage=2","log_every=2","distributed.checkpoint_every=100"]',
    'finetune=["optim.max_epochs=3","optim.patience=2","optim.batch_size=512"]',
]


def run_demo(cfg: DemoConfig) -> dict:
    from adaptors.config import FinetuneConfig
    from adaptors.tenants import run_tenants
    from pretrain.config import PretrainConfig
    from pretrain.job import run_pretrain
    from sharding.config import ShardJobConfig
    from sharding.job import run_shard_job
    from unisrec.config import from_dict, load_config

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    timings: dict[str, float] = {}

    # 1. Data -> shards.
    started = time.perf_counter()
    if cfg.data.shard_config:
        shard_cfg = load_config(ShardJobConfig, cfg.data.shard_config)
    else:
        from sharding.synthetic import write_synthetic

        syn = cfg.data.synthetic
        domains = write_synthetic(
            out / "raw",
            seed=syn.seed,
            scale=syn.scale,
            num_sources=syn.num_sources,
            target_scale=syn.target_scale,
        )
        shard_cfg = from_dict(
            ShardJobConfig, {"domains": domains, "processing": {"max_seq_len": 20}}
        )
    _banner("1/4 shard", f"{len(shard_cfg.domains)} domains -> {out / 'data'}")
    run_shard_job(shard_cfg, out / "data")
    timings["shard"] = time.perf_counter() - started

    # 2. Pretrain on the source domains, register the backbone.
    started = time.perf_counter()
    max_len = shard_cfg.processing.max_seq_len
    pretrain_cfg = load_config(
        PretrainConfig,
        None,
        [
            f"data.dir={out / 'data'}",
            f"output_dir={out / 'pretrain'}",
            f"mlflow.tracking_uri={tracking_uri}",
            f"model.max_seq_len={max_len}",
            *cfg.pretrain,
        ],
    )
    _banner(
        "2/4 pretrain",
        f"{pretrain_cfg.distributed.num_workers} Ray workers, ZeRO-{pretrain_cfg.distributed.zero_stage}",
    )
    pretrain_summary = run_pretrain(pretrain_cfg)
    timings["pretrain"] = time.perf_counter() - started

    # 3. Fine-tune the tenants in parallel.
    started = time.perf_counter()
    finetune_cfg = load_config(
        FinetuneConfig,
        None,
        [
            f"data.dir={out / 'data'}",
            f"output_root={out / 'finetune'}",
            f"mlflow.tracking_uri={tracking_uri}",
            f"model.max_seq_len={max_len}",
            *cfg.finetune,
        ],
    )
    finetune_cfg.tenants = cfg.tenants
    _banner("3/4 finetune", ", ".join(t.name for t in cfg.tenants))
    results = run_tenants(finetune_cfg)
    timings["finetune"] = time.perf_counter() - started

    # 4. Report.
    _banner("4/4 report", str(out))
    rows = _metric_rows(cfg.tenants, results)
    table = _format_table(rows)
    print(table)
    examples = _example_recommendations(out, cfg.tenants, results)
    print(examples)
    lineage = _registry_lineage(tracking_uri)
    print(lineage)
    plots = [
        _plot_metrics(rows, out / "metrics.png"),
        Path(pretrain_cfg.output_dir) / "pretrain_loss.png",
    ]
    summary = {
        "out": str(out),
        "tracking_uri": tracking_uri,
        "backbone": {
            k: pretrain_summary[k]
            for k in ("registered_model", "model_version", "run_id", "final_loss", "first_loss")
        },
        "tenants": rows,
        "timings_seconds": timings,
        "plots": [str(p) for p in plots if p.exists()],
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "demo_report.txt").write_text("\n\n".join([table, examples, lineage]) + "\n")
    _log_demo_run(tracking_uri, summary, out)
    print(
        f"\noutputs: {out}\n"
        f"  dataset {out / 'data'}   backbone run {out / 'pretrain'}   adaptors {out / 'finetune'}\n"
        f"  plots   {', '.join(summary['plots'])}\n"
        f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000\n"
        f"timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    )
    follow_up = _follow_up_tenant(out, cfg.tenants, results)
    if follow_up:
        print("next (a tenant's model from the registry):")
        print("\n".join(f"  {line}" for line in next_commands(out, tracking_uri, *follow_up)))
    return summary


def next_commands(out: Path, tracking_uri: str, tenant: str, history: list[str]) -> list[str]:
    """What a user types after the demo: promote a tenant's candidate, then ask the registered
    version for recommendations, one history and every user (tests parse them with the CLI)."""
    unisrec = _here(Path(sys.executable).parent / "unisrec")
    return [
        f"export MLFLOW_TRACKING_URI={tracking_uri}",
        f"{unisrec} promote --tenant {tenant}",
        f"{unisrec} recommend --tenant {tenant} --history {','.join(history)} -k 5",
        f"{unisrec} recommend-batch --tenant {tenant} --all-users "
        f"--out {_here(out / f'recs-{tenant}.parquet')} -k 50",
        f"{unisrec} models list --tenant {tenant}",
    ]


def _here(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _follow_up_tenant(
    out: Path, tenants: list[TenantSpec], results: dict[str, dict]
) -> tuple[str, list[str]] | None:
    """The first fine-tuned tenant and the last three items of its first test user."""
    from sharding.dataset import Dataset

    for spec in tenants:
        domain = spec.overrides.get("data.domain")
        if domain and spec.name in results and "error" not in results[spec.name]:
            ds = Dataset(out / "data")
            keys = ds.items(domain).set_index("index")["key"]
            test = ds.split(domain, "test").iloc[0]
            return spec.name, [str(keys.loc[int(i)]) for i in test["history"]][-3:]
    return None


def _banner(step: str, detail: str) -> None:
    print(f"\n=== {step}: {detail}", flush=True)


def _metric_rows(tenants: list[TenantSpec], results: dict[str, dict]) -> list[dict]:
    rows = []
    for spec in tenants:
        result = results.get(spec.name, {})
        test = result.get("test", {})
        rows.append(
            {
                "tenant": spec.name,
                "domain": spec.overrides.get("data.domain", ""),
                "mode": spec.overrides.get("mode", "inductive"),
                "backbone": "pretrained"
                if str(spec.overrides.get("backbone", "none")).startswith("models:/")
                else "scratch",
                "recall@10": test.get("recall@10"),
                "ndcg@10": test.get("ndcg@10"),
                "recall@50": test.get("recall@50"),
                "ndcg@50": test.get("ndcg@50"),
                "error": result.get("error"),
            }
        )
    return rows


def _format_table(rows: list[dict]) -> str:
    head = f"{'tenant':<16} {'domain':<8} {'mode':<13} {'backbone':<10} {'R@10':>7} {'N@10':>7} {'R@50':>7} {'N@50':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['tenant']:<16} failed: {r['error']}")
            continue
        lines.append(
            f"{r['tenant']:<16} {r['domain']:<8} {r['mode']:<13} {r['backbone']:<10} "
            f"{r['recall@10']:7.4f} {r['ndcg@10']:7.4f} {r['recall@50']:7.4f} {r['ndcg@50']:7.4f}"
        )
    return "\n".join(lines)


def _example_recommendations(
    out: Path, tenants: list[TenantSpec], results: dict[str, dict], k: int = 5
) -> str:
    """Top-k for one test user of each pretrained tenant, with item text."""
    from adaptors.bundle import load_bundle
    from adaptors.catalogue import Catalogue
    from adaptors.topk import top_k
    from sharding.dataset import Dataset

    ds = Dataset(out / "data")
    lines = ["example recommendations (history -> top items):"]
    for spec in tenants:
        if spec.name not in results or "error" in results[spec.name]:
            continue
        if not str(spec.overrides.get("backbone", "")).startswith("models:/"):
            continue
        tenant_dir = out / "finetune" / spec.name
        model, adaptor = load_bundle(tenant_dir / "adaptor")
        catalogue = Catalogue.load(tenant_dir / "catalogue")
        domain = spec.overrides["data.domain"]
        items = ds.items(domain).set_index("index")
        test = ds.split(domain, "test").iloc[0]
        history = [items.loc[int(i), "key"] for i in test["history"]][-5:]
        recs = top_k(model, adaptor, catalogue, [history], k=k)[0]
        texts = dict(zip(catalogue.keys, catalogue.texts, strict=True))
        lines.append(f"[{spec.name}] history: " + " | ".join(texts[h][:40] for h in history[-3:]))
        lines.append(f"    held-out next item: {items.loc[int(test['target']), 'text'][:60]}")
        for rank, (key, score) in enumerate(recs, start=1):
            lines.append(f"    {rank}. {texts[key][:70]}  ({score:.2f})")
    return "\n".join(lines)


def _registry_lineage(tracking_uri: str) -> str:
    """Every registered model's newest version with the tags that say what made it."""
    from mlflow.tracking import MlflowClient

    from unisrec import tags as T

    client = MlflowClient(tracking_uri)
    lines = ["registry (newest version of each model, lineage tags):"]
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        newest = max(
            client.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)
        )
        tags = newest.tags
        if tags.get(T.KIND) == "backbone":
            origin = f"run {tags[T.RUN_ID][:8]}, data {tags[T.DATA_DIGEST][:12]}, encoder {tags[T.ENCODER]}"
        else:
            made_from = (
                f"{tags[T.BACKBONE_NAME]} v{tags[T.BACKBONE_VERSION]}"
                if tags.get(T.BACKBONE_NAME, "none") != "none"
                else "no backbone (scratch)"
            )
            origin = f"{made_from}, data {tags.get(T.DATA_DIGEST, '')[:12]}, {tags.get(T.MODE, '')}"
        lines.append(f"  {model.name:<30} v{newest.version}  <- {origin}")
    return "\n".join(lines)


def _plot_metrics(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"]]
    metrics = ["recall@10", "ndcg@10", "recall@50", "ndcg@50"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(ok), 1)
    for i, r in enumerate(ok):
        ax.bar(
            [m + i * width for m in range(len(metrics))],
            [r[k] for k in metrics],
            width,
            label=f"{r['tenant']} ({r['backbone']})",
        )
    ax.set_xticks([m + width * (len(ok) - 1) / 2 for m in range(len(metrics))], metrics)
    ax.set_title("test metrics, full ranking (pretrained vs scratch)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_demo_run(tracking_uri: str, summary: dict, out: Path) -> None:
    import mlflow

    from unisrec.tracking import configure_mlflow, set_experiment

    configure_mlflow(tracking_uri)
    set_experiment("unisrec-demo", tracking_uri)
    with mlflow.start_run(run_name="demo-report"):
        for row in summary["tenants"]:
            if not row["error"]:
                mlflow.log_metrics(
                    {
                        f"{row['tenant']}/{k.replace('@', '_at_')}": row[k]  # '@' is not allowed
                        for k in ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
                    }
                )
        for plot in summary["plots"]:
            mlflow.log_artifact(plot)
        mlflow.log_artifact(str(out / "demo_report.txt"))
