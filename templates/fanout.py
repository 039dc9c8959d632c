"""Node side of the fan-out: one node (the relay, normally the head) takes the workdir stream
from the client and passes it on to its peers over the cluster's own network, so the client's
link carries the workdir once whatever the number of nodes.

Standard library only. The client installs it under a node's bin/, beside receive.py (which
it imports), and runs it with the node's interpreter (mlcloud/remote/fanout.py):

  fanout.py authorize ROOT PUBLIC STAMP
      Let the cluster's peer key in, to receive a workdir and nothing else: one line in the
      file sshd reads this user's keys from (MLCLOUD_AUTHORIZED_KEYS, else the first
      AuthorizedKeysFile of the config of the sshd serving this session, by default
      ~/.ssh/authorized_keys), `restrict` and a forced command `fanout.py serve ROOT`, marked
      with ROOT so `forget` finds it (the file is noted in ROOT/peer/keys_file). STAMP (what
      was installed) is written last.
  fanout.py forget ROOT
      Remove that line and STAMP (node_ctl.py's cleanup runs it when the cluster's processes
      are stopped).
  fanout.py login ROOT PUBLIC
      Let the cluster's own login key in (a shared store: every home reaches the node with the
      team's secret, mlcloud/providers/ssh.py): a plain line in the same file, marked with
      ROOT/bin (the file is noted in ROOT/peer/login_keys_file).
  fanout.py logout ROOT
      Remove that line (the ssh provider, in the session that then removes ROOT).
  fanout.py serve ROOT
      The forced command: print this node's manifest as one JSON line, then apply the stream
      on stdin as receive.py does. $SSH_ORIGINAL_COMMAND may name another node directory of
      the same cluster on this host.
  fanout.py relay ROOT
      stdin: a JSON line ({"peers": [{"name", "host", "port", "user"}], "known_hosts"}), then
      the client's stream. Opens `ssh peer serve` to every peer at once, with the cluster's
      private key and the peers' host keys as the client pinned them, while this node's own
      copy begins: what arrives meanwhile is queued for the peers. A peer whose manifest
      matches this node's gets the client's stream as it arrives (tee), in the codec the
      client chose; any other gets, once this node's copy is complete, a stream of what it
      lacks, read from this node's copy.
      Prints {"count": files written here, "failed": {name: why}}; a failed peer is the
      client's to sync. Exits as receive.py does when this node's own copy fails.
"""

import collections
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

sys.dont_write_bytecode = True  # nothing left in bin/ but what was installed
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script dir out

from receive import MANIFEST, Failed, Refused, Stream, Tree, file_frame, receive  # noqa: E402

KEY = "peer/id_ed25519"
STAMP = "peer/stamp"
KEYS_FILE = "peer/keys_file"  # where authorize put the line, for forget
LOGIN_FILE = "peer/login_keys_file"  # where login put the cluster's login key, for logout
MARK = "mlcloud-peer:"
HELLO_TIMEOUT = 30.0  # connect (ConnectTimeout below) plus the peer's interpreter starting
# How far a peer may lag behind the client's stream: the nodes do not all get the CPU at the
# same moments, and a short leash makes the whole chain wait for the slowest at every step.
LAG_BYTES = 32 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwind: the file being written is removed, peers stopped


def _keys_file(noted_in):
    """The file this node's sshd reads the user's keys from: the one an earlier `authorize`
    (or `login`) noted in `noted_in`, MLCLOUD_AUTHORIZED_KEYS, else the first
    AuthorizedKeysFile of the config the daemon serving this session runs with (`sshd -f`, or
    the default config)."""
    try:
        with open(noted_in) as f:
            noted = f.read()
    except OSError:
        noted = ""
    if noted:
        return noted
    home = os.path.expanduser("~")
    named = os.environ.get("MLCLOUD_AUTHORIZED_KEYS")
    if named:
        return named
    first = _authorized_keys_files(_sshd_config())[0]
    subst = {"%%": "%", "%h": home, "%u": _user(), "%U": str(os.getuid())}
    path = re.sub("%[%huU]", lambda m: subst[m.group()], first)
    return os.path.join(home, path)  # relative: to the home directory, as sshd reads it


def _user():
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _sshd_config():
    """The config file of the sshd this process runs under: its `-f`, found by walking up the
    process tree, else the default one."""
    pid = os.getppid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                # the listener shows its command line as its title, in one string
                words = f.read().replace(b"\0", b" ").decode(errors="replace").split()
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if not words or not os.path.basename(words[0]).startswith("sshd"):
            continue
        for i, word in enumerate(words):
            if word == "-f" and i + 1 < len(words):
                return words[i + 1]
        if not words[0].endswith(":") or "[listener]" in words:
            break  # the daemon itself, started without -f (a session's title is "sshd...:")
    return "/etc/ssh/sshd_config"


def _authorized_keys_files(config):
    """AuthorizedKeysFile as the config sets it for every user (the first value sshd reads,
    before any Match block), or sshd's default."""
    try:
        with open(config) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].lower() == "match":
            break
        if words[0].lower() == "authorizedkeysfile" and len(words) > 1:
            files = [w for w in words[1:] if w.lower() != "none"]
            if files:
                return files
    return [".ssh/authorized_keys"]


def _rewrite_keys(root, line, noted_in=None):
    """Drop ROOT's line from the authorized keys file, then add `line` unless None; under a
    lock, written beside and renamed over, so no reader sees half a file. Returns the file."""
    import fcntl

    path = _keys_file(noted_in or os.path.join(root, KEYS_FILE))
    folder = os.path.dirname(path)
    if line is None and not os.path.exists(path):
        return path
    os.makedirs(folder, mode=0o700, exist_ok=True)
    with open(os.path.join(folder, ".mlcloud-peer.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                old = f.read().splitlines()
        except FileNotFoundError:
            old = []
        kept = [x for x in old if not x.endswith(" " + MARK + root) and not _stale(x)]
        if line is None and len(kept) == len(old):
            return path
        tmp = path + ".mlcloud-tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(x + "\n" for x in kept + ([line] if line else [])))
        os.replace(tmp, path)
    return path


def _stale(line):
    """A line of ours for a node directory that is gone (removed without `forget`): sshd takes
    the first line with a key, so one left over would shadow a new node's."""
    _, mark, root = line.rpartition(" " + MARK)
    return bool(mark) and not os.path.isdir(root)


def authorize(root, public, stamp):
    command = "exec " + shlex.join(
        [sys.executable, "-I", "-S", os.path.join(root, "bin", "fanout.py"), "serve", root]
    )
    if "\n" in command or "\n" in public:
        sys.exit("mlcloud fanout: refused: a newline in the node's paths")
    # sshd's option syntax: a double quote inside command="..." is written \"
    quoted = command.replace('"', '\\"')
    path = _rewrite_keys(root, f'restrict,command="{quoted}" {public} {MARK}{root}')
    fd = os.open(os.path.join(root, KEYS_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:  # `forget` may run where no sshd is above it (an agent)
        f.write(path)
    fd = os.open(os.path.join(root, STAMP), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(stamp)


def login(root, public):
    if "\n" in public or "\n" in root:
        sys.exit("mlcloud fanout: refused: a newline in the key or the node's path")
    mark = os.path.join(root, "bin")  # a directory while the node lives: never stale till then
    noted = os.path.join(root, LOGIN_FILE)
    path = _rewrite_keys(mark, f"{public} {MARK}{mark}", noted)
    os.makedirs(os.path.dirname(noted), mode=0o700, exist_ok=True)
    fd = os.open(noted, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(path)


def _load(data):
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _digests(manifest):
    return {p: v[2] if isinstance(v, list) and len(v) == 3 else None for p, v in manifest.items()}


def serve(root):
    name = os.environ.get("SSH_ORIGINAL_COMMAND", "").strip() or os.path.basename(root)
    parent = os.path.dirname(root)
    if not _NAME.fullmatch(name) or not os.path.isdir(os.path.join(parent, name, "bin")):
        sys.stderr.write(f"mlcloud fanout: refused: {name!r} is no node of this cluster here\n")
        sys.exit(3)
    dest = os.path.join(parent, name, "workdir")
    with _failures(dest):
        tree = Tree(dest)
        try:
            sys.stdout.write(json.dumps({"manifest": _load(tree.read(MANIFEST))}) + "\n")
            sys.stdout.flush()
            count = receive(tree, Stream(sys.stdin.fileno()))
        finally:
            tree.close()
    print(count)


@contextlib.contextmanager
def _failures(where):
    """This node's copy failed: one line on stderr and receive.py's exit codes."""
    try:
        yield
    except Refused as e:
        sys.stderr.write(f"mlcloud sync: refused: {e}\n")
        sys.exit(3)
    except (Failed, OSError) as e:
        sys.stderr.write(f"mlcloud sync: failed in {where}: {e}; the partial file was removed\n")
        sys.exit(4)


class Lag:
    """The bytes a peer has yet to take, up to LAG_BYTES (put waits beyond it); None ends it.
    Dropped (the peer failed, or takes another stream), it holds nothing and put never waits:
    the tee must never wait on such a peer."""

    def __init__(self):
        self.items = collections.deque()
        self.size = 0
        self.dropped = False
        self.cond = threading.Condition()

    def put(self, data):
        with self.cond:
            while self.size > LAG_BYTES and not self.dropped:
                self.cond.wait()
            if not self.dropped:
                self.items.append(data)
                self.size += len(data) if data else 0
                self.cond.notify_all()

    def get(self):
        with self.cond:
            while not self.items and not self.dropped:
                self.cond.wait()
            if self.dropped:
                return None
            data = self.items.popleft()
            self.size -= len(data) if data else 0
            self.cond.notify_all()
            return data

    def drop(self):
        with self.cond:
            self.dropped = True
            self.items.clear()
            self.size = 0
            self.cond.notify_all()


class Peer:
    """One `ssh peer serve` session: the peer's manifest, then a stream written from a thread."""

    def __init__(self, spec, key, known_hosts):
        self.name = spec["name"]
        argv = ["ssh", "-F", "/dev/null", "-T", "-i", key, "-p", str(spec["port"])]
        for opt in (
            # what this machine's own link to the peer costs: curve25519 first (a fraction
            # of the post-quantum exchange's CPU), AES-GCM for the bytes
            "KexAlgorithms=^curve25519-sha256",
            "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
            "IdentitiesOnly=yes",
            "BatchMode=yes",
            "StrictHostKeyChecking=yes",
            f"UserKnownHostsFile={known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "ConnectTimeout=5",
            "ServerAliveInterval=5",
            "ServerAliveCountMax=3",
            "LogLevel=ERROR",
        ):
            argv += ["-o", opt]
        argv += ["-l", spec["user"], spec["host"], self.name]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.manifest = None
        self.why = None
        self.err = b""
        self.greeted = threading.Event()
        self.queue = Lag()
        self.writer = None
        self.readers = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self.readers:
            t.start()

    def _read_out(self):
        try:
            manifest = json.loads(self.proc.stdout.readline() or b"{}").get("manifest")
        except (ValueError, AttributeError):
            manifest = None
        self.manifest = manifest if isinstance(manifest, dict) else None
        self.greeted.set()
        self.proc.stdout.read()  # the count it prints at the end

    def _read_err(self):
        self.err = self.proc.stderr.read()

    def fail(self, why):
        if self.why is None:
            self.why = why
        self.queue.drop()
        if self.proc.poll() is None:
            self.proc.kill()

    def start(self, before, dest, copied):
        """Write the peer's stream from a thread (_stream); before: this node's digests
        before the client's stream, dest: this node's copy, copied: set once it is whole."""

        def write():
            try:
                for chunk in self._stream(before, dest, copied):
                    self.proc.stdin.write(chunk)
                self.proc.stdin.close()
            except OSError as e:  # the peer went away: finish() says why, from its stderr
                self.fail(f"the stream broke off ({e.strerror or e})")
            except (Refused, Failed) as e:
                self.fail(f"reading this node's copy: {e}")

        self.writer = threading.Thread(target=write, daemon=True)
        self.writer.start()

    def _stream(self, before, dest, copied):
        """The client's stream as it arrives (queued from its first byte, while this session
        opened) when the peer's greeting shows it held what this node held; else, once this
        node's copy is whole, what the peer lacks, read from that copy (a Tree of its own:
        peers are served side by side)."""
        if not self.greeted.wait(HELLO_TIMEOUT) or self.manifest is None:
            self.fail("no answer")
            return
        if _digests(self.manifest) == before:
            while (chunk := self.queue.get()) is not None:
                yield chunk
            return
        self.queue.drop()
        copied.wait()
        if self.why is not None:  # this node's copy failed
            return
        tree = Tree(dest)
        try:
            yield from _chunks_of(tree, _load(tree.read(MANIFEST)), self.manifest)
        finally:
            tree.close()

    def finish(self):
        """None when the peer took its stream, else why not."""
        if self.writer is not None:
            self.writer.join()
        code = self.proc.wait()
        for t in self.readers:
            t.join(5)
        detail = self.err.decode(errors="replace").strip().splitlines()
        if code == 0 and self.why is None:
            return None
        last = detail[-1] if detail else f"exit code {code}"
        return f"{self.why}: {last}" if self.why else last


class TeeStream(Stream):
    """stdin as receive() reads it; every byte read from it is also queued for the tee peers."""

    peers = ()

    def tee(self, peers):
        """From now on copy to peers, starting with what was read ahead and not yet used."""
        self.peers = peers
        self._copy(self.buf[self.pos :])

    def _copy(self, data):
        for p in self.peers:
            p.queue.put(data)  # a failed peer's writer drains its queue

    def _read(self, n):
        data = os.read(self.fd, n)
        if data:
            self._copy(data)
        return data


def _chunks_of(tree, manifest, have):
    """The stream that turns a peer holding `have` into `manifest`, read from this node's copy
    (through tree: nothing followed through a symlink). Sent as it is: the cluster's network
    is the fast one."""
    want, held = _digests(manifest), _digests(have)
    send = sorted(p for p, d in want.items() if d is None or held.get(p) != d)
    delete = sorted(p for p in have if p not in manifest)
    yield json.dumps({"delete": delete, "manifest": manifest}).encode() + b"\n"
    for name in send:
        f = tree.open(name)
        if f is None:
            raise Failed(f"{name!r} is gone from this node's copy")
        with f:
            yield from file_frame(f, name)
    yield json.dumps({"end": len(send)}).encode() + b"\n"


def relay(root):
    stdin = TeeStream(sys.stdin.fileno())
    try:
        cfg = json.loads(stdin.readline())
        specs, known = cfg["peers"], cfg["known_hosts"]
    except (ValueError, KeyError, TypeError):
        sys.stderr.write("mlcloud sync: refused: no relay header\n")
        sys.exit(3)
    with _failures(root):
        known_path = os.path.join(root, "peer", "known_hosts")
        fd = os.open(known_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(known)
        _pass_on(root, stdin, specs, known_path)


def _pass_on(root, stdin, specs, known_path):
    """Apply the stream here and pass it on to every peer; print what became of each."""
    dest = os.path.join(root, "workdir")
    peers, tree, copied = [], None, threading.Event()
    try:
        tree = Tree(dest)
        peers = [Peer(s, os.path.join(root, KEY), known_path) for s in specs]
        before = _digests(_load(tree.read(MANIFEST)))
        stdin.tee(peers)
        for p in peers:
            p.start(before, dest, copied)
        try:
            count = receive(tree, stdin)
        except BaseException:
            for p in peers:  # a writer blocked on a slow peer must not hold the end below
                p.fail("this node's copy failed")
            raise
        finally:
            stdin.peers = ()
            for p in peers:
                p.queue.put(None)
            copied.set()
        failed = {p.name: why for p in peers if (why := p.finish()) is not None}
    finally:
        for p in peers:  # this node failed or was interrupted: end what still runs
            if p.proc.poll() is None:
                p.proc.kill()
        if tree is not None:
            tree.close()
    print(json.dumps({"count": count, "failed": failed}))


def main(argv):
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _stop)
    cmd, root = argv[0], argv[1]
    if cmd == "authorize":
        authorize(root, argv[2], argv[3])
    elif cmd == "forget":
        _rewrite_keys(root, None)
        try:
            os.unlink(os.path.join(root, STAMP))  # a node that lives on is set up again
        except FileNotFoundError:
            pass
    elif cmd == "login":
        login(root, argv[2])
    elif cmd == "logout":
        _rewrite_keys(os.path.join(root, "bin"), None, os.path.join(root, LOGIN_FILE))
    elif cmd == "serve":
        serve(root)
    elif cmd == "relay":
        relay(root)
    else:
        sys.exit(f"mlcloud fanout: unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
