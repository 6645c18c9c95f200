"""Selective Backprop under DistributedDataParallel: MNIST-1D, one process per device.

The same script runs on CPU processes (gloo) and on GPUs (nccl), unchanged:

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py            # 2 CPU processes
    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --smoke    # a few seconds
    torchrun --standalone --nproc_per_node=8 examples/ddp_train.py --epochs 30  # 8 GPUs

Every rank yields the same number of batches each epoch, the loss cache is the same on every
rank, and stale epochs split one global selection between the ranks (docs/distributed.md).
"""

from __future__ import annotations

import argparse
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
parser.add_argument("--epochs", type=int, default=12)
parser.add_argument("--batch-size", type=int, default=64, help="per rank")
parser.add_argument("--keep", type=float, default=0.5)
parser.add_argument("--stale", type=int, default=3, help="rescore every n epochs")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--smoke", action="store_true", help="tiny data and 2 epochs, for CI")
args = parser.parse_args()

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

if args.smoke:
    args.epochs = 2
    num_samples = 1000
else:
    num_samples = 20000
x_train, y_train, x_test, y_test = load_mnist1d(num_samples=num_samples)

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
ddp_model = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)

# Score with the bare module: the scoring pass needs no gradient synchronisation.
train = SelectiveBatchLoader(
    loader, model, keep=args.keep, stale=args.stale, index_key=2, epochs=args.epochs, end=0.875
)
optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)

# ----------------------------------------------------------------------------- train
began = time.perf_counter()
for epoch in range(args.epochs):
    train.set_epoch(epoch)
    for group in optimizer.param_groups:  # linear decay to 0, keyed by epoch
        group["lr"] = args.lr * (1 - epoch / args.epochs)
    ddp_model.train()
    for x, y, idx in train:
        losses = F.cross_entropy(ddp_model(x), y, reduction="none")
        train.record(losses)  # keeps the cache fresh for the examples trained on
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
    stats = train.stats.history[-1]
    if rank == 0:
        print(
            f"epoch {epoch:2d} {stats.mode:5s}: {stats.batches} batches per rank, "
            f"loaded {stats.loaded}, skipped {stats.loads_skipped}, scored {stats.scored}"
        )

# ----------------------------------------------------------------------------- evaluate
elapsed = time.perf_counter() - began
model.eval()
with torch.no_grad():
    accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
if rank == 0:
    print(f"{world} ranks: test accuracy {accuracy:.3f}, training {elapsed:.1f} s")
dist.destroy_process_group()
