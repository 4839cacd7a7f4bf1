#!/usr/bin/env bash
# GPU check (one command, a few minutes): synthetic data -> shards (text encoded on the GPU)
# -> one-GPU pretraining under DeepSpeed ZeRO-2 in bf16 -> throughput printed and written to
# $OUT/gpu_check.json (or benchmarks/results/gpu_check.json) -> one fp32 fine-tune epoch and a
# full-ranking evaluation of a synthetic target domain at hidden size 768, with achieved
# FLOP/s over the GPU's fp32 matmul rate on the same shapes (roofline_fraction) and peak GPU
# memory, in $OUT/gpu_finetune.json. Not yet run: no GPU machine was available.
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
# PYTHON must have this package and its dependencies installed (`pip install -e .`), with a
# CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" - "$WORK" <<'PY'
import sys
from pathlib import Path
from sharding.config import ShardJobConfig
from sharding.job import run_shard_job
from sharding.synthetic import write_synthetic
from unisrec.config import from_dict
work = Path(sys.argv[1])
domains = write_synthetic(work / "raw", seed=0, scale=3.0, num_sources=6)
(work / "target.txt").write_text(domains[-1]["name"])
cfg = from_dict(ShardJobConfig, {"domains": domains, "encoder": {"device": "cuda", "batch_size": 512, "cache_dir": ""}})
run_shard_job(cfg, work / "data", progress=False)
PY
"$PY" -m recipes.cli pretrain benchmarks/configs/pretrain-shared.yaml \
  data.dir="$WORK/data" output_dir="$WORK/pretrain" mlflow.tracking_uri="sqlite:///$WORK/mlflow.db" \
  distributed.use_gpu=true distributed.precision=bf16 distributed.num_workers=1 \
  distributed.cpus_per_worker=4 data.batch_size=512 data.loader_workers=2 optim.max_steps=60 \
  optim.epochs=100 log_every=10 distributed.checkpoint_every=60 | tee "$WORK/summary.txt"
"$PY" - "$WORK" "$RESULTS" <<'PY'
import json, sys
from pathlib import Path
summary = json.loads((Path(sys.argv[1]) / "pretrain" / "summary.json").read_text())
keep = {k: summary[k] for k in ("sequences_per_second", "tokens_per_second", "steps", "final_loss", "first_loss", "wall_seconds")}
(Path(sys.argv[2]) / "gpu_check.json").write_text(json.dumps(keep, indent=2))
print(f"GPU bf16 pretraining: {keep['sequences_per_second']:.0f} sequences/s, {keep['tokens_per_second']:.0f} tokens/s")
PY
"$PY" benchmarks/bench_finetune.py --data-dir "$WORK/data" --domain "$(cat "$WORK/target.txt")" \
  --hidden-size 768 --epochs 1 --out "$RESULTS/gpu_finetune.json" | tail -40
