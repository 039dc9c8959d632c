"""The DDP template's bucket checkpoints (templates/ddp/checkpoint_store.py), in-process: S3
against moto, Cloud Storage against a small fake of its JSON API. A reader only ever sees a
complete checkpoint; uploads are newest-only; the template runs on without boto3."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from moto import mock_aws

from mlcloud import templates

_spec = importlib.util.spec_from_file_location(
    "checkpoint_store", templates.path("ddp/checkpoint_store.py")
)
store_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store_mod)


def write_ckpt(tmp_path, step: int, size: int = 3000) -> str:
    path = tmp_path / f"ckpt-{step:08d}.pt"
    path.write_bytes(hashlib.sha256(str(step).encode()).digest() * (size // 32))
    return str(path)


def upload_all(store, tmp_path, steps) -> list[str]:
    said: list[str] = []
    up = store_mod.Uploader(store, said.append)
    for step in steps:
        up.submit(step, write_ckpt(tmp_path / "src", step))
        _wait_idle(up)
    up.close()
    return said


def _wait_idle(up) -> None:
    with up._cond:
        while up._pending or up._busy:
            up._cond.wait()


@pytest.fixture
def s3(aws_env):
    with mock_aws():
        import boto3

        boto3.client("s3").create_bucket(Bucket="ckpts")
        yield boto3.client("s3")


def keys(s3) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="ckpts").get("Contents", []))


def test_s3_upload_keeps_newest_two_and_a_new_node_fetches_the_newest(s3, tmp_path):
    (tmp_path / "src").mkdir()
    store = store_mod.open_store("s3://ckpts/runs/lab", print)
    said = upload_all(store, tmp_path, [10, 20, 30])
    assert said == [f"checkpoints: step {s} uploaded to s3://ckpts/runs/lab" for s in (10, 20, 30)]
    manifest = json.loads(s3.get_object(Bucket="ckpts", Key="runs/lab/latest.json")["Body"].read())
    assert manifest["step"] == 30
    data = [k for k in keys(s3) if k != "runs/lab/latest.json"]
    assert len(data) == 2 and all(k.startswith("runs/lab/ckpt-000000") for k in data)
    assert {manifest["key"], manifest["previous"]} == {k.rsplit("/", 1)[1] for k in data}

    empty = tmp_path / "new-node"
    empty.mkdir()
    assert store_mod.remote_step(store, print) == 30
    path = store_mod.fetch_newest(store, str(empty), print)
    assert path == str(empty / "ckpt-00000030.pt")
    assert (empty / "ckpt-00000030.pt").read_bytes() == (
        tmp_path / "src/ckpt-00000030.pt"
    ).read_bytes()
    assert [p.name for p in empty.iterdir()] == ["ckpt-00000030.pt"]  # no temp file left


def test_the_manifest_is_written_last_and_a_torn_copy_is_refused(s3, tmp_path):
    (tmp_path / "src").mkdir()
    store = store_mod.open_store("s3://ckpts/p", print)
    order: list[str] = []
    real_put, real_put_bytes = store.put, store.put_bytes

    def put(name, f, size):
        order.append(f"data:{name[:13]}:{(store.manifest() or {}).get('step')}")
        real_put(name, f, size)

    def put_bytes(name, data):
        order.append(name)
        real_put_bytes(name, data)

    store.put, store.put_bytes = put, put_bytes
    upload_all(store, tmp_path, [5, 6])
    # while step 6's data travels, readers are still shown step 5: never a partial one
    assert order == [
        "data:ckpt-00000005:None",
        "latest.json",
        "data:ckpt-00000006:5",
        "latest.json",
    ]

    manifest = store.manifest()
    s3.put_object(Bucket="ckpts", Key=f"p/{manifest['key']}", Body=b"torn")
    dest = tmp_path / "dest"
    dest.mkdir()
    assert store_mod.fetch_newest(store, str(dest), print) is None
    assert list(dest.iterdir()) == []


def test_uploads_are_newest_only(tmp_path):
    (tmp_path / "src").mkdir()
    started, release = threading.Event(), threading.Event()
    uploaded: list[int] = []

    class SlowStore:
        uri = "s3://slow/x"

        def __init__(self):
            self.m = None

        def put(self, name, f, size):
            started.set()
            release.wait(10)
            uploaded.append(int(name[5:13]))

        def put_bytes(self, name, data):
            self.m = json.loads(data)

        def manifest(self):
            return self.m

        def delete(self, name):
            pass

    up = store_mod.Uploader(SlowStore(), lambda line: None)
    up.submit(1, write_ckpt(tmp_path / "src", 1))
    assert started.wait(10)
    for step in (2, 3, 4):
        up.submit(step, write_ckpt(tmp_path / "src", step))
    release.set()
    up.close()
    assert uploaded == [1, 4]  # 2 and 3 were overtaken while 1 travelled


def test_without_boto3_one_clear_line_and_no_store(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    said: list[str] = []
    assert store_mod.open_store("s3://ckpts/p", said.append) is None
    assert len(said) == 1 and "boto3 is not installed" in said[0] and "s3://ckpts/p" in said[0]


class FakeGcs(BaseHTTPRequestHandler):
    """The JSON API calls the store makes: media upload, media download, delete."""

    objects: dict[tuple[str, str], bytes] = {}

    def log_message(self, *args):
        pass

    def _target(self):
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.split("/")
        return url, parts

    def do_POST(self):
        url, parts = self._target()
        query = urllib.parse.parse_qs(url.query)
        assert parts[1:5] == ["upload", "storage", "v1", "b"] and query["uploadType"] == ["media"]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.objects[(parts[5], query["name"][0])] = body
        self._answer(200, json.dumps({"name": query["name"][0]}).encode())

    def do_GET(self):
        url, parts = self._target()
        key = (parts[4], urllib.parse.unquote(parts[6]))
        if key not in self.objects:
            return self._answer(404, b"{}")
        self._answer(200, self.objects[key])

    def do_DELETE(self):
        url, parts = self._target()
        found = self.objects.pop((parts[4], urllib.parse.unquote(parts[6])), None)
        self._answer(204 if found is not None else 404, b"")

    def _answer(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def gcs(monkeypatch):
    FakeGcs.objects = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGcs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{server.server_port}")
    yield FakeGcs.objects
    server.shutdown()


def test_gcs_through_the_json_api(gcs, tmp_path):
    (tmp_path / "src").mkdir()
    store = store_mod.open_store("gs://ckpt-eu/runs/lab", print)
    assert store_mod.remote_step(store, print) == -1
    upload_all(store, tmp_path, [7, 8, 9])
    names = sorted(k for _, k in gcs)
    assert "runs/lab/latest.json" in names and len(names) == 3  # manifest + newest two
    dest = tmp_path / "dest"
    dest.mkdir()
    path = store_mod.fetch_newest(store, str(dest), print)
    assert path and open(path, "rb").read() == (tmp_path / "src/ckpt-00000009.pt").read_bytes()
