"""Bootstrap over real OpenSSH nodes: the interpreter probe, output read by markers, and a
failed or interrupted `up` that leaves nothing stuck."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MLCLOUD, run_cli, ssh_up_args
from mlcloud.providers.base import ClusterRef, SshOptions
from mlcloud.providers.ssh import CLAIMS_LOCK, SshProvider

from mlcloud.provision import bootstrap
from mlcloud.remote.transport import RemoteError

NO_TORCH = "/usr/bin/python3"  # the system interpreter here, as on a Deep Learning AMI


@pytest.fixture
def ref(request):
    r = ClusterRef("boot", f"boot-{request.node.name[-20:].strip('[]_')}-{time.time_ns()}", "me")
    yield r
    shutil.rmtree(Path.home() / ".mlcloud" / r.uid, ignore_errors=True)


def boot(nodes, ref, **ssh):
    provider = SshProvider()
    found = [provider._node(ref, i, n.target) for i, n in enumerate(nodes.nodes)]
    options = SshOptions(identity_file=str(nodes.client_key), **ssh)
    return bootstrap.bootstrap(provider, ref, found, options)


def test_the_first_candidate_that_has_torch_is_recorded(make_ssh_nodes, ref, monkeypatch, tmp_path):
    nodes = make_ssh_nodes(2)
    assert subprocess.run([NO_TORCH, "-c", "import torch"], capture_output=True).returncode
    monkeypatch.setattr(
        SshProvider, "pythons", (str(tmp_path / "absent"), NO_TORCH, sys.executable)
    )
    records = boot(nodes, ref)
    assert [r.python for r in records] == [sys.executable] * 2


def test_ssh_python_is_the_only_one_tried(make_ssh_nodes, ref):
    nodes = make_ssh_nodes(1)
    with pytest.raises(RemoteError) as e:
        boot(nodes, ref, python=NO_TORCH)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"node0 ({nodes.hosts[0]})")
    assert f"tried {NO_TORCH})" in message and "ssh.python" in message
    assert boot(nodes, ref, python=sys.executable)[0].python == sys.executable


def test_a_chatty_login_is_ignored(make_ssh_nodes, ref):
    """A login that prints banners (a noisy ~/.bashrc) around the command's own output."""
    nodes = make_ssh_nodes(
        1,
        extra_config=(
            'ForceCommand echo "Welcome to the lab"; echo 3 lines; echo {}; '
            'bash -c "$SSH_ORIGINAL_COMMAND"; echo bye',
        ),
    )
    (rec,) = boot(nodes, ref)
    assert rec.python and Path(rec.root).name == "node-0" and rec.private_ip == nodes.hosts[0]


def test_output_without_markers_is_one_line_naming_the_node(make_ssh_nodes, ref):
    nodes = make_ssh_nodes(1, extra_config=('ForceCommand echo "this host runs menus only"',))
    with pytest.raises(RemoteError) as e:
        boot(nodes, ref)
    message = str(e.value)
    assert message.startswith(f"node0 ({nodes.hosts[0]}): bootstrap output not understood")
    assert "this host runs menus only" in message and "\n" not in message


def status() -> dict:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_status_shows_the_interpreter_and_down_json_says_what_went(make_ssh_nodes):
    nodes = make_ssh_nodes(1)
    r = run_cli(*ssh_up_args(nodes, "lab"))
    assert r.returncode == 0, r.stderr
    (node,) = status()["clusters"][0]["nodes"]
    assert Path(node["python"]).parent == Path(sys.executable).parent
    shown = run_cli("status", "lab").stdout
    assert "PYTHON" in shown.upper() and node["python"] in shown
    r = run_cli("down", "lab", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    (gone,) = json.loads(r.stdout)["clusters"]
    assert gone["name"] == "lab" and gone["status"] == "down"
    assert gone["provider"] == "ssh" and gone["nodes"] == [nodes.nodes[0].target]


def test_a_first_up_on_an_unreachable_host_leaves_nothing(make_ssh_nodes):
    nodes = make_ssh_nodes(1)
    r = run_cli(
        "up", "gone", "--hosts", f"127.0.0.250:{nodes.port}", "--identity", str(nodes.client_key)
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "127.0.0.250" in r.stderr.splitlines()[-1]
    assert status()["clusters"] == []
    r = run_cli(*ssh_up_args(nodes, "gone"))  # the name is free again
    assert r.returncode == 0, r.stderr


def test_a_first_up_refused_by_the_host_leaves_nothing(make_ssh_nodes):
    """Reachable, but the key is not accepted: nothing of the cluster's was ever put there."""
    from mlcloud.remote import keys

    nodes = make_ssh_nodes(1)
    wrong, _ = keys.ensure_cluster_key("not-authorized")
    r = run_cli("up", "nope", "--hosts", nodes.nodes[0].target, "--identity", str(wrong))
    assert r.returncode != 0 and "authentication refused" in r.stderr.splitlines()[-1]
    assert "Traceback" not in r.stderr
    assert status()["clusters"] == []


def test_a_corrupt_host_list_is_one_line_and_purge_forgets(make_ssh_nodes, mlcloud_home):
    nodes = make_ssh_nodes(1)
    assert run_cli(*ssh_up_args(nodes, "lab")).returncode == 0
    (registry,) = (mlcloud_home / "ssh").glob("*.json")
    registry.write_text('{"hosts": ["a')  # as a kill mid-write left it before writes were atomic
    r = run_cli("down", "lab", "--yes")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--purge" in r.stderr.splitlines()[-1] and str(registry) in r.stderr
    r = run_cli("down", "lab", "--yes", "--purge", "--json")
    shutil.rmtree(Path.home() / ".mlcloud" / registry.stem, ignore_errors=True)  # forgotten
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["clusters"][0]["status"] == "purged"
    assert status()["clusters"] == []


def test_the_host_list_is_replaced_whole(make_ssh_nodes, mlcloud_home):
    """Written beside and renamed over: a kill mid-write leaves the old file, never half."""
    nodes = make_ssh_nodes(1)
    assert run_cli(*ssh_up_args(nodes, "lab")).returncode == 0
    (registry,) = (mlcloud_home / "ssh").glob("*.json")
    before = registry.stat().st_ino
    provider, ref = SshProvider(), ClusterRef("lab", registry.stem, "me")
    provider._write(ref, provider._read(ref))
    assert registry.stat().st_ino != before
    # no temp file left beside it (the claims' lock file stays, as lock files do)
    assert [p.name for p in registry.parent.glob(".*")] == [CLAIMS_LOCK]
    assert run_cli("down", "lab", "--yes").returncode == 0


def test_sigterm_while_a_node_is_silent_starts_the_rollback_within_2s(make_ssh_nodes):
    """One host answers TCP but never speaks SSH: bootstrap would wait 15 s for it."""
    nodes = make_ssh_nodes(1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.249", 0))
        silent.listen(8)  # the kernel accepts; nobody ever says a word
        hosts = f"{nodes.nodes[0].target},{nodes.user}@127.0.0.249:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            [MLCLOUD, "up", "mute", "--hosts", hosts, "--identity", str(nodes.client_key)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "bootstrapping" in line:
                break
        time.sleep(1.0)
        proc.terminate()
        sent = time.monotonic()
        for line in proc.stderr:
            seen.append(line)
            if "removing what was created" in line:
                break
        assert time.monotonic() - sent < 2.0, "".join(seen)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, "".join(seen) + rest
    assert "Traceback" not in "".join(seen) + rest
    assert status()["clusters"] == []


def test_a_failing_proxy_command_is_one_line_without_paramiko_logs(make_ssh_nodes):
    nodes = make_ssh_nodes(1)
    r = run_cli(
        *ssh_up_args(nodes, "px"),
        "--proxy-command",
        "sh -c 'echo not-ssh; echo broken >&2; exit 3'",
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "Exception (client)" not in r.stderr, r.stderr
    assert status()["clusters"] == []


BOOTING = """
import sys, time
from mlcloud.providers.base import ClusterRef, SshOptions
from mlcloud.providers.ssh import SshProvider
from mlcloud.provision import bootstrap

class Booting(SshProvider):
    boot_timeout = 600.0  # as a cloud's: wait for sshd to come up

provider, ref = Booting(), ClusterRef("b", "b-1", "me")
nodes = [provider._node(ref, i, f"127.0.0.248:{port}") for i, port in enumerate(sys.argv[2:])]
print("waiting", flush=True)
t0 = time.monotonic()
try:
    bootstrap.bootstrap(provider, ref, nodes, SshOptions(identity_file=sys.argv[1]))
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - t0:.2f}", flush=True)
"""


@pytest.mark.parametrize("count", [1, 2])
def test_ctrl_c_while_waiting_for_ssh_returns_within_2s(count, tmp_path):
    """A cloud node that never answers: the 600 s wait for its sshd ends at Ctrl-C."""
    import signal

    from mlcloud.remote import keys

    key, _ = keys.ensure_cluster_key("booting")
    proc = subprocess.Popen(
        [sys.executable, "-c", BOOTING, str(key), *["1"] * count],  # port 1: refused
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "waiting\n"
    time.sleep(3)  # well into the retries
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    took = float(out.split("interrupted after ")[1].split()[0])
    assert took < 3 + 2


def test_a_wrong_login_user_is_told_soon_not_at_the_boot_timeout(make_ssh_nodes, monkeypatch):
    """A booting cloud node refuses the key until cloud-init installs it, so refusals are
    waited out, but only briefly: a wrong user is an error long before the 600 s boot wait."""
    from mlcloud.providers.base import ClusterRef, SshOptions
    from mlcloud.providers.ssh import SshProvider

    from mlcloud.remote.transport import RemoteError

    class Booting(SshProvider):
        boot_timeout = 600.0

    monkeypatch.setattr(bootstrap, "AUTH_WINDOW", 3.0)
    nodes = make_ssh_nodes(1)
    node = nodes.nodes[0]
    provider, ref = Booting(), ClusterRef("wrong", "wrong-1", "me")
    targets = [provider._node(ref, 0, f"nosuchuser@{node.host}:{node.port}")]
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="authentication refused for user 'nosuchuser'"):
        bootstrap.bootstrap(provider, ref, targets, SshOptions(identity_file=str(nodes.client_key)))
    assert time.monotonic() - t0 < 3.0 + 10
