"""The cluster side: job submission through Ray Jobs, DeepSpeed presets, ray_cluster.yaml.

The live tests start a real single-node Ray head with its dashboard (the Ray Jobs server),
bound to 127.0.0.1 only, in a temp dir of its own: a plain ``ray.init()`` elsewhere on the
machine does not find it, and ``ray stop`` (which would end every Ray on the machine) is not
needed to end it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cluster.commands import register_commands
from cluster.jobs import EXCLUDES, JobSpec, follow, job_spec, runtime_env, submit, wait
from pretrain.deepspeed_presets import PRESETS, deepspeed_config, preset, preset_overrides
from unisrec.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RAY_HEADS: dict[str, Path] = {}  # dashboard address -> the head's temp directory
VENV_BIN = Path(sys.executable).parent


def run_cli(argv: list[str]) -> int:
    """``unisrec ARGV`` with only the cluster sub-commands registered."""
    parser = argparse.ArgumentParser(prog="unisrec")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def write_config(directory: Path, name: str = "pretrain.yaml", **values) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


# --- building a job (no cluster) ------------------------------------------------------------


def test_job_spec_runs_the_cli_on_the_config_relative_to_the_uploaded_dir(tmp_path):
    config = write_config(tmp_path / "configs", optim={"lr": 0.01})
    spec = job_spec(
        "pretrain",
        config,
        ["data.dir=/mnt/shared/my data", "--num-workers", "4"],
        working_dir=tmp_path,
        tracking_uri="http://10.0.1.5:5000",
    )
    assert spec.entrypoint == (
        "python -m recipes.cli pretrain configs/pretrain.yaml "
        "'data.dir=/mnt/shared/my data' --num-workers 4"
    )
    assert spec.runtime_env == {
        "working_dir": str(tmp_path.resolve()),
        "excludes": EXCLUDES,
        "env_vars": {"MLFLOW_TRACKING_URI": "http://10.0.1.5:5000"},
    }
    assert spec.metadata == {"unisrec.job": "pretrain", "unisrec.config": "configs/pretrain.yaml"}


def test_runtime_env_adds_pip_and_env_only_when_asked(tmp_path):
    assert set(runtime_env(tmp_path)) == {"working_dir", "excludes"}
    env = runtime_env(tmp_path, env={"HF_HUB_OFFLINE": "1"}, pip=["polars==1.0"])
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1"}
    assert env["pip"] == ["polars==1.0"]


def test_a_config_outside_the_working_dir_is_refused(tmp_path):
    config = write_config(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside the working directory"):
        job_spec("pretrain", config, working_dir=tmp_path / "project")
    with pytest.raises(ConfigError, match="not found"):
        job_spec("pretrain", tmp_path / "missing.yaml", working_dir=tmp_path)
    with pytest.raises(ValueError, match="job"):
        job_spec("train", config, working_dir=tmp_path)


def test_submit_checks_the_config_before_contacting_the_cluster(tmp_path):
    config = write_config(tmp_path, optim={"lr": 0.01})
    closed = "http://127.0.0.1:9"  # nothing listens: reaching it would fail differently
    with pytest.raises(ConfigError, match="optim.lrr"):
        run_cli(
            [
                "submit",
                "--address",
                closed,
                "--working-dir",
                str(tmp_path),
                "pretrain",
                str(config),
                "optim.lrr=1",
            ]
        )
    with pytest.raises(ConfigError, match="only pretrain"):
        run_cli(["submit", "--address", closed, "--deepspeed", "zero3", "shard", str(config)])


def test_submit_sends_the_users_credentials_as_a_private_file_not_in_the_environment(
    tmp_path, monkeypatch
):
    import configparser
    import stat

    import cluster.jobs
    from unisrec.access import CREDENTIALS_FILE, CREDENTIALS_PACKAGE_ENV, SETUP_HOOK

    sent: list[tuple[JobSpec, dict]] = []

    def fake_submit(address, spec, **_):
        """What Ray would upload: the package's file, while the upload happens."""
        (package,) = spec.runtime_env["py_modules"]
        path = Path(package, CREDENTIALS_FILE)
        config = configparser.ConfigParser(interpolation=None)
        config.read(path)
        modes = (stat.S_IMODE(Path(package).stat().st_mode), stat.S_IMODE(path.stat().st_mode))
        sent.append((spec, {"file": dict(config["mlflow"]), "modes": modes, "path": path}))
        return "j1"

    monkeypatch.setattr(cluster.jobs, "submit", fake_submit)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "acme")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "acme-secret-1")
    args = ["submit", "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path)]
    run_cli([*args, "recommend-batch", "--tenant", "acme", "--users", "u.parquet", "--out", "r"])
    spec, upload = sent[-1]
    assert "acme-secret-1" not in repr(spec)  # not in env_vars, entrypoint or metadata
    package = Path(spec.runtime_env["py_modules"][0]).name
    assert spec.runtime_env["env_vars"] == {CREDENTIALS_PACKAGE_ENV: package}
    assert spec.runtime_env["worker_process_setup_hook"] == SETUP_HOOK
    assert upload["file"] == {
        "mlflow_tracking_username": "acme",
        "mlflow_tracking_password": "acme-secret-1",
    }
    assert upload["modes"] == (0o700, 0o600)
    assert not upload["path"].exists()  # removed once uploaded


# --- ray_cluster.yaml -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text(encoding="utf-8"))


def test_cluster_yaml_passes_the_launchers_own_schema(cluster_yaml):
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(
        cluster_yaml
    )
    validate_config(prepare_config(copy.deepcopy(cluster_yaml)))  # raises on a wrong key or type
    head = cluster_yaml["available_node_types"][cluster_yaml["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training on the head
    assert cluster_yaml["provider"]["type"] == "aws"


def test_cluster_yaml_starts_mlflow_where_the_workers_look_for_it(cluster_yaml):
    (setup,) = [c for c in cluster_yaml["head_setup_commands"] if "mlflow-server" in c]
    server_args = setup.split("unisrec mlflow-server", 1)[1].split(">", 1)[0].split()
    parser = argparse.ArgumentParser(prog="unisrec")
    register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mlflow-server", *server_args])
    assert args.root.startswith("/mnt/shared/")  # survives `ray down`
    worker_start = " ".join(cluster_yaml["worker_start_ray_commands"])
    head_start = " ".join(cluster_yaml["head_start_ray_commands"])
    assert f"MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:{args.port}" in worker_start
    assert f":{args.port};" in head_start and "MLFLOW_TRACKING_URI" in head_start


# --- DeepSpeed presets -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_is_what_pretraining_builds_from_its_overrides(name):
    from pretrain.config import PretrainConfig
    from pretrain.worker import deepspeed_config as worker_deepspeed_config
    from unisrec.config import load_config

    cfg = load_config(PretrainConfig, None, preset_overrides(name) + ["data.batch_size=64"])
    assert worker_deepspeed_config(cfg) == preset(name, 64, cfg.optim.grad_clip)


def test_presets_cover_every_stage_in_both_precisions():
    assert PRESETS["zero2"] == (2, "fp32")
    assert PRESETS["zero3-bf16"] == (3, "bf16")
    assert sorted(PRESETS.values()) == [(s, p) for s in range(4) for p in ("bf16", "fp32")]
    # explicit off: without the key DeepSpeed would clip at 1.0
    assert deepspeed_config(2, "fp32", 8, grad_clip=0.0)["gradient_clipping"] == 0.0
    with pytest.raises(ValueError):
        deepspeed_config(4, "fp32", 8)
    with pytest.raises(ValueError):
        deepspeed_config(2, "fp16", 8)


def test_deepspeed_preset_command_prints_the_config_json(capsys):
    import json

    assert run_cli(["deepspeed-preset", "zero2-bf16", "--micro-batch", "32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["zero_optimization"] == {"stage": 2}
    assert printed["bf16"] == {"enabled": True}
    assert printed["train_micro_batch_size_per_gpu"] == 32


@pytest.mark.slow
def test_every_preset_initialises_deepspeed_and_trains_a_step(tmp_path):
    """In a child process: DeepSpeed sets up a process group that would outlive the test."""
    script = tmp_path / "check.py"
    script.write_text(
        "import torch, deepspeed\n"
        "from pretrain.deepspeed_presets import PRESETS, preset\n"
        "for name in PRESETS:\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Linear(8, 1)\n"
        "    opt = torch.optim.AdamW(model.parameters(), lr=0.1)\n"
        "    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=preset(name, 4, 1.0))\n"
        "    x = torch.randn(4, 8).to(next(engine.module.parameters()).dtype)\n"
        "    first = None\n"
        "    for _ in range(5):\n"
        "        loss = engine(x).float().pow(2).mean()\n"
        "        engine.backward(loss)\n"
        "        engine.step()\n"
        "        first = first or loss.item()\n"
        "    assert loss.item() < first, (name, first, loss.item())\n"
        "    print('trained', name, flush=True)\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [
        line.split()[1] for line in done.stdout.splitlines() if line.startswith("trained")
    ] == list(PRESETS)


# --- a live Ray head ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A loopback Ray head with the Jobs server; yields the dashboard address (its temp
    directory: ``RAY_HEADS[address]``)."""
    import psutil

    # A short temp dir: Ray's socket paths under it must stay below the 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    dashboard = free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # `python` in entrypoints = this venv
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep every Ray process on 127.0.0.1
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        f"--port={free_port()}", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}", "--num-cpus=1",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    head = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    RAY_HEADS[address] = Path(temp_dir)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Ray head did not start in 120 s"
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        yield address
    finally:
        # `ray start --block` ends the node's processes on SIGTERM; kill what outlives it.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        session = [p for p in psutil.process_iter() if _in_session(p.pid, head.pid)]
        _, alive = psutil.wait_procs(session, timeout=10)
        for process in alive:
            process.kill()
        head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _in_session(pid: int, session: int) -> bool:
    try:
        return os.getsid(pid) == session
    except OSError:
        return False


@pytest.mark.slow
def test_a_job_runs_the_uploaded_code_with_the_given_environment(ray_head):
    probe = (
        "import os, unisrec.config; "
        "print('code from', os.path.dirname(os.path.dirname(unisrec.config.__file__))); "
        "print('tracking', os.environ['MLFLOW_TRACKING_URI'])"
    )
    spec = JobSpec(
        entrypoint=f'python -c "{probe}"',
        runtime_env=runtime_env(REPO, tracking_uri="http://10.0.1.5:5000"),
    )
    job_id = submit(ray_head, spec)
    out = io.StringIO()
    assert follow(ray_head, job_id, out) == "SUCCEEDED"
    logs = dict(
        line.split(" ", 1)
        for line in out.getvalue().splitlines()
        if line.startswith(("code", "tracking"))
    )
    assert logs["tracking"] == "http://10.0.1.5:5000"
    # The job imported the uploaded copy of the repository, not the checkout itself.
    assert "working_dir_files" in logs["code"] and Path(logs["code"].split()[-1]) != REPO


@pytest.mark.slow
def test_submit_command_runs_the_job_and_reports_its_failure(ray_head, tmp_path, capsys):
    missing = tmp_path / "no-dataset"
    config = write_config(
        tmp_path / "project", data={"dir": str(missing)}, output_dir=str(tmp_path / "out")
    )
    argv = [
        "submit",
        "--address",
        ray_head,
        "--working-dir",
        str(tmp_path / "project"),
        "--deepspeed",
        "zero1",
        "--wait",
    ]
    code = run_cli([*argv, "pretrain", str(config), "optim.lr=0.01"])

    printed = capsys.readouterr().out
    assert code == 1, printed
    expected = "python -m recipes.cli pretrain pretrain.yaml optim.lr=0.01 distributed.zero_stage=1 distributed.precision=fp32"
    assert "Running entrypoint for job raysubmit_" in printed and expected in printed
    # The job found its config in the uploaded directory and failed on the missing dataset.
    assert str(missing / "manifest.json") in printed
    assert printed.rstrip().endswith("FAILED")


@pytest.mark.slow
def test_a_submitted_job_and_its_workers_call_as_the_user_without_its_password_in_ray(
    ray_head, tmp_path, monkeypatch
):
    from helpers_secrets import ray_places_holding

    import cluster.jobs
    from cluster.mlflow_server import AuthSettings, start_server, stop_server

    secret = "jobuser-password-0001"
    server = start_server(tmp_path / "mlflow", auth=AuthSettings("admin-password-0001"))
    try:
        _as_admin_create_user(server.url, "admin-password-0001", "jobuser", secret)
        submitted = []

        def submit_probe(address, spec, **kwargs):
            """`unisrec submit` as it is, running the probe instead of the job."""
            probe = f"python tests/helpers_job_probe.py {server.url}"
            submitted.append(submit(address, JobSpec(probe, spec.runtime_env), **kwargs))
            return submitted[-1]

        monkeypatch.setattr(cluster.jobs, "submit", submit_probe)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "jobuser")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
        run_cli(["submit", "--address", ray_head, "--working-dir", str(REPO), "recommend-batch",
                 "--tenant", "acme", "--users", "u.parquet", "--out", "r"])  # fmt: skip
        out = io.StringIO()
        status = follow(ray_head, submitted[-1], out)
        assert status == "SUCCEEDED", out.getvalue()[-3000:]
        (line,) = [x for x in out.getvalue().splitlines() if x.startswith("PROBE ")]
        assert json.loads(line.removeprefix("PROBE ")) == {
            "cli_exit": 0,
            "driver_user": "jobuser",
            "worker_user": "jobuser",
            "worker_has_password": True,
            "command_lines_with_password": 0,
        }
        assert secret not in out.getvalue()
        assert ray_places_holding(secret, ray_head, RAY_HEADS[ray_head] / "session_latest") == []
    finally:
        stop_server(server)


def _as_admin_create_user(url: str, admin_password: str, username: str, password: str) -> None:
    """Create a user on the tracking server at ``url``, calling as its admin."""
    import requests

    answer = requests.post(
        f"{url}/api/2.0/mlflow/users/create",
        json={"username": username, "password": password},
        auth=("admin", admin_password),
        timeout=60,
    )
    assert answer.status_code == 200, answer.text


@pytest.mark.slow
def test_wait_gives_up_after_its_timeout(ray_head):
    job_id = submit(ray_head, JobSpec("sleep 30", runtime_env={}))
    try:
        with pytest.raises(TimeoutError):
            wait(ray_head, job_id, timeout_s=1, poll_s=0.2)
    finally:
        from ray.job_submission import JobSubmissionClient

        JobSubmissionClient(ray_head).stop_job(job_id)
        assert wait(ray_head, job_id, timeout_s=60) == "STOPPED"
