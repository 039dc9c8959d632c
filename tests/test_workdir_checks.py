"""`train` refuses, in one line and before a job exists or a byte is sent, a workdir that is too
large to ship or holds what cannot be read; the spec's max_workdir_* keys raise the limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.fixture
def cluster(mlcloud_home) -> Path:
    """A one-node local cluster; returns the directory its node syncs into."""
    r = run_cli("up", "wd", "--yes")
    assert r.returncode == 0, r.stderr
    uid = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["uid"]
    yield mlcloud_home / "local" / uid / "node-0" / "workdir"
    run_cli("down", "wd", "--yes")


def project(root: Path, files: int = 1) -> Path:
    root.mkdir()
    (root / "train.py").write_text("print('trained')\n")
    for i in range(files - 1):
        (root / f"data-{i}.txt").write_text("x")
    return root


def refused(r, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line, no traceback
    for w in words:
        assert w in lines[0], lines[0]


def no_job_and_nothing_sent(workdir: Path) -> None:
    assert json.loads(run_cli("status", "--json").stdout)["clusters"][0]["jobs"] == []
    assert not workdir.exists() or not any(workdir.iterdir())


def test_a_workdir_over_the_size_limit_is_refused_up_front(cluster, tmp_path):
    src = project(tmp_path / "proj")
    with open(src / "dataset.bin", "wb") as f:  # sparse: 3 GiB to the sync, nothing on disk
        f.truncate(3 * 1024**3)
    r = run_cli("train", "wd", "train.py", "-w", str(src))
    refused(r, "more than 2.0 GiB", "dataset.bin alone is 3.0 GiB", ".mlcloudignore")
    no_job_and_nothing_sent(cluster)


def test_max_workdir_files_in_the_spec_sets_the_count_limit(cluster, tmp_path):
    src = project(tmp_path / "proj", files=12)
    spec = tmp_path / "mlcloud.yaml"
    spec.write_text(f"workdir: {src}\nmax_workdir_files: 5\n")
    r = run_cli("train", "wd", "train.py", "-f", str(spec))
    refused(r, "more than 5 files", ".mlcloudignore", "max_workdir_files")
    no_job_and_nothing_sent(cluster)
    spec.write_text(f"workdir: {src}\nmax_workdir_files: 20\nmax_workdir_size: 1MiB\n")
    r = run_cli("train", "wd", "train.py", "-f", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trained" in r.stdout and (cluster / "data-10.txt").exists()


def test_a_bad_size_in_the_spec_names_the_line(tmp_path):
    spec = tmp_path / "mlcloud.yaml"
    spec.write_text("name: x\nmax_workdir_size: plenty\n")
    r = run_cli("train", "wd", "train.py", "-f", str(spec))
    refused(r, f"{spec}:2: max_workdir_size: 'plenty' is not a size")


def test_a_symlink_loop_in_the_workdir_is_one_line(cluster, tmp_path):
    src = project(tmp_path / "proj")
    (src / "a").symlink_to("b")
    (src / "b").symlink_to("a")
    r = run_cli("train", "wd", "train.py", "-w", str(src))
    refused(r, "a is a symlink loop", ".mlcloudignore")
    no_job_and_nothing_sent(cluster)


def test_a_node_disk_that_fills_during_sync_keeps_nothing_partial(cluster, tmp_path):
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    src = project(tmp_path / "proj")
    (src / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    cluster.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(cluster)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = run_cli("train", "wd", "train.py", "-w", str(src))
        assert r.returncode == 1, r.stdout + r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr
        assert "'weights.bin': No space left on device" in errors[0]
        assert not [p for p in cluster.rglob("*") if p.name.endswith(".mlcloud-tmp")]
        assert not (cluster / "weights.bin").exists()
        job = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["jobs"][-1]
        assert job["status"] == "FAILED"
    finally:
        subprocess.run(["umount", "-l", str(cluster)], check=True)
