"""A ProxyCommand for tests: relay stdin/stdout to a TCP address.

    tcp_relay.py HOST PORT              connect to HOST:PORT
    tcp_relay.py --pool FILE HOST PORT  route HOST to a loopback node from FILE, a JSON
                                        {"pool": [free nodes], "routes": {address: node}}:
                                        a new address takes the next free node, for good; with
                                        none free it is unreachable (exit 1)
    tcp_relay.py --delay S ...          every byte arrives S seconds after it was sent, each
                                        way (a slow link: the round trip is 2 S)

Cloud tests give nodes addresses that do not exist here (moto's 10.x, 54.x); the pool routes
each to a loopback sshd node, as a bastion routes to a private address. Nothing leaves
loopback."""

import json
import socket
import sys
import threading


def route(pool_file: str, address: str) -> str:
    import fcntl

    with open(pool_file, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        table = json.load(f)
        host = table["routes"].get(address)
        if host is None:
            if not table["pool"]:
                sys.exit(f"tcp_relay: {address} is not routed")
            host = table["routes"][address] = table["pool"].pop(0)
            f.seek(0)
            f.truncate()
            json.dump(table, f)
    return host


def _pump(read, write, end, delay: float) -> None:
    """Copy read() to write() until b"", each block `delay` s after it was read, in order."""
    if not delay:
        for block in iter(read, b""):
            write(block)
        end()
        return
    import queue
    import time

    due: queue.Queue = queue.Queue()

    def reader() -> None:
        for block in iter(read, b""):
            due.put((time.monotonic() + delay, block))
        due.put((time.monotonic() + delay, b""))

    threading.Thread(target=reader, daemon=True).start()
    while True:
        at, block = due.get()
        time.sleep(max(0.0, at - time.monotonic()))
        if not block:
            end()
            return
        write(block)


def main(argv: list[str]) -> None:
    delay = 0.0
    if argv[0] == "--delay":
        delay, argv = float(argv[1]), argv[2:]
    if argv[0] == "--pool":
        host, port = route(argv[1], argv[2]), int(argv[3])
    else:
        host, port = argv[0], int(argv[1])
    s = socket.create_connection((host, port))

    def out(block: bytes) -> None:
        sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()

    up = threading.Thread(
        target=_pump,
        args=(
            lambda: sys.stdin.buffer.read1(65536),
            s.sendall,
            lambda: s.shutdown(socket.SHUT_WR),
            delay,
        ),
        daemon=True,
    )
    up.start()
    _pump(lambda: s.recv(65536), out, lambda: None, delay)


if __name__ == "__main__":
    main(sys.argv[1:])
