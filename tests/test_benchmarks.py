"""Every script under benchmarks/ runs its real ``main()`` on tiny data written here, so a
refactor that breaks a benchmark fails the suite. Each test reads the JSON the script wrote:
its keys, finite positive rates, and the load average before and after
(benchmarks/machine_load.py). The numbers themselves mean nothing at this size.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_data import write_small_dataset

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# The scripts import their siblings (roofline, machine_load) by name, as when run as files.
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def benchmark(name: str):
    """The module of ``benchmarks/<name>.py``."""
    return importlib.import_module(name)


def read_json(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert_all_finite(result)
    return result


def assert_all_finite(value, where: str = "") -> None:
    """No NaN or infinity anywhere in the JSON."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert_all_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert_all_finite(item, f"{where}[{index}]")
    elif isinstance(value, float):
        assert math.isfinite(value), where


def _number(result: dict, key: str) -> int | float:
    value = result
    for part in key.split("."):
        value = value[part]
    assert isinstance(value, int | float), (key, value)
    return value


def assert_positive(result: dict, *keys: str) -> None:
    """Each dotted key is present and a positive number."""
    for key in keys:
        assert _number(result, key) > 0, (key, result)


def assert_non_negative(result: dict, *keys: str) -> None:
    """For numbers a benchmark rounds, which tiny data can round to 0."""
    for key in keys:
        assert _number(result, key) >= 0, (key, result)


def assert_load_recorded(result: dict) -> None:
    """``"load": {"before": [1m, 5m, 15m], "after": [...]}``."""
    load = result["load"]
    assert sorted(load) == ["after", "before"]
    for averages in load.values():
        assert len(averages) == 3
        assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in averages)


@pytest.fixture(autouse=True)
def _torch_threads_stay():
    """Some benchmarks set torch's thread count for their process; the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two pretraining domains (sharded) and a target domain with held-out users."""
    return write_small_dataset(
        tmp_path_factory.mktemp("bench") / "data",
        domains=("office", "games", "target"),
        num_users=40,
        pretrain_domains=("office", "games"),
        heldout_fraction=0.2,
    )


@pytest.mark.parametrize("mode", ["inductive", "transductive"])
def test_bench_finetune(data, tmp_path, mode):
    out = tmp_path / "finetune.json"
    benchmark("bench_finetune").main(
        [
            f"--data-dir={data}",
            "--domain=target",
            f"--mode={mode}",
            "--hidden-size=16",
            "--batch-size=32",
            "--epochs=1",
            "--profile-steps=2",
            "--square-size=64",
            f"--out={out}",
        ]
    )
    result = read_json(out)
    assert result["mode"] == mode and result["items"] == 30 and result["hidden_size"] == 16
    assert len(result["epoch_seconds"]) == 1
    assert_positive(
        result,
        "users",
        "training_windows",
        "train_targets",
        "trainable_parameters",
        "mean_epoch_seconds",
        "train_windows_per_s",
        "train_targets_per_s",
        "eval_users_per_s",
        "peak_rss_gib",
        "square_gemm_gflops",
    )
    # rounded to 0.01 GFLOP/s, 0.001 s: a few MFLOP can show as 0 here
    assert_non_negative(
        result,
        "eval_seconds",
        "train_gflop",
        "train_achieved_gflops",
        "train_matmul_peak_gflops",
        "roofline_fraction",
        "eval_gflop",
        "eval_achieved_gflops",
        "eval_matmul_peak_gflops",
    )
    # A share of the machine's matmul peak: above 0 and never above it.
    assert 0 < result["eval_roofline_fraction"] <= 1
    assert result["train_targets"] >= result["training_windows"]  # each window queries >= 1
    assert_load_recorded(result)
    assert "aten::mm" in out.with_suffix(".profile.txt").read_text()


def test_bench_eval_scaling(tmp_path):
    """Each size in its own process; the peak RSS is the child's own, not its parent's."""
    out = tmp_path / "eval_scaling.json"
    # A parent whose peak is far above the child's: a child's ru_maxrss would start there.
    ballast = bytearray(512 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])
    benchmark("bench_eval_scaling").main(
        [
            "--items",
            "50",
            "300",
            "--users=16",
            "--batch-size=8",
            "--item-block=64",
            "--unblocked",
            "--threads=1",
            f"--out={out}",
        ]
    )
    del ballast
    result = read_json(out)
    rows = result["rows"]
    assert [(r["method"], r["items"]) for r in rows] == [
        ("blocked", 50),
        ("one block", 50),
        ("blocked", 300),
        ("one block", 300),
    ]
    for row in rows:
        assert_positive(row, "item_user_pairs_per_s", "inputs_rss_gib", "peak_rss_gib")
        assert_non_negative(
            row, "adaptor_seconds", "twin_seconds", "ranking_seconds", "total_seconds"
        )
        assert 0 <= row["working_memory_gib"] < 0.25, row  # not the parent's 0.5 GiB ballast
        assert row["peak_rss_gib"] >= row["inputs_rss_gib"]
        if sys.platform == "linux":
            assert row["peak_source"] == "VmHWM"
        assert 0 <= row["recall@10"] <= 1
    assert_load_recorded(result)


def test_bench_pretrain_formulations(data, tmp_path):
    out = tmp_path / "pretrain.json"
    benchmark("bench_pretrain").main(
        [
            f"--data={data}",
            "--steps=2",
            "--batch-size=8",
            "--hidden-size=16",
            "--skip-ray",
            f"--out={out}",
        ]
    )
    result = read_json(out)
    assert "ray_train" not in result
    for name in ("all_prefix_causal", "naive_every_prefix"):
        assert_positive(
            result["formulation"][name],
            "seconds",
            "sequences_per_second",
            "tokens_per_second",
            "targets_per_second",
            "gflop",
            "achieved_gflops",
            "matmul_peak_gflops",
            "roofline_fraction",
        )
    assert_positive(result, "formulation.speedup_sequences_per_second")
    assert_load_recorded(result)


@pytest.mark.slow
def test_bench_pretrain_ray_train(data, tmp_path):
    import ray

    out = tmp_path / "pretrain.json"
    try:
        benchmark("bench_pretrain").main(
            [
                f"--data={data}",
                "--steps=2",
                "--batch-size=8",
                "--hidden-size=16",
                "--ray-workers=1",
                f"--work={tmp_path / 'work'}",
                f"--out={out}",
            ]
        )
    finally:
        ray.shutdown()
    result = read_json(out)
    run = result["ray_train"]["1_worker"]
    assert run["workers"] == 1 and run["steps"] == 2
    assert_positive(
        run,
        "sequences_per_second",
        "tokens_per_second",
        "targets_per_second",
        "wall_seconds_including_startup",
    )
    assert "ratio_2_over_1" not in result["ray_train"]
    assert_load_recorded(result)


def test_bench_pretrain_mix_bucketing(data, tmp_path):
    out = tmp_path / "pretrain_mix.json"
    benchmark("bench_pretrain_mix").main(
        [f"--data={data}", "--steps=2", "--batch-size=8", "--bucket-batches=2", f"--out={out}"]
    )
    result = read_json(out)
    assert "experiment_cell" not in result
    bucketing = result["bucketing"]
    for name in ("plain", "length_buckets"):
        assert_positive(
            bucketing[name],
            "seconds",
            "sequences_per_second",
            "tokens_per_second",
            "targets_per_second",
        )
        assert 0 <= bucketing[name]["padding_fraction"] < 1
    assert bucketing["length_buckets"]["bucket_batches"] == 2
    assert_positive(bucketing, "speedup_targets_per_second", "speedup_tokens_per_second")
    assert_load_recorded(result)


@pytest.mark.slow
def test_bench_pretrain_mix_experiment_cell(data, tmp_path, monkeypatch):
    """The row of a real experiment's pretraining cell (the smoke grid's ``all``)."""
    import ray

    from experiments.config import ExperimentConfig
    from experiments.runner import run_experiment
    from unisrec.config import load_config

    exp = tmp_path / "exp"
    cfg = load_config(
        ExperimentConfig,
        BENCHMARKS / "configs" / "experiment-smoke.yaml",
        [
            f"data_dir={data}",
            f"output_dir={exp}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "finetune=[]",
            "reports=[{name: heldout, kind: heldout, cells: [all]}]",
        ],
    )
    try:
        run_experiment(cfg)
    finally:
        ray.shutdown()
    assert (exp / "report" / "heldout.png").exists()
    mix = benchmark("bench_pretrain_mix")
    monkeypatch.setattr(mix, "ROOT", tmp_path)  # the loss figure is copied to ROOT/docs
    (tmp_path / "docs").mkdir()
    out = tmp_path / "pretrain_mix.json"
    mix.main([f"--experiment={exp}", "--cell=all", f"--out={out}"])
    result = read_json(out)
    assert "bucketing" not in result
    cell = result["experiment_cell"]
    assert cell["cell"] == "all" and cell["num_workers"] == 1
    assert_positive(
        cell,
        "steps",
        "samples_seen",
        "wall_seconds",
        "sequences_per_second",
        "tokens_per_second",
        "targets_per_second",
        "registered_step",
    )
    assert cell["heldout_history"] and cell["best_heldout"]["heldout_loss"] > 0
    assert (tmp_path / "docs" / "heldout_loss.png").stat().st_size > 1000
    assert_load_recorded(result)


@pytest.mark.slow
def test_bench_serving(tmp_path):
    import ray

    out = tmp_path / "serving.json"
    try:
        benchmark("bench_serving").main(
            [
                f"--work={tmp_path / 'work'}",
                "--items=30",
                "--large-items=60",
                "--users=10",
                "--seconds=1",
                "--clients=2",
                "--replicas",
                "1",
                f"--out={out}",
            ]
        )
    finally:
        ray.shutdown()
    result = read_json(out)
    rows = {(r["layout"], r["catalogue"], r["clients"]): r for r in result["results"]}
    assert set(rows) == {
        (layout, catalogue, clients)
        for layout in ("split", "colocated", "split-direct", "colocated-direct")
        for catalogue in ("small", "large")
        for clients in (2, 1)
    }
    assert rows["split", "large", 2]["items"] == 60 and rows["split", "small", 1]["items"] == 30
    for (layout, _, _), row in rows.items():
        assert row["replicas"] == 1 and row["errors"] == 0
        assert_positive(
            row, "requests", "seconds", "requests_per_second", "p50_ms", "p90_ms", "p99_ms"
        )
        assert_positive(
            row["stages"],
            "client_mean_ms",
            "ingress_mean_ms",
            "requests_per_batch",
            "model_call_ms_per_batch",
            "rank_ms_per_batch",
        )
        cpu = row["stages"]["cpu_ms_per_request"]
        assert_positive(cpu, "ingress", "clients")
        if not layout.endswith("-direct"):  # direct: the proxy runs, but idle
            assert_positive(cpu, "proxy")
        # colocated: the models are the ingress
        assert ("models" in cpu) == layout.startswith("split")
    assert {(t["catalogue"], t["metric"]) for t in result["targets"]} == {
        ("small", "requests_per_second"),
        ("small", "p99_ms"),
        ("small", "p50_ms"),
        ("large", "p99_ms"),
    }
    assert result["setup"]["items_per_tenant"] == 30 and result["setup"]["large_items"] == 60
    assert_load_recorded(result)


def test_bench_sharding(data, tmp_path):
    out = tmp_path / "sharding.json"
    benchmark("bench_sharding").main(
        [f"--data={data}", "--batch-size=8", "--repeats=1", f"--out={out}"]
    )
    result = read_json(out)
    assert result["num_shards"] == 2
    assert_positive(
        result,
        "write.sequences",
        "write.write_seconds_best_of",
        "write.sequences_per_second",
        "write.bytes",
    )
    for workers in (0, 2):
        read = result[f"read_{workers}_workers"]
        assert_positive(read, "batches", "seconds", "batches_per_second", "sequences_per_second")
    assert result["read_0_workers"]["batches"] == result["read_2_workers"]["batches"]
    assert_load_recorded(result)


def test_bench_text_encoding(tmp_path, monkeypatch):
    """The packaged all-MiniLM-L6-v2 on 40 item texts in the UniSRec ``.text`` format."""
    root = tmp_path / "data"
    (root / "amazon-scientific").mkdir(parents=True)
    lines = ["item_id:token\ttext:token_seq"] + [
        f"{i}\t{'digital lab thermometer probe ' * (1 + i % 7)}sensor {i}" for i in range(40)
    ]
    (root / "amazon-scientific" / "Scientific.text").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("UNISREC_DATA_ROOT", str(root))
    out = tmp_path / "text_encoding.json"
    benchmark("bench_text_encoding").main(["--n=40", "--batch-size=8", f"--out={out}"])
    result = read_json(out)
    assert result["n"] == 40 and result["batch_size"] == 8
    assert_positive(
        result,
        "bucketed.seconds",
        "bucketed.items_per_s",
        "unbucketed.seconds",
        "unbucketed.items_per_s",
        "speedup",
    )
    assert result["max_abs_diff"] < 1e-4  # bucketing reorders work, never changes a vector
    assert_load_recorded(result)


def test_roofline_matmul_rate(tmp_path):
    out = tmp_path / "matmul.json"
    benchmark("roofline").main(["--size=64", "--repeats=2", f"--out={out}"])
    result = read_json(out)
    assert result["size"] == 64 and result["device"] == "cpu"
    assert_positive(result, "square_gemm_gflops")
    assert_load_recorded(result)


def test_gpu_check_script_parses_and_names_what_exists(tmp_path):
    """gpu_check.sh needs a GPU to run; here: bash parses it, its Python parts compile and
    import, the modules it runs with ``-m`` exist, the benchmark flags it passes are known,
    and the part that turns the pretraining summary into gpu_check.json runs on a sample."""
    script = BENCHMARKS / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()

    heredocs = re.findall(r"<<'PY'\n(.*?)\nPY\n", text, flags=re.S)
    assert len(heredocs) == 2
    for code in heredocs:
        compile(code, str(script), "exec")
        for line in code.splitlines():
            if line.startswith(("import ", "from ")):
                exec(line, {})
    for module in re.findall(r'"\$PY" -m ([\w.]+)', text):
        assert importlib.util.find_spec(module) is not None, module
    for name, flags in re.findall(r'"\$PY" benchmarks/(\w+)\.py((?:[^\n]|\\\n)*)', text):
        usage = subprocess.run(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for flag in re.findall(r"(--[\w-]+)", flags):
            assert flag in usage, (name, flag)

    work, results = tmp_path / "work", tmp_path / "results"
    (work / "pretrain").mkdir(parents=True)
    results.mkdir()
    summary = {
        "sequences_per_second": 100.0,
        "tokens_per_second": 900.0,
        "steps": 60,
        "final_loss": 5.0,
        "first_loss": 9.0,
        "wall_seconds": 30.0,
    }
    (work / "pretrain" / "summary.json").write_text(json.dumps(summary))
    subprocess.run(
        [sys.executable, "-c", heredocs[1], str(work), str(results)], check=True, cwd=REPO
    )
    assert json.loads((results / "gpu_check.json").read_text()) == summary


def test_committed_results_hold_only_possible_roofline_fractions():
    """A roofline fraction is a share of the machine's matmul peak: in (0, 1] in every
    committed result file."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    impossible = []
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        for key, value in data.items() if isinstance(data, dict) else ():
            if key.endswith("roofline_fraction") and value is not None and not 0 < value <= 1:
                impossible.append(f"{path.name}: {key} = {value}")
    assert not impossible, impossible
