"""Where finished tenants' recommendations land by item popularity.

Figure 4's numbers say how often each popularity group's *targets* are found. This says what
the model *recommends*: for every test user, its top-``k`` items (history excluded, as in
evaluation), and the share of all those slots that go to each popularity group of the
domain's training interactions, beside the share of test targets in the group. A model whose
head share exceeds the targets' leans on popularity.

    python -m experiments.exposure benchmarks/configs/experiment-scientific-cpu.yaml \\
        [KEY=VALUE ...] --cells inductive-scratch,inductive-all,full-all --fraction 0.1

reads ``output_dir/results.json`` and each run's adaptor bundle (its backbone from the
experiment's registry), and writes ``report/exposure-f<fraction>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from adaptors.evaluate import EvalSplit, popularity_groups
from pretrain.model import SequenceRecommender


@torch.inference_mode()
def top_items(
    model: SequenceRecommender,
    split: EvalSplit,
    text_table: torch.Tensor,
    temperature: float,
    k: int,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Each user's ``k`` best items, never one of its history: ``(U, k) int64`` indexes 1..N.

    text_table: ``(N+1, D)`` float32, row 0 padding.
    """
    model.eval()
    items = model.catalogue_vectors(text_table)  # (N+1, H)
    out = torch.empty(len(split), k, dtype=torch.long)
    for start in range(0, len(split), batch_size):
        rows = slice(start, start + batch_size)
        lengths = split.lengths[rows]
        histories = split.histories[rows, : int(lengths.max())]
        queries = model.last(model.encode(histories, items), lengths)  # (B, H)
        scores = model.score(queries, items[1:], temperature)  # (B, N), column j = item j+1
        padded = _item_columns(scores)  # (B, N+1), column i = item i, column 0 = -inf
        padded.scatter_(1, histories, float("-inf"))  # history items (and padding 0) out
        out[rows] = padded.topk(k, dim=1).indices
    return out


def _item_columns(scores: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` -> ``(B, N+1)`` with a ``-inf`` column 0, so column i is item i."""
    return torch.cat([scores.new_full((scores.shape[0], 1), float("-inf")), scores], dim=1)


def group_shares(indexes: torch.Tensor, groups: np.ndarray) -> list[float]:
    """Share of ``indexes`` (any shape, item indexes >= 1) in each group of ``groups``
    ``(N+1,)`` (group per item, -1 for row 0): a list summing to 1."""
    member = groups[indexes.reshape(-1).numpy()]
    counts = np.bincount(member, minlength=int(groups.max()) + 1)
    return (counts / max(counts.sum(), 1)).tolist()


def run_exposure(run: dict, data_dir: Path, k: int, num_groups: int) -> dict:
    """Exposure of one finished fine-tuning run (an entry of ``results.json``)."""
    from adaptors.bundle import load_bundle
    from adaptors.evaluate import load_eval_data
    from sharding.dataset import Dataset

    model, spec = load_bundle(Path(run["output_dir"]) / "adaptor")
    dataset = Dataset(data_dir)
    data = load_eval_data(dataset, spec.domain, model.max_seq_len, torch.device("cpu"))
    groups = popularity_groups(data.popularity, num_groups)
    top = top_items(model, data.test, data.text_table, spec.temperature, k)
    return {
        "exposure": group_shares(top, groups),
        "targets": group_shares(data.test.targets, groups),
    }


def exposure_table(
    config: Path, overrides: list[str], cells: list[str], fraction: float, k: int, groups: int
):
    """``{cell: {"exposure": [mean share per group], "per_seed": [...], "targets": [...]}}``
    over the finished seeds of each cell at ``fraction``."""
    from experiments.config import ExperimentConfig
    from experiments.report import runs_of
    from unisrec.config import load_config
    from unisrec.tracking import configure_mlflow

    cfg = load_config(ExperimentConfig, config, overrides)
    out = Path(cfg.output_dir).resolve()
    configure_mlflow(cfg.mlflow.tracking_uri)
    results = json.loads((out / "results.json").read_text())
    table = {}
    for cell in cells:
        runs = [
            run_exposure(r, Path(cfg.data_dir), k, groups) for r in runs_of(results, cell, fraction)
        ]
        if not runs:
            continue
        per_seed = [r["exposure"] for r in runs]
        table[cell] = {
            "exposure": [statistics.fmean(g) for g in zip(*per_seed)],
            "per_seed": per_seed,
            "targets": runs[0]["targets"],
        }
    return table, out


def markdown(table: dict, fraction: float, k: int) -> str:
    groups = len(next(iter(table.values()))["targets"])
    head = " | ".join(f"group {g}" for g in range(groups))
    lines = [
        f"Share of the top-{k} slots of Scientific's test users by item popularity group "
        f"(0 = least popular fifth of the training interactions), {fraction:g} of the users, "
        "mean over seeds",
        "",
        f"| | {head} |",
        "|---" * (groups + 1) + "|",
        "| test targets | "
        + " | ".join(f"{s:.3f}" for s in next(iter(table.values()))["targets"])
        + " |",
    ]
    for cell, row in table.items():
        n = len(row["per_seed"])
        lines.append(
            f"| {cell} (n={n}) | " + " | ".join(f"{s:.3f}" for s in row["exposure"]) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the experiment's YAML")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE, as for unisrec experiment")
    parser.add_argument("--cells", required=True, help="fine-tuning cells, comma-separated")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--groups", type=int, default=5)
    args = parser.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    table, out = exposure_table(
        args.config, args.overrides, cells, args.fraction, args.k, args.groups
    )
    if not table:
        raise SystemExit(f"no finished runs of {cells} at fraction {args.fraction:g}")
    write_exposure(out / "report", table, args.fraction, args.k)
    print(markdown(table, args.fraction, args.k))
    return 0


def write_exposure(report_dir: Path, table: dict, fraction: float, k: int) -> list[Path]:
    """``exposure-f<fraction>.json`` and ``.md`` in ``report_dir``; returns their paths."""
    report_dir.mkdir(parents=True, exist_ok=True)
    name = f"exposure-f{fraction:g}"
    paths = [report_dir / f"{name}.json", report_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(table, indent=2))
    paths[1].write_text(markdown(table, fraction, k))
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
