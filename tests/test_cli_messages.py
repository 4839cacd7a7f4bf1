"""What the command line prints: starter configs, one ``error:`` line (rc 2) instead of a
traceback for the mistakes users make first, and pretraining's progress line."""

from __future__ import annotations

import pytest
import yaml

from pretrain.worker import progress_line
from recipes.cli import STARTER_JOBS, main
from unisrec.config import load_config
from unisrec.errors import ConfigError
from unisrec.jobs import config_class
from unisrec.runtime import free_port


@pytest.mark.parametrize("job", STARTER_JOBS)
def test_config_init_prints_a_commented_starter_that_loads(job, tmp_path, capsys):
    assert main(["config", "init", job]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#") and text.count("#") >= 10
    path = tmp_path / f"{job}.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)
    load_config(config_class(job), path)  # every key is a real one with a valid value


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_config_show_of_a_missing_file(capsys):
    assert "config file not found: nope.yaml" in one_error_line(
        capsys, ["config", "show", "nope.yaml"]
    )


def test_recommend_for_a_tenant_without_a_model_names_the_store_and_says_to_finetune(
    capsys, tmp_path
):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    line = one_error_line(
        capsys, ["recommend", "--tenant", "ghost", "--history", "a", "--tracking-uri", store]
    )
    assert f"no registered model 'unisrec-adaptor-ghost' in {store}" in line
    assert "unisrec finetune" in line
    # Asking an empty place creates no store there (nor MLflow's table-creation log lines).
    assert not (tmp_path / "mlflow.db").exists()


def test_submit_without_a_cluster_says_how_to_start_one(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ft.yaml").write_text("tenant: a\ndata: {domain: a}\n")
    address = f"http://127.0.0.1:{free_port()}"
    line = one_error_line(capsys, ["submit", "--address", address, "finetune", "ft.yaml"])
    assert "no Ray cluster answers" in line and "ray start --head" in line


def test_a_bad_per_tenant_override_names_the_tenant(capsys, tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text(
        "data: {dir: nowhere, domain: a}\n"
        "tenants:\n  - name: good\n  - name: bad\n    overrides: {optim.lrr: 1}\n"
    )
    line = one_error_line(capsys, ["finetune", str(config), "--tenants", "good,bad"])
    assert "tenants[bad].overrides" in line and "did you mean 'optim.lr'" in line


def test_an_encoder_that_is_not_local_says_downloads_are_off_and_how_to_allow_them(monkeypatch):
    from sharding.text_encoder import model_dim

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        model_dim("some-org/not-a-local-model")
    message = str(err.value)
    assert "HF_HUB_OFFLINE=0" in message and "\n" not in message


def test_progress_line_counts_steps_and_estimates_the_time_left():
    line = progress_line(40, 240, 1, 3.21012, 61.23, seconds_per_step=1.5)
    # 200 steps left at 1.5 s a step: 300 s.
    assert line == "step 40/240 (17%) epoch 1 loss 3.2101 61.2 seq/s ETA 5m00s"


def test_the_demos_next_commands_are_commands_the_cli_takes(tmp_path, monkeypatch):
    import shlex

    from recipes.cli import build_parser
    from recipes.demo import next_commands

    monkeypatch.chdir(tmp_path)
    lines = next_commands(tmp_path / "runs" / "demo", "sqlite:///x.db", "crafts", ["a", "b"])
    assert lines[0] == "export MLFLOW_TRACKING_URI=sqlite:///x.db"
    parser = build_parser()
    for line in lines[1:]:
        program, *argv = shlex.split(line)
        assert program.endswith("unisrec"), line
        args = parser.parse_args(argv)  # exits (SystemExit) on an option the CLI lacks
        assert getattr(args, "tenant", "crafts") == "crafts"
    assert "--history a,b" in lines[2] and "runs/demo/recs-crafts.parquet" in lines[3]
