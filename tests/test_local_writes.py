"""This machine's file system refusing a write is one line, never a bug report: `pull` into a
read-only DEST, a full one, one where a directory stands in the way (of a file, of the
manifest, of a temporary); the free-space check counts the manifest. And every name the file
system allows travels: 255-byte names through `train`'s workdir sync and `pull`. Disk cases
mount tmpfs (root; CI runs as root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from mlcloud.templates.receive import is_tmp, tmp_name

from mlcloud import templates
from mlcloud.remote import fetch

LONG = "L" * 255  # the longest name ext4, xfs and tmpfs take


@pytest.fixture
def job(mlcloud_home):
    """A one-node local cluster with job 1's outputs on its node: (outputs dir, pull args)."""
    from mlcloud import state
    from mlcloud.state import paths

    assert run_cli("up", "lw", "--provider", "local", "--yes").returncode == 0
    store = state.open_store()
    rec = store.get_cluster("lw")
    j = store.new_job("lw", rec.uid, "train.py", 1, 1, paths.logs_dir("lw"))
    store.update_job("lw", rec.uid, j.job_id, status=state.JOB_SUCCEEDED, ended=time.time())
    store.close()
    out = Path(rec.nodes[0].root) / "jobs" / "1" / "outputs"
    out.mkdir(parents=True)
    (out / "weights.bin").write_bytes(os.urandom(300_000))
    (out / LONG).write_text("a long name")
    yield out
    run_cli("down", "--all", "--yes")


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs (root only, else skipped); all unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made: list[Path] = []

    def make(options: str) -> Path:
        mnt = tmp_path / f"mnt{len(made)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)])
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        made.append(mnt)
        return mnt

    yield make
    for mnt in made:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def refused(r, *words: str) -> dict:
    """One error line (exit 1) naming the words, and --json's kind `environment`."""
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr and "internal" not in r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    doc = json.loads(r.stdout)["error"]
    assert doc["kind"] == "environment" and doc["exit_code"] == 1
    return doc


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if is_tmp(p.name)]


def test_pull_into_a_read_only_dest_is_one_line(job, mount, tmp_path):
    ro = mount("size=1m,ro")
    r = run_cli("pull", "lw", str(ro), "--json")
    refused(r, str(ro / "node0"), "read-only file system")

    # DEST was pulled into before, then its file system became read-only
    rw = mount("size=4m")
    assert run_cli("pull", "lw", str(rw)).returncode == 0
    (job / "more.bin").write_bytes(b"new")
    subprocess.run(["mount", "-o", "remount,ro", str(rw)], check=True)
    refused(run_cli("pull", "lw", str(rw), "--json"), str(rw / "node0"), "read-only")
    assert sorted(p.name for p in (rw / "node0").iterdir()) == sorted(
        [fetch.MANIFEST, "weights.bin", LONG]
    )


def test_pull_into_a_full_disk_is_refused_up_front_manifest_included(job, mount):
    small = mount("size=256k")
    r = run_cli("pull", "lw", str(small), "--json")
    refused(r, "to write into", "free there", str(small / "node0"))
    assert leftovers(small) == [] and not (small / "node0" / "weights.bin").exists()

    # the files fit to the byte, the manifest written after them does not
    st = os.statvfs(small)
    (job / "weights.bin").write_bytes(b"w" * (st.f_bavail * st.f_frsize - 4096))
    r = run_cli("pull", "lw", str(small), "--json")
    refused(r, "free there")
    assert leftovers(small) == []


def test_pull_out_of_inodes_midway_is_one_line(job, mount):
    few = mount("size=4m,nr_inodes=4")  # the root, node0, one file: then no more
    r = run_cli("pull", "lw", str(few), "--json")
    refused(r, str(few / "node0"), "No space left on device")
    assert leftovers(few) == []


@pytest.mark.parametrize(
    "blocker",
    [fetch.MANIFEST, tmp_name(fetch.MANIFEST), "weights.bin", tmp_name("weights.bin")],
)
def test_a_directory_in_the_way_is_named(job, tmp_path, blocker):
    dest = tmp_path / "res"
    (dest / "node0" / blocker / "keep").mkdir(parents=True)
    before = len(os.listdir("/proc/self/fd"))
    r = run_cli("pull", "lw", str(dest), "--json")
    doc = refused(r, str(dest / "node0"), repr(blocker))
    assert "is a directory" in doc["message"] or "in the way" in doc["message"]
    assert (dest / "node0" / blocker / "keep").is_dir()  # nothing of the user's is removed
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_manifest_that_is_a_directory_leaks_no_descriptor(tmp_path):
    """Read as missing, in this process: the descriptor opened to look is closed."""
    from mlcloud.templates.receive import Tree

    (tmp_path / fetch.MANIFEST).mkdir()
    tree = Tree(str(tmp_path))
    before = len(os.listdir("/proc/self/fd"))
    assert tree.read(fetch.MANIFEST) is None
    assert len(os.listdir("/proc/self/fd")) == before
    tree.close()


LONG_JOB = f"""\
import os, pathlib
here = pathlib.Path({LONG!r})
assert here.read_text() == "shipped", "the workdir's long name did not arrive"
out = pathlib.Path(os.environ["MLCLOUD_OUTPUT_DIR"])
(out / {LONG!r}).write_text("home")
(out / "short.txt").write_text("also home")
"""


def test_the_longest_names_travel_both_ways(mlcloud_home, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.py").write_text(LONG_JOB)
    (work / LONG).write_text("shipped")
    assert run_cli("up", "names", "--provider", "local", "--yes").returncode == 0
    dest = tmp_path / "res"
    r = run_cli("train", "names", "-w", str(work), f"--pull={dest}", "job.py", "--down")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (dest / "node0" / LONG).read_text() == "home"
    assert (dest / "node0" / "short.txt").read_text() == "also home"
    assert leftovers(dest) == []


def test_a_job_that_never_started_has_no_outputs_to_warn_about(mlcloud_home, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.py").write_text("print('never runs')\n")
    (work / "mlcloud.yaml").write_text("setup: exit 7\n")
    assert run_cli("up", "never", "--provider", "local", "--yes").returncode == 0
    r = run_cli("train", "never", "-f", str(work / "mlcloud.yaml"), "-w", str(work), "job.py")
    assert r.returncode != 0
    jobs = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["jobs"]
    assert jobs[-1]["status"] == "FAILED"
    r = run_cli("down", "never", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["clusters"][0]["unpulled_job"] is None
    assert "never pulled" not in r.stderr


def test_train_pull_down_keeps_the_jobs_own_code_and_the_cluster(mlcloud_home, mount, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.py").write_text(
        "import os, pathlib, sys\n"
        "(pathlib.Path(os.environ['MLCLOUD_OUTPUT_DIR']) / 'model.pt').write_text('m')\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    assert run_cli("up", "keep", "--provider", "local", "--yes").returncode == 0
    ro = mount("size=1m,ro")
    for code in (3, 0):  # the job's own code; a job that succeeded: the pull's failure, 1
        r = run_cli(
            "train", "keep", "-w", str(work), f"--pull={ro}", "--down", "job.py", "--", str(code)
        )
        assert r.returncode == (code or 1), r.stdout + r.stderr
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr
        warning = next(line for line in r.stderr.splitlines() if "outputs failed" in line)
        assert "read-only" in warning and "--down was not done" in warning
        assert "the cluster is kept" in warning
        status = json.loads(run_cli("status", "--json").stdout)["clusters"]
        assert [c["name"] for c in status] == ["keep"]
    dest = tmp_path / "res"
    assert run_cli("pull", "keep", str(dest)).returncode == 0
    assert (dest / "node0" / "model.pt").read_text() == "m"
    assert run_cli("down", "keep", "--yes").returncode == 0


def test_the_nodes_receiver_takes_the_longest_names(tmp_path):
    """What a node runs for `train`'s workdir sync (templates/receive.py), fed a stream as
    mlcloud/remote/sync.py packs it: a 255-byte name lands, and its temporary is gone."""
    from mlcloud.remote import sync

    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "deep").mkdir(parents=True)
    (src / LONG).write_text("top")
    (src / "deep" / LONG).write_text("below")
    local = sync.scan(src)
    send, delete = sync.diff(local, {})
    stream = sync.pack(src, send, delete, local)
    r = subprocess.run(
        [sys.executable, "-I", "-S", str(templates.path("receive.py")), str(dest)],
        input=stream,
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    assert (dest / LONG).read_text() == "top" and (dest / "deep" / LONG).read_text() == "below"
    assert leftovers(dest) == []


def test_a_state_write_on_a_full_disk_names_its_file_and_leaves_no_temporary(mount):
    from mlcloud.cli.failures import describe

    from mlcloud.state import atomic

    full = mount("size=64k")
    st = os.statvfs(full)
    (full / "fill").write_bytes(b"f" * ((st.f_bavail - 1) * st.f_frsize))
    with pytest.raises(OSError) as info:
        atomic.write(full / "request.json", b"r" * 100_000)
    failure = describe(info.value)
    assert failure.kind == "environment" and str(full / "request.json") in failure.message
    assert sorted(p.name for p in full.iterdir()) == ["fill"]


def test_the_longest_names_travel_over_ssh(make_ssh_nodes, tmp_path):
    """The same through real sshd nodes: the node's receiver (and the relay's) for the
    workdir, its sender for the outputs."""
    from conftest import ssh_up_args

    nodes = make_ssh_nodes(2)
    assert run_cli(*ssh_up_args(nodes, "far")).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.py").write_text(LONG_JOB)
    (work / LONG).write_text("shipped")
    dest = tmp_path / "res"
    r = run_cli("train", "far", "-w", str(work), f"--pull={dest}", "job.py", "--down")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    for i in (0, 1):
        assert (dest / f"node{i}" / LONG).read_text() == "home"
    assert leftovers(dest) == []
