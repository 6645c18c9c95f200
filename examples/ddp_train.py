"""Selective Backprop under DistributedDataParallel: MNIST-1D, one process per device.

The same script runs on CPU processes (gloo) and on GPUs (nccl), unchanged:

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29500 examples/ddp_train.py
    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29500 examples/ddp_train.py --smoke
    torchrun --standalone --nproc_per_node=8 examples/ddp_train.py --epochs 30    # 8 GPUs

Checkpoint at every epoch's end and resume in a new launch, with the same settings and ranks:

    torchrun ... examples/ddp_train.py --save ckpt.pt --stop-after 5   # stops after epoch 4
    torchrun ... examples/ddp_train.py --save ckpt.pt --resume ckpt.pt # epochs 5 to 11

Every rank yields the same number of batches each epoch, the loss cache is the same on every
rank, and stale epochs split one global selection between the ranks (docs/distributed.md). So at
an epoch's end rank 0's `sb.state_dict()` resumes every rank, and rank 0 alone saves.

`--master_addr=127.0.0.1` makes the workers meet on the loopback address (torchrun's default
rendezvous, "static"); `--standalone` advertises this machine's host name instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from sbdata import SelectiveBatchLoader
from sbdata.datasets import load_mnist1d

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 12; 2 with --smoke)")
parser.add_argument("--batch-size", type=int, default=64, help="per rank")
parser.add_argument("--keep", type=float, default=0.5)
parser.add_argument("--stale", type=int, default=3, help="rescore every n epochs")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--save", default=None, metavar="PATH", help="checkpoint here at the end of every epoch (rank 0)")
parser.add_argument("--resume", default=None, metavar="PATH", help="continue from this checkpoint's next epoch")
parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop after epoch N-1, as if preempted (the schedule still spans --epochs)")
parser.add_argument("--dump-ids", default=None, metavar="PATH",
                    help="write every rank's per-epoch batches of example ids to this JSON file (rank 0)")
parser.add_argument("--data-dir", default=None, help="MNIST-1D cache directory (default ~/.cache/sbdata)")
parser.add_argument("--smoke", action="store_true", help="tiny data and 2 epochs, for CI")
args = parser.parse_args()
epochs = args.epochs or (2 if args.smoke else 12)

# ----------------------------------------------------------------------------- setup
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
local_rank = int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
else:
    torch.set_num_threads(1)  # one core per CPU process
torch.manual_seed(0)  # the same initial weights on every rank

num_samples = 1000 if args.smoke else 20000
if rank == 0:  # generate (and cache) the data once, then every rank reads the cached copy
    load_mnist1d(num_samples=num_samples, cache_dir=args.data_dir)
dist.barrier()
x_train, y_train, x_test, y_test = load_mnist1d(num_samples=num_samples, cache_dir=args.data_dir)

# ----------------------------------------------------------------------------- data and model
# The dataset returns each example's index, so the loss cache can be keyed by it; a plain
# DataLoader over a map-style dataset would also work without it (sbdata records the ids).
train_set = TensorDataset(x_train, y_train, torch.arange(len(y_train)))
sampler = DistributedSampler(train_set, shuffle=True, seed=0)
loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

model = nn.Sequential(
    nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
    nn.Conv1d(32, 32, 5, padding=2, stride=2), nn.ReLU(),
    nn.Conv1d(32, 32, 5, padding=2, stride=2), nn.ReLU(),
    nn.Flatten(), nn.Linear(32 * 10, 10),
).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)

# Score with the bare module: the scoring pass needs no gradient synchronisation.
train = SelectiveBatchLoader(loader, model, keep=args.keep, stale=args.stale, index_key=2, epochs=epochs, end=0.875)

start = 0
if args.resume:  # every rank loads the same file: rank 0's state at an epoch boundary
    checkpoint = torch.load(args.resume, map_location=device, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    train.load_state_dict(checkpoint["loader"])
    start = train.epoch  # the epoch after the one the checkpoint was taken at
    if rank == 0:
        print(f"resumed from {args.resume}: epoch {checkpoint['epoch']} done, continuing at epoch {start}")

ddp_model = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)


def save_checkpoint(path: str, epoch: int) -> None:
    """Rank 0 writes the model, the optimizer and the loader's state; the others wait for it."""
    if rank == 0:
        state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "loader": train.state_dict()}
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a crash while saving leaves the previous checkpoint whole
    dist.barrier()  # no rank runs ahead (or exits) before the checkpoint is complete


# ----------------------------------------------------------------------------- train
seen: dict[int, list[list[int]]] = {}  # epoch -> this rank's batches of example ids
stop = min(epochs, args.stop_after or epochs)
began = time.perf_counter()
for epoch in range(start, stop):
    train.set_epoch(epoch)
    for group in optimizer.param_groups:  # linear decay to 0, keyed by epoch
        group["lr"] = args.lr * (1 - epoch / epochs)
    ddp_model.train()
    for x, y, idx in train:
        seen.setdefault(epoch, []).append(idx.tolist())
        losses = F.cross_entropy(ddp_model(x), y, reduction="none")
        loss = train.record(losses).mean()  # keeps the cache fresh; weighs the losses if the policy does
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    stats = train.stats.history[-1]
    if rank == 0:
        print(
            f"epoch {epoch:2d} {stats.mode:5s}: {stats.batches} batches per rank, "
            f"loaded {stats.loaded}, skipped {stats.loads_skipped}, scored {stats.scored}",
            flush=True,
        )
    if args.save:
        save_checkpoint(args.save, epoch)

# ----------------------------------------------------------------------------- evaluate
elapsed = time.perf_counter() - began
model.eval()
with torch.no_grad():
    accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
if args.dump_ids:  # for tests: which examples each rank trained on, batch by batch
    mine = {"rank": rank, "pid": os.getpid(), "epochs": {str(e): b for e, b in seen.items()}}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(args.dump_ids, "w") as f:
            json.dump({"world_size": world, "ranks": everyone}, f)
if rank == 0:
    print(f"{world} ranks: test accuracy {accuracy:.3f}, training {elapsed:.1f} s")
dist.barrier()  # every rank done with the process group before any rank tears it down
gc.collect()  # free what still refers to the process group first: gloo can abort at exit otherwise
dist.destroy_process_group()
