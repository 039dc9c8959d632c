"""examples/ci/github-actions.yml, run as GitHub would run its `run:` steps (bash, in order,
`if: failure() || cancelled()` honoured), against a moto server whose instances are routed to
loopback sshd nodes. The `uses:` steps are stood in for by the test: the checkout is a project
from `mlcloud init`, Python and mlcloud are this virtualenv, the credentials are moto's."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from conftest import relay_pool, run_cli

pytestmark = pytest.mark.e2e

WORKFLOW = Path(__file__).resolve().parents[1] / "examples" / "ci" / "github-actions.yml"


def live_instances() -> int:
    """The workflow's cluster's instances still up (moto's state outlives one server)."""
    out = boto3.client("ec2", region_name="us-east-1").describe_instances(
        Filters=[
            {"Name": "tag:mlcloud-name", "Values": ["ci-4242-1"]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )
    return sum(len(r["Instances"]) for r in out["Reservations"])


def expand(text: str, context: dict[str, str]) -> str:
    """`${{ expr }}` as GitHub evaluates the few the workflow uses; any other is an error."""

    def one(m: re.Match) -> str:
        return context[m.group(1).strip()]

    return re.sub(r"\$\{\{(.+?)\}\}", one, str(text))


def run_workflow(project: Path, context: dict[str, str], env: dict[str, str]) -> list[dict]:
    """Run the job's `run:` steps; return what each did (name, ran, exit code, output)."""
    doc = yaml.safe_load(WORKFLOW.read_text())
    (job,) = doc["jobs"].values()
    job_env = {k: expand(v, context) for k, v in job.get("env", {}).items()}
    failed = False
    done = []
    for step in job["steps"]:
        if "uses" in step:
            continue
        assert "run" in step, step
        if step.get("name") == "Install mlcloud":
            assert step["run"].startswith("python -m pip install mlcloud")
            continue  # this checkout is installed in the test's virtualenv
        condition = step.get("if", "success()")
        wanted = {
            "success()": not failed,
            "failure() || cancelled()": failed,
            "always()": True,
        }[condition]
        if not wanted:
            done.append({"name": step["name"], "ran": False})
            continue
        script = expand(step["run"], context)
        r = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
            cwd=project,
            env={**env, **job_env, **step.get("env", {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        failed = failed or r.returncode != 0
        done.append(
            {
                "name": step["name"],
                "ran": True,
                "code": r.returncode,
                "stdout": r.stdout,
                "stderr": r.stderr,
            }
        )
    return done


@pytest.fixture
def ci(moto_server, make_ssh_nodes, tmp_path, mlcloud_home):
    """(project, runner) for a workflow run over N nodes; the runner returns its steps."""

    def make(nodes: int, script: str | None = None):
        ssh = make_ssh_nodes(nodes)
        _, proxy = relay_pool(tmp_path, [n.host for n in ssh.nodes])
        project = tmp_path / "repo"
        assert run_cli("init", str(project)).returncode == 0
        spec = yaml.safe_load((project / "mlcloud.yaml").read_text())
        spec.update(provider="aws", nodes=nodes, resources={"instance_type": "g5.xlarge"})
        spec["train"]["args"] = ["--steps", "20"]
        (project / "mlcloud.yaml").write_text(yaml.safe_dump(spec))
        if script is not None:
            (project / "train.py").write_text(script)
        flags = shlex.join(
            [
                "--identity",
                str(ssh.client_key),
                "--ssh-user",
                ssh.user,
                "--ssh-port",
                str(ssh.port),
                "--proxy-command",
                proxy,
                "--allow-ssh-from",
                "127.0.0.1/32",
            ]
        )
        # the workflow's MLCLOUD_HOME is the test's, so the fixtures clean up after a failure
        (tmp_path / "runner-temp").mkdir()
        mlcloud_home.mkdir(mode=0o700)
        (tmp_path / "runner-temp" / "mlcloud").symlink_to(mlcloud_home)
        context = {
            "github.run_id": "4242",
            "github.run_attempt": "1",
            "vars.MLCLOUD_UP_FLAGS": flags,
            "runner.temp": str(tmp_path / "runner-temp"),
        }
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        return project, lambda: run_workflow(project, context, env)

    return make


def test_workflow_trains_and_leaves_nothing(ci):
    project, run = ci(2)
    steps = run()
    by_name = {s["name"]: s for s in steps}
    up = by_name["Create the cluster"]
    assert up["code"] == 0, up["stderr"]
    cluster = json.loads((project / "cluster.json").read_text())
    assert cluster["name"] == "ci-4242-1" and cluster["num_nodes"] == 2
    train = by_name["Train, then tear the cluster down"]
    assert train["code"] == 0, train["stdout"][-2000:] + train["stderr"]
    assert "done steps=20 world_size=4" in train["stdout"]
    assert by_name["Tear down on failure"] == {"name": "Tear down on failure", "ran": False}
    assert live_instances() == 0  # `train --down`


def test_failed_training_fails_the_workflow_and_tears_down(ci):
    project, run = ci(1, script="import sys\nprint('bad data')\nsys.exit(3)\n")
    steps = run()
    by_name = {s["name"]: s for s in steps}
    assert by_name["Create the cluster"]["code"] == 0
    train = by_name["Train, then tear the cluster down"]
    assert train["code"] != 0 and "bad data" in train["stdout"]
    down = by_name["Tear down on failure"]
    assert down["ran"] and down["code"] == 0, down.get("stderr")
    assert live_instances() == 0
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
