"""An EC2 endpoint with real idempotency: an HTTP proxy on loopback in front of a moto server.

moto ignores RunInstances' ClientToken (the same token twice: two sets of instances).
EC2 does not: a token it has seen, in that region, launches nothing and answers
as the first time (the same reservation and instance ids), even after those instances are
terminated; the same token with other parameters is `IdempotentParameterMismatch`. This proxy
adds that rule and forwards everything else, byte for byte, to moto:

    stand_in = Ec2Tokens("http://127.0.0.1:MOTO_PORT")   # started on a free loopback port
    os.environ["AWS_ENDPOINT_URL"] = stand_in.url
    stand_in.launches          # RunInstances that reached moto (each one launched)
    stand_in.replays           # RunInstances answered from the table: nothing launched
    stand_in.set_spot_price("us-east-1a", "p4d.24xlarge", 9.5)   # a Spot price spike
    stand_in.close()

moto's Spot price history is one fixed price everywhere; `set_spot_price(zone, type, usd)`
makes DescribeSpotPriceHistory answer that zone's latest price for the type as `usd` (stamped
now), as the live prices of a move for price need. `POST /moto-api/reset` empties the token
table and the prices set too, then resets moto.
"""

from __future__ import annotations

import http.client
import http.server
import re
import threading
import urllib.parse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "trailer"}
REGION = re.compile(rb"Credential=[^/]+/\d{8}/([a-z0-9-]+)/ec2/")
SPOT_ITEM = re.compile(
    rb"<item><availabilityZone>([^<]+)</availabilityZone><instanceType>([^<]+)</instanceType>"
    rb"(.*?)<spotPrice>[^<]+</spotPrice><timestamp>[^<]+</timestamp></item>"
)

MISMATCH = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
    b"<Code>IdempotentParameterMismatch</Code><Message>The client token you have provided is "
    b"associated with a resource that is already deleted or has different parameters. Please "
    b"use a different client token.</Message></Error></Errors>"
    b"<RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
)


class Ec2Tokens:
    """The proxy: a threaded HTTP server on 127.0.0.1; `url` is what AWS_ENDPOINT_URL takes."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.lock = threading.Lock()  # one RunInstances at a time: a repeat waits for the first
        # (region, token) -> (the parameters but the token, status, headers, body)
        self.seen: dict[tuple[str, str], tuple[list, int, list, bytes]] = {}
        self.launches = 0
        self.replays = 0
        self.spot: dict[tuple[bytes, bytes], float] = {}  # (zone, type) -> USD/h
        owner = self

        class Handler(_Forward):
            stand_in = owner

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()
            self.spot.clear()
            self.launches = self.replays = 0

    def set_spot_price(self, zone: str, instance_type: str, usd: float) -> None:
        with self.lock:
            self.spot[(zone.encode(), instance_type.encode())] = usd

    def spot_history(self, data: bytes) -> bytes:
        """moto's DescribeSpotPriceHistory answer with the prices set in place of its own."""
        import time

        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()).encode()

        def price(m: re.Match) -> bytes:
            usd = self.spot.get((m.group(1), m.group(2)))
            if usd is None:
                return m.group(0)
            return (
                b"<item><availabilityZone>%s</availabilityZone><instanceType>%s</instanceType>"
                b"%s<spotPrice>%s</spotPrice><timestamp>%s</timestamp></item>"
            ) % (m.group(1), m.group(2), m.group(3), repr(usd).encode(), now)

        with self.lock:
            return SPOT_ITEM.sub(price, data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def forward(self, method: str, path: str, headers: list, body: bytes):
        """(status, headers, body) of the same request sent to moto."""
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            drop = HOP_BY_HOP | {"host", "expect", "content-length"}
            out = {k: v for k, v in headers if k.lower() not in drop}
            out["Host"] = self.upstream.netloc
            out["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=out)
            r = conn.getresponse()
            data = r.read()
            kept = [(k, v) for k, v in r.getheaders() if k.lower() not in HOP_BY_HOP]
            return r.status, kept, data
        finally:
            conn.close()

    def run_instances(self, region: str, params: list, headers: list, body: bytes, path: str):
        token = dict(params).get("ClientToken")
        if not token:
            return self.forward("POST", path, headers, body)
        rest = sorted(p for p in params if p[0] != "ClientToken")
        with self.lock:
            first = self.seen.get((region, token))
            if first is not None:
                if first[0] != rest:
                    return 400, [("Content-Type", "text/xml")], MISMATCH
                self.replays += 1
                return first[1:]
            status, out, data = self.forward("POST", path, headers, body)
            if status == 200:  # a refused launch binds no token
                self.seen[(region, token)] = (rest, status, out, data)
                self.launches += 1
            return status, out, data


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # botocore keeps connections open
    stand_in: Ec2Tokens

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        headers = list(self.headers.items())
        s = self.stand_in
        if self.command == "POST" and self.path.rstrip("/") == "/moto-api/reset":
            s.reset()
        answer = None
        if self.command == "POST" and body.startswith(b"Action=RunInstances&"):
            region = REGION.search(self.headers.get("Authorization", "").encode())
            params = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True)
            answer = s.run_instances(
                region.group(1).decode() if region else "", params, headers, body, self.path
            )
        status, out, data = answer or s.forward(self.command, self.path, headers, body)
        if status == 200 and body.startswith(b"Action=DescribeSpotPriceHistory&"):
            data = s.spot_history(data)
        self.send_response_only(status)
        for k, v in out:
            if k.lower() != "content-length" or self.command == "HEAD":
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

    def log_message(self, *args) -> None:
        pass
