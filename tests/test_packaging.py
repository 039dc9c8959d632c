"""The wheel built from the checkout: one import package, templates and catalog included, and
it works from outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # pip builds a wheel and installs it apart

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_is_self_contained(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("mlcloud-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"mlcloud", next(t for t in tops if t.endswith(".dist-info"))}
    for needed in (
        "mlcloud/templates/ddp/train.py",
        "mlcloud/templates/ddp/mlcloud.yaml",
        "mlcloud/templates/checkpoints.py",
        "mlcloud/templates/node_ctl.py",
        "mlcloud/templates/receive.py",
        "mlcloud/templates/send.py",
        "mlcloud/spec/catalog/data/gpu_offers.csv",
        "mlcloud/cli/app.py",
        "mlcloud/providers/aws/provider.py",
    ):
        assert needed in names, needed

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "MLCLOUD_HOME": str(tmp_path / "home")}
    probe = (
        "import sys, mlcloud; assert mlcloud.__file__.startswith(sys.argv[1]), mlcloud.__file__\n"
        "from mlcloud.cli.app import main\n"
        "sys.argv = ['mlcloud', 'init', 'proj']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, str(target)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "proj" / "train.py").is_file()
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mlcloud.cli.app import main; "
            "sys.argv = ['mlcloud', 'offers', 'A100:8', '--json']; main()",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and '"p4d.24xlarge"' in r.stdout, r.stderr
