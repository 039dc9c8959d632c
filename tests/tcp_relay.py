"""A ProxyCommand for tests: relay stdin/stdout to a TCP address.

    tcp_relay.py HOST PORT              connect to HOST:PORT
    tcp_relay.py --pool FILE HOST PORT  route HOST to a loopback node from FILE, a JSON
                                        {"pool": [free nodes], "routes": {address: node}}:
                                        a new address takes the next free node, for good; with
                                        none free it is unreachable (exit 1)

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


def main(argv: list[str]) -> None:
    if argv[0] == "--pool":
        host, port = route(argv[1], argv[2]), int(argv[3])
    else:
        host, port = argv[0], int(argv[1])
    s = socket.create_connection((host, port))

    def upstream() -> None:
        for block in iter(lambda: sys.stdin.buffer.read1(65536), b""):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    for block in iter(lambda: s.recv(65536), b""):
        sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
