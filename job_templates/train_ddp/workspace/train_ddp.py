"""Data-parallel training over the nodes of a `num_nodes` run with torch.distributed (DDP).

Every rank runs this same program. The rendezvous comes from the environment fedml launch sets for each rank:
MASTER_ADDR / MASTER_PORT (rank 0's node), NODE_RANK (this rank), WORLD_SIZE (number of nodes), and
CUDA_VISIBLE_DEVICES (the GPUs given to this rank; empty on CPU-only nodes). The backend is nccl when this rank
has a GPU, else gloo.

The data is scikit-learn's bundled `load_digits` (no download). Each rank trains on its own shard of the
training set (DistributedSampler); DDP averages the gradients, so every rank ends with the same weights, which
the last line proves: `weights sha256: <hex>` over the model's tensors, printed by every rank.
Rank 0 also evaluates on the held-out set after each epoch and saves the final model into $FEDML_ARTIFACT_DIR
(kept by the scheduler as the run's artifacts) when that is set.

    python3 train_ddp.py [--epochs 8] [--batch-size 32] [--lr 0.05] [--init-timeout 60]

Run it by hand on one machine with two shells:
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 NODE_RANK=0 python3 train_ddp.py
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 NODE_RANK=1 python3 train_ddp.py
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from datetime import timedelta

# c10d logs each failed attempt to reach rank 0 with a long C++ stack trace; this program reports a failed
# rendezvous in one line instead (errors still raise Python exceptions). Read by torch at import; set
# TORCH_CPP_LOG_LEVEL=INFO in the job's `envs` to see torch's C++ log.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

try:
    import fedml  # installed with the agent on every node: fedml.log reports metrics (light: no torch of its own)
except ImportError:  # run by hand elsewhere: figures only printed
    fedml = None
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

SEED = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=int(os.environ.get("EPOCHS", "8")))
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--init-timeout", type=float, default=float(os.environ.get("DDP_INIT_TIMEOUT", "60")),
                   help="seconds to wait for every rank to join (and for any collective), default 60")
    return p.parse_args()


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def state_sha256(model: nn.Module) -> str:
    """sha256 over the state_dict: each tensor's name, dtype, shape and raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def main() -> int:
    args = parse_args()
    rank = env_int("NODE_RANK", env_int("RANK", 0))
    world = env_int("WORLD_SIZE", 1)
    os.environ.setdefault("MASTER_ADDR", os.environ.get("FEDML_NODE_0_ADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", os.environ.get("FEDML_NODE_0_PORT", "29500"))
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)  # what init_method env:// reads
    master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"

    use_cuda = torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() != ""
    backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")  # first GPU this rank was given
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # ranks may share a machine's cores; one thread each avoids oversubscription
    torch.manual_seed(SEED)

    print(f"rank {rank}/{world}: backend {backend}, device {device}, master {master}, "
          f"init timeout {args.init_timeout:g} s")
    t0 = time.monotonic()
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=args.init_timeout))
        dist.barrier()  # every rank has joined
    except Exception as e:  # noqa: BLE001 - any rendezvous failure gets the same clear message
        what = "reach rank 0 at" if rank else "gather all ranks at"
        print(f"train_ddp: rank {rank} could not {what} {master} within {args.init_timeout:g} s "
              f"(world size {world}): is every rank running and is {master} reachable? "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
        return 1
    print(f"rank {rank}: all {world} ranks joined in {time.monotonic() - t0:.1f} s")

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, random_state=SEED, stratify=y)
    train = TensorDataset(torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr, dtype=torch.long))
    x_test = torch.tensor(x_te, dtype=torch.float32, device=device)
    y_test = torch.tensor(y_te, dtype=torch.long, device=device)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=SEED)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)

    model = DDP(make_model().to(device), device_ids=[0] if use_cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    print(f"rank {rank}: {len(sampler)} of {len(train)} training samples, {len(x_te)} held out")

    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        total, n = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()  # DDP all-reduces (averages) the gradients here
            opt.step()
            total += loss.item() * len(yb)
            n += len(yb)
        line = f"epoch {epoch}/{args.epochs} loss {total / max(n, 1):.4f}"
        figures = {"loss": total / max(n, 1)}
        if rank == 0:
            model.eval()
            with torch.no_grad():
                acc = (model.module(x_test).argmax(1) == y_test).float().mean().item()
            line += f" accuracy {acc:.4f}"
            figures["accuracy"] = acc
        print(line)
        if fedml is not None:  # each rank's own curve (`fedml run metrics RUN`)
            fedml.log(figures, step=epoch)

    digest = state_sha256(model.module)
    if rank == 0:
        art = os.environ.get("FEDML_ARTIFACT_DIR")
        if art:
            os.makedirs(art, exist_ok=True)
            path = os.path.join(art, "model_ddp.pt")
            torch.save({k: v.cpu() for k, v in model.module.state_dict().items()}, path)
            print(f"checkpoint saved to {path}")
    dist.barrier()
    dist.destroy_process_group()
    print(f"weights sha256: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
