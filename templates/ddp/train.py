"""Resumable DDP trainer: the example job that `mlcloud` ships to every node.

Launched by torchrun (one process per GPU, or per CPU slot with gloo). It imports only torch
and the standard library because mlcloud itself is not installed on the nodes.

Why it is built the way it is:
- Data is synthetic and a pure function of (seed, step, rank), so a resumed run sees exactly
  the batches it would have seen without the interruption.
- Nodes need not share a filesystem, and rendezvous may put global rank 0 on any node: so the
  first process of every node (LOCAL_RANK 0) writes checkpoints to its node's directory, and on
  resume the rank holding the newest complete one broadcasts it to all.
- Checkpoints are written atomically (temp file, fsync, rename, fsync dir); on resume a
  truncated newest file is skipped in favour of the previous one.
- Nothing here knows of buckets: with the spec's storage.checkpoints the node uploads each
  complete checkpoint this writes, and restores the bucket's newest before the job starts on
  a node whose disk lacks it (mlcloud's templates/checkpoints.py).
- progress.json (step of total, loss, time) lets an outside watcher tell a stuck job from a
  slow one; the same steps go to MLCLOUD_PROGRESS_FILE as {"done": step, "total": steps}, the
  convention any script may follow, from which the controller estimates the time left.
- At the end each node's first process leaves the final model and metrics.json in
  MLCLOUD_OUTPUT_DIR, for `mlcloud pull`.
- SIGTERM/SIGINT (torchrun forwards them to workers) set a flag that all ranks agree on at a
  step boundary, so the job stops together after a final checkpoint and exits 143.
- Workers end with os._exit: a worker can abort in interpreter teardown after
  destroy_process_group, which leaves the other node's agent waiting in its exit barrier.
- Every line goes out in one write (say): torchrun runs workers with `python -u`, where
  print() writes the text and the newline apart, so ranks sharing a log would splice lines.
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

IN_DIM, HIDDEN, OUT_DIM, SEED = 16, 64, 4, 1234
CKPT_KEYS = {"model", "optim", "step"}
_stop_requested = False


def say(text):
    """Print a line in one write(2), whole, whatever the buffering."""
    data = (text + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def _on_signal(signum, frame):
    """Only set a flag: the ranks must agree on when to stop, which needs a collective."""
    global _stop_requested
    _stop_requested = True


def make_batch(step, rank, batch_size, device):
    """Regression batch from a fixed random 'teacher' net; a pure function of (step, rank)."""
    teacher = torch.Generator().manual_seed(SEED)
    w1 = torch.randn(IN_DIM, 8, generator=teacher) / IN_DIM**0.5
    w2 = torch.randn(8, OUT_DIM, generator=teacher) * 2 / 8**0.5
    g = torch.Generator().manual_seed(SEED + 1_000_003 * step + 7_919 * rank)
    x = torch.randn(batch_size, IN_DIM, generator=g)
    y = torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(batch_size, OUT_DIM, generator=g)
    return x.to(device), y.to(device)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write via write(fileobj) to a temp file in the same directory, then rename over path."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def list_checkpoints(ckpt_dir):
    """(step, path) for every ckpt-NNNNNNNN.pt, newest first."""
    found = []
    for name in os.listdir(ckpt_dir):
        stem = name[len("ckpt-") : -len(".pt")]
        if name.startswith("ckpt-") and name.endswith(".pt") and stem.isdigit():
            found.append((int(stem), os.path.join(ckpt_dir, name)))
    return sorted(found, reverse=True)


def load_latest(ckpt_dir):
    """Newest checkpoint that loads and has the expected keys, or None."""
    for _, path in list_checkpoints(ckpt_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and CKPT_KEYS <= state.keys():
                return state
            say(f"warning: skipping checkpoint {path}: missing keys")
        except Exception as e:  # truncated or corrupt: fall back to the previous one
            say(f"warning: skipping unreadable checkpoint {path}: {e}")
    return None


def save_checkpoint(ckpt_dir, step, model, optim, keep):
    path = os.path.join(ckpt_dir, f"ckpt-{step:08d}.pt")
    state = {"model": model.module.state_dict(), "optim": optim.state_dict(), "step": step}
    atomic_write(path, lambda f: torch.save(state, f))
    for _, old in list_checkpoints(ckpt_dir)[max(keep, 1) :]:
        try:
            os.unlink(old)
        except FileNotFoundError:  # another node's writer pruned it (shared directory)
            pass


def write_progress(ckpt_dir, step, total, loss, world):
    """progress.json in the checkpoint directory, and {"done", "total"} in the file
    MLCLOUD_PROGRESS_FILE names (mlcloud's one progress convention), each atomically."""
    info = {
        "step": step,
        "total": total,
        "loss": loss,
        "time": time.time(),
        "world_size": world,
        "pid": os.getpid(),
    }
    atomic_write(
        os.path.join(ckpt_dir, "progress.json"), lambda f: f.write(json.dumps(info).encode())
    )
    path = os.environ.get("MLCLOUD_PROGRESS_FILE")
    if path:
        done = json.dumps({"done": step, "total": total}).encode()
        atomic_write(path, lambda f: f.write(done))


def save_outputs(model, step, loss, world):
    """The final model and metrics in MLCLOUD_OUTPUT_DIR, which `mlcloud pull` brings home
    (run by hand, without it, nothing is left behind)."""
    out_dir = os.environ.get("MLCLOUD_OUTPUT_DIR")
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    state = model.module.state_dict()
    atomic_write(os.path.join(out_dir, "model.pt"), lambda f: torch.save(state, f))
    metrics = {"steps": step, "final_loss": loss, "world_size": world}
    atomic_write(
        os.path.join(out_dir, "metrics.json"), lambda f: f.write(json.dumps(metrics).encode())
    )


def finish(code):
    """Barrier, tear down and leave without interpreter teardown (see module docstring)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    args = p.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    node_rank = int(os.environ.get("MLCLOUD_NODE_RANK", 0))
    ckpt_dir = os.environ.get("MLCLOUD_CHECKPOINT_DIR", "./checkpoints")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    # NCCL needs a GPU per process on this node; with fewer, train on the CPU with gloo
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend)
    say(f"rank {rank}/{world} local_rank {local_rank} node {node_rank} backend {backend}")

    torch.manual_seed(SEED)
    net = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT_DIM))
    net.to(device)
    optim = torch.optim.Adam(net.parameters(), lr=args.lr)

    # Each node's writer looks at its own disk; the rank with the newest checkpoint shares it.
    writer = local_rank == 0
    local = None
    if writer:
        os.makedirs(ckpt_dir, exist_ok=True)
        local = load_latest(ckpt_dir)
    newest = torch.tensor([int(local["step"]) if local else -1, -rank], device=device)
    gathered = [torch.zeros_like(newest) for _ in range(world)]
    dist.all_gather(gathered, newest)
    best_step, neg_src = max(tuple(int(v) for v in t.tolist()) for t in gathered)
    box = [local if rank == -neg_src else None]
    if best_step >= 0:
        dist.broadcast_object_list(box, src=-neg_src, device=device if backend == "nccl" else None)
    else:
        box = [None]
    start = 0
    if box[0] is not None:
        net.load_state_dict(box[0]["model"])
        optim.load_state_dict(box[0]["optim"])  # moves optimizer state to the params' device
        start = int(box[0]["step"])
    del box
    if rank == 0:
        say(f"resumed from step {start}" if start else "starting from step 0")
    model = DDP(net, device_ids=[local_rank] if backend == "nccl" else None)
    loss_fn = nn.MSELoss()

    step, loss = start, None
    for step in range(start + 1, args.steps + 1):
        x, y = make_batch(step, rank, args.batch_size, device)
        optim.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optim.step()

        flag = torch.tensor([1.0 if _stop_requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if step % args.log_every == 0 or step == args.steps or flag.item():
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            mean = mean.item() / world
            if rank == 0:
                say(f"step {step} loss {mean:.4f}")
            if writer:
                write_progress(ckpt_dir, step, args.steps, mean, world)
        if flag.item():
            if writer:
                save_checkpoint(ckpt_dir, step, model, optim, args.keep)
            if rank == 0:
                say(f"stopped by signal at step {step}")
            finish(143)
        if writer and step % args.ckpt_every == 0:
            save_checkpoint(ckpt_dir, step, model, optim, args.keep)

    # Final loss: the last step's mean over ranks, or an evaluation if nothing was left to run.
    if loss is None:
        with torch.no_grad():
            x, y = make_batch(step, rank, args.batch_size, device)
            loss = loss_fn(model(x), y)
    final = loss.detach().clone()
    dist.all_reduce(final)
    if writer and not os.path.exists(os.path.join(ckpt_dir, f"ckpt-{step:08d}.pt")):
        save_checkpoint(ckpt_dir, step, model, optim, args.keep)
    if writer:
        save_outputs(model, step, final.item() / world, world)
    if rank == 0:
        say(f"done steps={step} world_size={world} final_loss={final.item() / world:.4f}")
    finish(0)


if __name__ == "__main__":
    main()
