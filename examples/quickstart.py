"""Quickstart: train a small 1-D CNN on MNIST-1D twice, plainly and with Selective Backprop.

    python examples/quickstart.py                 # about 15-30 s on a 2-core CPU
    python examples/quickstart.py --recipe none   # plain keep=0.5 selection, scored every epoch
    python examples/quickstart.py --smoke         # a few seconds; what the test suite runs

Both runs start from the same weights and data order. The selective run wraps the training
DataLoader in SelectiveBatchLoader with a measured recipe (`sbdata.recipe("lossless", 8)`: one
plain warm-up epoch, then the above-mean-loss examples of each batch topped up with a random,
up-weighted draw of the others, over 1.25x the epochs); the loop hands each batch's per-example
losses back with `record()`, which returns them weighted, so no extra scoring pass ever runs
and skipped examples are never even loaded. Measured figures: docs/index.md.

MNIST-1D is generated on this machine by the `mnist1d` package (no download) and cached
under ~/.cache/sbdata/ (or --data-dir) the first time.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbdata
from sbdata import SelectiveBatchLoader
from sbdata.datasets import load_mnist1d

#####  Settings  #####

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 8; 2 with --smoke)")
parser.add_argument("--recipe", default="lossless", help="sbdata.recipe name, or 'none' for plain keep=--keep")
parser.add_argument("--keep", type=float, default=0.5, help="with --recipe none: fraction of each batch kept")
parser.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and selection")
parser.add_argument("--data-dir", default=None, help="MNIST-1D cache directory (default ~/.cache/sbdata)")
parser.add_argument("--smoke", action="store_true", help="tiny run for tests: 400 examples, 2 epochs")
args = parser.parse_args()

hyp = {
    "num_samples": 400 if args.smoke else 60000,  # train + test; 80 % is training data
    "epochs": args.epochs or (2 if args.smoke else 8),
    "batch_size": 128,
    "lr": 3e-3,  # Adam, decayed linearly to 0 over training
    "weight_decay": 1e-4,
    "width": 32,  # conv channels
}

#####  Data  #####

x_train, y_train, x_test, y_test = load_mnist1d(num_samples=hyp["num_samples"], seed=42, cache_dir=args.data_dir)
train_set = TensorDataset(x_train, y_train)
print(f"MNIST-1D: {len(x_train)} training and {len(x_test)} test signals of length {x_train.shape[-1]}")


def make_loader(seed):
    # The DataLoader's own generator fixes the shuffling, so both runs see the same order.
    g = torch.Generator().manual_seed(seed)
    return DataLoader(train_set, batch_size=hyp["batch_size"], shuffle=True, generator=g)


#####  Model  #####


def make_model(seed, width):
    torch.manual_seed(seed)  # same initial weights for both runs
    return nn.Sequential(
        nn.Conv1d(1, width, 5, padding=2), nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),  # length 40 -> 20
        nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),  # 20 -> 10
        nn.Flatten(),
        nn.Linear(width * 10, 10),
    )


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(1000), y.split(1000)))
    model.train()
    return correct / len(y)


#####  Training  #####


def train(model, loader, epochs):
    """The ordinary loop; `loader` is a DataLoader or a SelectiveBatchLoader. Returns
    (seconds spent training, optimizer steps, examples back-propagated)."""
    opt = torch.optim.Adam(model.parameters(), lr=hyp["lr"], weight_decay=hyp["weight_decay"])
    record = getattr(loader, "record", None)  # SelectiveBatchLoader: feed training losses back
    steps = examples = 0
    began = time.perf_counter()
    for epoch in range(epochs):
        steps_this_epoch = len(loader)  # exact, this epoch's own length
        for i, (x, y) in enumerate(loader):
            progress = (epoch + i / steps_this_epoch) / epochs
            for group in opt.param_groups:
                group["lr"] = hyp["lr"] * (1.0 - progress)
            losses = F.cross_entropy(model(x), y, reduction="none")
            if record is not None:
                losses = record(losses)  # refreshes the loss cache and applies the batch's weights
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            opt.step()
            steps += 1
            examples += len(y)
    return time.perf_counter() - began, steps, examples


# Warm-up: the first forward/backward passes in a process pay one-off costs (allocator,
# kernel selection), which should not be billed to whichever run happens to go first.
warm = make_model(args.seed, hyp["width"])
for _ in range(5):
    F.cross_entropy(warm(x_train[:256]), y_train[:256]).backward()

epochs = hyp["epochs"]
if args.recipe == "none":
    options = {"keep": args.keep, "epochs": epochs}
else:  # a measured recipe: its own epoch budget, selection settings and stale loss cache
    options = sbdata.recipe(args.recipe, plain_epochs=epochs)
print(f"plain: {epochs} epochs; selective: {options}\n")

plain_model = make_model(args.seed, hyp["width"])
plain_seconds, plain_steps, plain_examples = train(plain_model, make_loader(args.seed), epochs)
plain_acc = accuracy(plain_model, x_test, y_test)

sb_model = make_model(args.seed, hyp["width"])
# The one-line change: wrap the loader, naming the model that scores the examples.
sb_loader = SelectiveBatchLoader(make_loader(args.seed), sb_model, seed=args.seed, **options)
sb_seconds, sb_steps, sb_examples = train(sb_model, sb_loader, options["epochs"])
sb_acc = accuracy(sb_model, x_test, y_test)

#####  Report  #####

print("sbdata epoch stats (examples):")
print("  epoch  mode    loaded  scored  selected  yielded  batches  scoring s")
for s in sb_loader.stats.history:
    print(
        f"  {s.epoch:5d}  {s.mode:6s} {s.loaded:7d} {s.scored:7d} {s.selected:9d} {s.yielded:8d}"
        f" {s.batches:8d} {s.scoring_seconds:10.2f}"
    )
print()
print(f"plain      test accuracy {100 * plain_acc:5.2f} %  train time {plain_seconds:5.1f} s"
      f"  ({plain_steps} steps, {plain_examples} examples back-propagated)")
print(f"selective  test accuracy {100 * sb_acc:5.2f} %  train time {sb_seconds:5.1f} s"
      f"  ({sb_steps} steps, {sb_examples} examples back-propagated)")
