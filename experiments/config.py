"""Configuration of an experiment grid (``unisrec experiment CONFIG.yaml``).

An experiment names *pretraining cells* (a backbone each) and *fine-tuning cells* (a tenant
adaptor trained from scratch or from one of those backbones), each a set of dotted
overrides of the ordinary pretrain / finetune configs. A fine-tuning cell runs once per seed
and per training-user fraction. *Reports* say which cells make which table or figure.

    pretrain:
      - {name: all}                                    # every pretraining domain
      - {name: office, overrides: {data.domains: [office]}}
    finetune:
      - {name: inductive-scratch, overrides: {mode: inductive}}
      - {name: inductive-all, backbone: all, train_fractions: [0.1, 1.0]}
    reports:
      - {name: table3, kind: table, cells: [inductive-scratch, inductive-all]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from unisrec.errors import ConfigError

REPORT_KINDS = ("table", "bars", "popularity", "fractions", "heldout")


@dataclass
class PretrainCell:
    name: str  # names the backbone: unisrec-backbone-<experiment>-<name>
    overrides: dict[str, Any] = field(default_factory=dict)  # of the pretrain config


@dataclass
class FinetuneCell:
    name: str
    backbone: str = "none"  # "none" (from scratch / SASRec) or a pretraining cell's name
    overrides: dict[str, Any] = field(default_factory=dict)  # of the finetune config
    train_fractions: list[float] = field(default_factory=lambda: [1.0])  # data.train_fraction
    seeds: list[int] = field(default_factory=list)  # [] = the experiment's seeds


@dataclass
class ReportSpec:
    """One table or figure. Test metrics of the best-valid state, mean ± std over seeds, at
    training fraction ``fraction`` (every fraction for the kind ``fractions``).

    kinds: ``table`` (rows = cells, columns = metrics); ``bars`` (a bar per cell and metric,
    PNG); ``popularity`` (Recall@K of each cell minus the ``baseline`` cell's, per target
    popularity group, PNG); ``fractions`` (metrics against data.train_fraction, a line per
    cell, PNG); ``heldout`` (held-out pretraining loss of pretraining cells against epochs, PNG).
    """

    name: str  # file stem of report/<name>.{md,json,png}
    kind: Literal["table", "bars", "popularity", "fractions", "heldout"]
    cells: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # display names; [] = cell names
    title: str = ""
    metrics: list[str] = field(default_factory=lambda: ["recall@10", "ndcg@10"])
    baseline: str = ""  # popularity: the cell improvements are measured against
    fraction: float = 1.0  # the training-user fraction a table, bars or popularity report reads


@dataclass
class ExperimentMlflow:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "unisrec-experiments"  # parent and child runs all go here


@dataclass
class ExperimentConfig:
    name: str = "experiment"  # parent run name; part of model and tenant names
    data_dir: str = "runs/shared-data"  # dataset directory (pretraining domains + target)
    target: str = "scientific"  # the fine-tuned domain
    output_dir: str = "runs/experiment"  # results.json, pretrain/, finetune/, report/
    seeds: list[int] = field(default_factory=lambda: [0])
    pretrain_config: str = ""  # YAML every pretraining cell starts from ("" = defaults)
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)  # for every pretrain cell
    finetune_config: str = ""  # YAML every fine-tuning cell starts from ("" = defaults)
    finetune_overrides: dict[str, Any] = field(default_factory=dict)  # for every fine-tune cell
    pretrain: list[PretrainCell] = field(default_factory=list)
    finetune: list[FinetuneCell] = field(default_factory=list)
    reports: list[ReportSpec] = field(default_factory=list)
    parallel: int = 1  # fine-tuning Ray tasks at once (one CPU and one torch thread each)
    ray_address: str = ""  # "" = $RAY_ADDRESS or a local loopback Ray
    mlflow: ExperimentMlflow = field(default_factory=ExperimentMlflow)

    def validate(self) -> None:
        for kind, cells in (("pretrain", self.pretrain), ("finetune", self.finetune)):
            names = [c.name for c in cells]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"{kind}: duplicate cell names {dup}")
            bad = [n for n in names if not n or not all(c.isalnum() or c in "-_" for c in n)]
            if bad:
                raise ConfigError(f"{kind}: cell names must be letters, digits, '-', '_': {bad}")
        backbones = {c.name for c in self.pretrain}
        finetunes = {c.name for c in self.finetune}
        for cell in self.finetune:
            if cell.backbone != "none" and cell.backbone not in backbones:
                raise ConfigError(
                    f"finetune.{cell.name}.backbone: {cell.backbone!r} is not a pretrain cell "
                    f"({sorted(backbones)}) or 'none'"
                )
            if not all(0 < f <= 1 for f in cell.train_fractions) or not cell.train_fractions:
                raise ConfigError(f"finetune.{cell.name}.train_fractions: need values in (0, 1]")
        for report in self.reports:
            pool = backbones if report.kind == "heldout" else finetunes
            missing = [c for c in report.cells + ([report.baseline] if report.baseline else [])]
            missing = [c for c in missing if c not in pool]
            if missing:
                raise ConfigError(f"reports.{report.name}: unknown cells {missing}")
            if report.labels and len(report.labels) != len(report.cells):
                raise ConfigError(f"reports.{report.name}: labels must match cells one to one")
            if not 0 < report.fraction <= 1:
                raise ConfigError(f"reports.{report.name}.fraction: need a value in (0, 1]")
            if report.kind == "popularity" and not report.baseline:
                raise ConfigError(f"reports.{report.name}: popularity needs a baseline cell")
        if not self.seeds:
            raise ConfigError("seeds: at least one seed")
        if self.parallel < 1:
            raise ConfigError(f"parallel: must be >= 1, got {self.parallel}")
