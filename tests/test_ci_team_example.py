"""examples/ci/github-actions-team.yml, run as GitHub would: each job on a runner of its own
(its own MLCLOUD_HOME, a process per step), `needs` and `if: always()` honoured, the state URL
and key from "secrets" naming a real PostgreSQL, against a moto server whose instances are
routed to loopback sshd nodes. The `uses:` steps are stood in for as in test_ci_example.py."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import relay_pool, run_cli
from test_ci_example import expand, live_instances

pytestmark = pytest.mark.e2e

WORKFLOW = Path(__file__).resolve().parents[1] / "examples" / "ci" / "github-actions-team.yml"


def run_jobs(project: Path, context: dict[str, str], env: dict[str, str], tmp: Path) -> dict:
    """Every job in order of its needs, each in a fresh home; job -> (result, steps)."""
    doc = yaml.safe_load(WORKFLOW.read_text())
    results: dict[str, tuple[str, list[dict]]] = {}
    for name, job in doc["jobs"].items():
        needs = job.get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        assert all(n in results for n in needs), name  # listed after what it needs
        wanted = job.get("if") == "always()" or all(results[n][0] == "success" for n in needs)
        if not wanted:
            results[name] = ("skipped", [])
            continue
        runner = {**context, "runner.temp": str(tmp / f"runner-{name}")}
        (tmp / f"runner-{name}").mkdir()
        job_env = {k: expand(v, runner) for k, v in {**doc["env"], **job.get("env", {})}.items()}
        steps, ok = [], True
        for step in job["steps"]:
            if "uses" in step or step.get("name") == "Install mlcloud":
                continue  # this checkout is installed in the test's virtualenv
            r = subprocess.run(
                ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                cwd=project,
                env={**env, **job_env},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=600,
            )
            steps.append({"name": step["name"], "code": r.returncode, "out": r.stdout + r.stderr})
            ok = ok and r.returncode == 0
        results[name] = ("success" if ok else "failure", steps)
    return results


@pytest.mark.parametrize("script", [None, "import sys\nprint('bad data')\nsys.exit(3)\n"])
def test_team_workflow_up_train_down_on_three_runners(
    script, moto_server, make_ssh_nodes, pg_url, tmp_path
):
    ssh = make_ssh_nodes(1)
    _, proxy = relay_pool(tmp_path, [n.host for n in ssh.nodes])
    project = tmp_path / "repo"
    assert run_cli("init", str(project)).returncode == 0
    spec = yaml.safe_load((project / "mlcloud.yaml").read_text())
    spec.update(provider="aws", nodes=1, resources={"instance_type": "g5.xlarge"})
    spec["train"]["args"] = ["--steps", "10"]
    (project / "mlcloud.yaml").write_text(yaml.safe_dump(spec))
    if script:
        (project / "train.py").write_text(script)
    flags = ["--identity", str(ssh.client_key), "--ssh-user", ssh.user]
    flags += ["--ssh-port", str(ssh.port), "--proxy-command", proxy]
    flags += ["--allow-ssh-from", "127.0.0.1/32"]
    context = {
        "github.run_id": "4242",
        "github.run_attempt": "1",
        "vars.MLCLOUD_UP_FLAGS": shlex.join(flags),
        "secrets.MLCLOUD_STATE_URL": pg_url,
        "secrets.MLCLOUD_STATE_KEY": "team-secret",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLCLOUD_STATE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    results = run_jobs(project, context, env, tmp_path)
    up, train, down = results["up"], results["train"], results["down"]
    assert up[0] == "success", up
    if script:
        assert train[0] == "failure" and "bad data" in train[1][0]["out"]
    else:
        assert train[0] == "success", train
        assert "done steps=10" in train[1][0]["out"]
    assert down[0] == "success", down
    assert live_instances() == 0
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
