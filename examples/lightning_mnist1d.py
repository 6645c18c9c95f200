"""Selective Backprop in a PyTorch Lightning script: a small 1-D CNN on MNIST-1D.

    python examples/lightning_mnist1d.py                        # 8 plain epochs' budget, "lossless" recipe
    python examples/lightning_mnist1d.py --recipe none --keep 0.3
    python examples/lightning_mnist1d.py --smoke                # a few seconds; what the tests run
    python examples/lightning_mnist1d.py --stop-after 4         # stop early, as if preempted ...
    python examples/lightning_mnist1d.py --resume runs/lightning_mnist1d/checkpoints/last.ckpt  # ... and go on

What changes from an ordinary LightningModule:

1. `train_dataloader()` wraps the DataLoader in `SelectiveBatchLoader`, with the module itself as
   the scorer.
2. `training_step` computes per-example losses and hands them back with
   `self.loader.record(losses)`, which refreshes the loss cache and applies the batch's weights.
3. The LR schedule is sized from `loader.total_steps()`: selective epochs are shorter than plain
   ones, so `trainer.estimated_stepping_batches` (first epoch's length x epochs) would be wrong.
4. `Trainer(callbacks=[SelectiveBackprop(), ...])` makes every epoch run its own full length and
   stores the loader's state in each checkpoint, so `--resume` continues exactly.

A resumed run must use the same settings as the run that saved the checkpoint (`--epochs`,
`--recipe`, `--keep`, `--seed`, ...): the loader refuses a checkpoint of another schedule.
`--stop-after` only says where this run stops.

MNIST-1D is generated on this machine by the `mnist1d` package (no download) and cached under
~/.cache/sbdata/ (or --data-dir) the first time.
"""

import argparse
import time
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbdata
from sbdata import SelectiveBatchLoader
from sbdata.datasets import load_mnist1d
from sbdata.integrations.lightning import SelectiveBackprop

#####  Settings  #####

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=None,
                    help="plain training's epoch budget (default 8; 3 with --smoke); a recipe trains for its own "
                         "multiple of it (see sbdata.recipes)")
parser.add_argument("--recipe", default="lossless", help="sbdata.recipe name, or 'none' for plain selection")
parser.add_argument("--keep", type=float, default=None,
                    help="fraction of each batch kept (default: the recipe's; 0.5 with --recipe none)")
parser.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (the schedule is unchanged)")
parser.add_argument("--resume", default=None, metavar="PATH", help="a checkpoint to resume from, e.g. .../last.ckpt")
parser.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and selection")
parser.add_argument("--data-dir", default=None, help="MNIST-1D cache directory (default ~/.cache/sbdata)")
parser.add_argument("--out-dir", default="runs/lightning_mnist1d", help="checkpoints and logs")
parser.add_argument("--smoke", action="store_true", help="tiny run for tests: 1000 examples, 3 plain epochs")
args = parser.parse_args()

hyp = {
    "num_samples": 1000 if args.smoke else 60000,  # train + test; 80 % is training data
    "plain_epochs": args.epochs or (3 if args.smoke else 8),
    "batch_size": 128,
    "lr": 3e-3,  # Adam's peak LR in a one-cycle schedule
    "weight_decay": 1e-4,
    "width": 32,  # conv channels
}

if args.recipe == "none":
    options = {"keep": 0.5 if args.keep is None else args.keep, "epochs": hyp["plain_epochs"]}
else:  # a measured recipe: its own epoch budget, selection settings and stale loss cache
    options = sbdata.recipe(args.recipe, plain_epochs=hyp["plain_epochs"])
    if args.keep is not None:
        options["keep"] = args.keep
epochs = options["epochs"]

#####  Data  #####

x_train, y_train, x_test, y_test = load_mnist1d(num_samples=hyp["num_samples"], seed=42, cache_dir=args.data_dir)
print(f"MNIST-1D: {len(x_train)} training and {len(x_test)} test signals of length {x_train.shape[-1]}")
print(f"recipe {args.recipe}: {epochs} epochs, {options}")

#####  Model  #####


class MNIST1DClassifier(L.LightningModule):
    def __init__(self, width: int, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),  # length 40 -> 20
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),  # 20 -> 10
            nn.Flatten(),
            nn.Linear(width * 10, 10),
        )
        self.loader = None  # the SelectiveBatchLoader, built on first use

    def forward(self, x):
        return self.net(x)

    def make_loader(self):
        if self.loader is None:
            g = torch.Generator().manual_seed(args.seed)  # the shuffling seed, saved in checkpoints
            source = DataLoader(TensorDataset(x_train, y_train), batch_size=hyp["batch_size"], shuffle=True, generator=g)
            # The one-line change: wrap the loader; this module scores the examples.
            self.loader = SelectiveBatchLoader(source, self, seed=args.seed, **options)
        return self.loader

    def train_dataloader(self):
        return self.make_loader()

    def val_dataloader(self):
        return DataLoader(TensorDataset(x_test, y_test), batch_size=1000)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        loss = self.loader.record(losses).mean()  # feeds the losses back, weighs them if the policy does
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        # Lightning calls this before train_dataloader(); the loader knows every epoch's length.
        total_steps = self.make_loader().total_steps()
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_end(self):
        s = self.loader.stats.history[-1]
        self.print(f"epoch {self.current_epoch:2d} {s.mode:5s}: {s.batches:4d} batches, "
                   f"{s.yielded:6d} examples trained on, {s.scored:6d} scored")


#####  Training  #####

L.seed_everything(args.seed, verbose=False)
model = MNIST1DClassifier(hyp["width"], hyp["lr"], hyp["weight_decay"])
checkpoints = ModelCheckpoint(dirpath=Path(args.out_dir) / "checkpoints", save_last=True)  # saves every epoch
trainer = L.Trainer(
    max_epochs=min(epochs, args.stop_after or epochs),
    callbacks=[SelectiveBackprop(), checkpoints],
    logger=CSVLogger(args.out_dir),
    accelerator="auto",
    devices=1,
    num_sanity_val_steps=0,
    log_every_n_steps=10,
    enable_progress_bar=not args.smoke,
    enable_model_summary=not args.smoke,
)
if args.resume:
    print(f"resuming from {args.resume}")

began = time.perf_counter()
trainer.fit(model, ckpt_path=args.resume)
seconds = time.perf_counter() - began

#####  Report  #####

metrics = trainer.validate(model, verbose=False)[0]
print(f"trained to epoch {trainer.current_epoch} of {epochs}, step {trainer.global_step} of "
      f"{model.loader.total_steps()}; last checkpoint {checkpoints.last_model_path}")
print(f"test accuracy {100 * metrics['val_acc']:5.2f} %  test loss {metrics['val_loss']:.6f}  "
      f"train time {seconds:5.1f} s")
