"""The fake's Cloud Storage and IAM (tests/fakes/gce_storage.py, gce_iam.py), driven the way
the node side (standard library, STORAGE_EMULATOR_HOST) and the launching machine (google-auth's
AuthorizedSession) drive the real services."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request

from fakes.gce_storage import crc32c


def _req(url, method="GET", data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _session(gce_env):
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    return AuthorizedSession(creds)


def test_objects_media_upload_get_list_delete_without_credentials(gce_fake):
    """What a node's standard-library code does at STORAGE_EMULATOR_HOST."""
    gce_fake.create_bucket("ckpts")
    base = gce_fake.url
    for name, body in (("run/a/ckpt-1.json", b"one"), ("run/a/latest.json", b"{}")):
        st, _, raw = _req(
            f"{base}/upload/storage/v1/b/ckpts/o?uploadType=media&name={_q(name)}",
            "POST",
            body,
            {"Content-Type": "application/octet-stream"},
        )
        assert st == 200, raw
        res = json.loads(raw)
        assert res["kind"] == "storage#object" and res["name"] == name
        assert res["size"] == str(len(body))
        assert res["md5Hash"] == base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324
    st, headers, raw = _req(f"{base}/storage/v1/b/ckpts/o/{_q('run/a/ckpt-1.json')}?alt=media")
    assert (st, raw) == (200, b"one")
    assert "md5=" in headers["x-goog-hash"] and "crc32c=" in headers["x-goog-hash"]
    st, _, raw = _req(f"{base}/download/storage/v1/b/ckpts/o/{_q('run/a/ckpt-1.json')}?alt=media")
    assert (st, raw) == (200, b"one")
    st, _, raw = _req(f"{base}/storage/v1/b/ckpts/o/{_q('run/a/latest.json')}")
    assert json.loads(raw)["name"] == "run/a/latest.json"
    st, _, raw = _req(f"{base}/storage/v1/b/ckpts/o?prefix=run/a/ckpt")
    assert [i["name"] for i in json.loads(raw)["items"]] == ["run/a/ckpt-1.json"]
    st, _, raw = _req(f"{base}/storage/v1/b/ckpts/o?prefix=run/&delimiter=/")
    assert json.loads(raw) == {"kind": "storage#objects", "prefixes": ["run/a/"]}
    st, _, raw = _req(f"{base}/storage/v1/b/ckpts/o/{_q('run/a/ckpt-1.json')}", "DELETE")
    assert st == 204
    st, _, raw = _req(f"{base}/storage/v1/b/ckpts/o/{_q('run/a/ckpt-1.json')}?alt=media")
    assert st == 404
    assert json.loads(raw)["error"]["message"] == "No such object: ckpts/run/a/ckpt-1.json"
    st, _, raw = _req(f"{base}/storage/v1/b/nope/o")
    assert st == 404 and "bucket does not exist" in json.loads(raw)["error"]["message"]
    assert gce_fake.objects() == {"ckpts/run/a/latest.json": 2}


def test_multipart_upload_preconditions_and_paging_with_user_credentials(gce_env):
    fake = gce_env.fake
    fake.create_bucket("data-b")
    s = _session(gce_env)
    data = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n"
    boundary = "===============7330845974216740156=="
    meta = json.dumps({"name": "x/blob.bin", "metadata": {"step": "3"}}).encode()
    body = (
        f"--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n".encode()
        + meta
        + f"\r\n--{boundary}\r\ncontent-type: application/x-bin\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--".encode()
    )
    r = s.post(
        f"{gce_env.url}/upload/storage/v1/b/data-b/o",
        params={"uploadType": "multipart", "ifGenerationMatch": "0"},
        data=body,
        headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
    )
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["contentType"] == "application/x-bin" and res["metadata"] == {"step": "3"}
    assert base64.b64decode(res["crc32c"]) == crc32c(data).to_bytes(4, "big")
    assert fake.storage.object_bytes("data-b", "x/blob.bin") == data
    # ifGenerationMatch=0: only when absent
    again = s.post(
        f"{gce_env.url}/upload/storage/v1/b/data-b/o",
        params={"uploadType": "media", "name": "x/blob.bin", "ifGenerationMatch": "0"},
        data=b"other",
    )
    assert again.status_code == 412 and again.json()["error"]["errors"][0]["reason"] == (
        "conditionNotMet"
    )
    for i in range(5):
        fake.put_object("data-b", f"p/{i}", "v")
    seen, token = [], None
    while True:
        params = {"prefix": "p/", "maxResults": "2"} | ({"pageToken": token} if token else {})
        page = s.get(f"{gce_env.url}/storage/v1/b/data-b/o", params=params).json()
        seen += [i["name"] for i in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            break
    assert seen == [f"p/{i}" for i in range(5)]
    bad = _req(f"{gce_env.url}/storage/v1/b/data-b/o", headers={"Authorization": "Bearer junk"})
    assert bad[0] == 401


def test_service_accounts_and_prefix_grants(gce_env):
    """A service account made through IAM reaches only what the bucket's policy grants it,
    conditions on the object-name prefix included; deleting it leaves its grants as deleted."""
    fake, s, url, p = gce_env.fake, _session(gce_env), gce_env.url, gce_env.project
    fake.create_bucket("ckb")
    fake.put_object("ckb", "data/in.txt", "input")
    fake.put_object("ckb", "other/secret", "no")
    r = s.post(
        f"{url}/v1/projects/{p}/serviceAccounts",
        json={"accountId": "mlc-test-1", "serviceAccount": {"displayName": "mlcloud c1"}},
    )
    assert r.status_code == 200, r.text
    email = r.json()["email"]
    assert email == f"mlc-test-1@{p}.iam.gserviceaccount.com"
    dup = s.post(f"{url}/v1/projects/{p}/serviceAccounts", json={"accountId": "mlc-test-1"})
    assert dup.status_code == 409 and dup.json()["error"]["status"] == "ALREADY_EXISTS"
    assert (
        s.post(f"{url}/v1/projects/{p}/serviceAccounts", json={"accountId": "X"}).status_code == 400
    )
    assert [
        a["email"] for a in s.get(f"{url}/v1/projects/{p}/serviceAccounts").json()["accounts"]
    ] == [email]

    pol = s.get(f"{url}/storage/v1/b/ckb/iam", params={"optionsRequestedPolicyVersion": 3}).json()
    member = f"serviceAccount:{email}"

    def cond(prefix, title):
        return {
            "title": title,
            "expression": f'resource.name.startsWith("projects/_/buckets/ckb/objects/{prefix}")'
            ' || api.getAttribute("storage.googleapis.com/objectListPrefix", "")'
            f'.startsWith("{prefix}")',
        }

    pol["bindings"] += [
        {
            "role": "roles/storage.objectAdmin",
            "members": [member],
            "condition": cond("ckpt/", "rw"),
        },
        {
            "role": "roles/storage.objectViewer",
            "members": [member],
            "condition": cond("data/", "ro"),
        },
    ]
    v1 = dict(pol, version=1)
    assert s.put(f"{url}/storage/v1/b/ckb/iam", json=v1).status_code == 400
    pol["version"] = 3
    assert s.put(f"{url}/storage/v1/b/ckb/iam", json=pol).status_code == 200
    stale = s.put(f"{url}/storage/v1/b/ckb/iam", json=pol)
    assert stale.status_code == 412  # the etag moved on

    auth = {"Authorization": f"Bearer {fake.token_for(email)}"}

    def up(name):
        return _req(
            f"{url}/upload/storage/v1/b/ckb/o?uploadType=media&name={_q(name)}", "POST", b"x", auth
        )[0]

    assert up("ckpt/job/latest.json") == 200
    assert up("data/in.txt") == 403
    assert up("other/x") == 403
    assert (
        _req(f"{url}/storage/v1/b/ckb/o/{_q('data/in.txt')}?alt=media", headers=auth)[2] == b"input"
    )
    assert _req(f"{url}/storage/v1/b/ckb/o/{_q('other/secret')}?alt=media", headers=auth)[0] == 403
    assert _req(f"{url}/storage/v1/b/ckb/o?prefix=ckpt/job/", headers=auth)[0] == 200
    assert _req(f"{url}/storage/v1/b/ckb/o?prefix=other/", headers=auth)[0] == 403
    assert _req(f"{url}/storage/v1/b/ckb/o", headers=auth)[0] == 403
    assert (
        _req(f"{url}/storage/v1/b/ckb/o/{_q('ckpt/job/latest.json')}", "DELETE", headers=auth)[0]
        == 204
    )
    assert _req(f"{url}/storage/v1/b/ckb/iam", headers=auth)[0] == 403

    assert s.delete(f"{url}/v1/projects/{p}/serviceAccounts/{email}").json() == {}
    assert s.get(f"{url}/v1/projects/{p}/serviceAccounts/{email}").status_code == 404
    members = [m for b in fake.bucket_policy("ckb")["bindings"] for m in b["members"]]
    assert any(m.startswith(f"deleted:{member}?uid=") for m in members)
    assert up("ckpt/job/again") == 401  # a deleted account's tokens stop working


def test_remote_fake_serves_storage(gce_fake_process):
    """The fake as its own process: the control API reaches storage and IAM too."""
    fake = gce_fake_process.fake
    fake.create_bucket("remote-b")
    fake.put_object("remote-b", "a/b", "hello")
    assert fake.objects("remote-b") == {"remote-b/a/b": 5}
    st, _, raw = _req(f"{gce_fake_process.url}/storage/v1/b/remote-b/o/a%2Fb?alt=media")
    assert (st, raw) == (200, b"hello")
    assert fake.service_accounts() == []
