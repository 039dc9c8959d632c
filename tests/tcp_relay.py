"""A ProxyCommand for tests: relay stdin/stdout to HOST:PORT.

Cloud tests give nodes addresses that do not exist here (10.x from moto); the proxy command
routes each to a loopback sshd node, as a bastion would route to a private address."""

import socket
import sys
import threading


def main(host: str, port: int) -> None:
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
    main(sys.argv[1], int(sys.argv[2]))
