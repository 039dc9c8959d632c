"""Fixtures for GCE tests: the fake Compute API (tests/fakes/gce_server.py) and credentials
the way a user's come (a service-account key file in GOOGLE_APPLICATION_CREDENTIALS, the
project in GOOGLE_CLOUD_PROJECT), plus the endpoint overrides MLCLOUD_GCE_API_ENDPOINT,
MLCLOUD_GCE_IAM_ENDPOINT and STORAGE_EMULATOR_HOST (the fake serves Compute, IAM and Cloud
Storage at one address)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakes.gce_server import DEFAULT_PROJECT, GceFake, RemoteFake

REPO = Path(__file__).resolve().parent.parent
# fast enough for a test, slow enough that PROVISIONING and STAGING are seen
TEST_OP_SECONDS = 0.1


@dataclass
class GceEnv:
    fake: GceFake | RemoteFake
    url: str  # the API endpoint, with its http:// scheme
    project: str
    credentials: Path  # the service-account key file


def _configure(monkeypatch, tmp_path: Path, url: str, key: Path, project: str) -> None:
    """Standard configuration only: what a user sets, nothing from this machine's gcloud."""
    for var in ("GCLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT", "GOOGLE_CLOUD_QUOTA_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", project)
    monkeypatch.setenv("MLCLOUD_GCE_API_ENDPOINT", url)
    # the same fake serves IAM and Cloud Storage (the latter as emulators are reached)
    monkeypatch.setenv("MLCLOUD_GCE_IAM_ENDPOINT", url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))


@pytest.fixture
def gce_fake():
    """The fake Compute API in this process (no credentials set: see gce_env)."""
    with GceFake(op_seconds=TEST_OP_SECONDS) as fake:
        yield fake


@pytest.fixture
def gce_env(gce_fake, tmp_path, monkeypatch) -> GceEnv:
    """The in-process fake, a key file it trusts and the environment pointing at both."""
    key = tmp_path / "gce-service-account.json"
    gce_fake.write_credentials(str(key), DEFAULT_PROJECT)
    _configure(monkeypatch, tmp_path, gce_fake.url, key, DEFAULT_PROJECT)
    return GceEnv(gce_fake, gce_fake.url, DEFAULT_PROJECT, key)


@pytest.fixture
def gce_fake_process(tmp_path, monkeypatch):
    """The fake as its own process (for tests that SIGKILL the CLI or run it as users do),
    configured like gce_env; stopped by its PID after the test."""
    port_file = tmp_path / "gce-fake.port"
    key = tmp_path / "gce-service-account.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.gce_server",
            "--port-file",
            str(port_file),
            "--credentials-file",
            str(key),
            "--project",
            DEFAULT_PROJECT,
            "--op-seconds",
            str(TEST_OP_SECONDS),
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the fake GCE server did not start (exit {proc.poll()})")
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        _configure(monkeypatch, tmp_path, url, key, DEFAULT_PROJECT)
        yield GceEnv(RemoteFake(url, proc.pid), url, DEFAULT_PROJECT, key)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
