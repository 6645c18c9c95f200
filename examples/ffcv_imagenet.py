"""ImageNet with FFCV and Selective Backprop: ffcv-imagenet's train_imagenet.py plus sbdata.

The training loop is ffcv-imagenet's (torchvision ResNet, channels_last, fp16 autocast and
GradScaler on CUDA, label smoothing, progressive resizing, per-iteration LR interpolated over
``len(loader)`` steps). The only change is three lines: wrap the FFCV training Loader in a
``SelectiveBatchLoader`` and iterate that (and take ``len`` of that) instead:

    train_loader = SelectiveBatchLoader(ffcv_train_loader, model, keep=0.5, stale=3, ...)
    iters = len(train_loader)
    for images, target in train_loader: ...

Every yielded batch is full-size, on the GPU, float16 and channels_last, made of the
highest-loss examples of the examples loaded. With ``--stale n`` only every n-th epoch scores
everything; the epochs between decode only the examples they keep.

Smoke test (CPU, a synthetic 64-image .beton in a temp dir, resnet18, two epochs, ~20 s):

    python examples/ffcv_imagenet.py --smoke

ImageNet on 8 GPUs (betons written by ffcv-imagenet's write_imagenet.py; rn50 recipe):

    torchrun --nproc_per_node=8 examples/ffcv_imagenet.py \\
        --train-beton /data/imagenet/train_500_0.50_90.ffcv \\
        --val-beton /data/imagenet/val_500_0.50_90.ffcv \\
        --arch resnet50 --epochs 88 --batch-size 512 --lr 1.7 --weight-decay 1e-4 \\
        --keep 0.5 --stale 3 --sb-start 0.5 --sb-end 0.9 --interrupt 2 --workers 12

One GPU (rn18 recipe): ``python examples/ffcv_imagenet.py --train-beton ... --val-beton ...
--arch resnet18 --epochs 16 --batch-size 1024 --lr 0.5 --weight-decay 5e-5 --keep 0.5``.
Without sbdata (the baseline): ``--keep 1``.

Needs ``pip install 'sbdata[ffcv]' torchvision`` (and ``cupy`` for FFCV's GPU NormalizeImage).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter
from torch import nn

from sbdata import SelectiveBatchLoader

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
DEFAULT_CROP_RATIO = 224 / 256


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-beton", help="training .beton (ffcv-imagenet's write_imagenet.py)")
    p.add_argument("--val-beton", help="validation .beton")
    p.add_argument("--arch", default="resnet50", help="any torchvision.models constructor")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=88)
    p.add_argument("--batch-size", type=int, default=512, help="per process")
    p.add_argument("--workers", type=int, default=min(12, len(os.sched_getaffinity(0))))
    p.add_argument("--in-memory", type=int, default=1, help="1: os_cache (dataset fits in RAM)")
    p.add_argument("--order", choices=["quasi", "random"], default="quasi", help="random when distributed")
    p.add_argument("--flip", type=int, default=1, help="random horizontal flips")
    p.add_argument("--lr", type=float, default=1.7, help="peak LR")
    p.add_argument("--lr-peak-epoch", type=float, default=2)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--min-res", type=int, default=160)
    p.add_argument("--max-res", type=int, default=192)
    p.add_argument("--start-ramp", type=int, default=None, help="default: 74%% of the epochs")
    p.add_argument("--end-ramp", type=int, default=None, help="default: 86%% of the epochs")
    p.add_argument("--val-res", type=int, default=256)
    # Selective Backprop
    p.add_argument("--keep", type=float, default=0.5, help="fraction kept; 1 = plain training")
    p.add_argument("--stale", type=int, default=None, help="rescore every n epochs (Stale-SB)")
    p.add_argument("--sb-start", type=float, default=0.0, help="selection starts at this fraction")
    p.add_argument("--sb-end", type=float, default=1.0, help="and ends here")
    p.add_argument("--interrupt", type=int, default=0, help="every n-th batch passes unselected")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic run on CPU (< 1 min)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(
            arch="resnet18", num_classes=4, epochs=2, batch_size=16, workers=1, lr=0.1, lr_peak_epoch=1,
            min_res=32, max_res=64, start_ramp=0, end_ramp=1, val_res=64, keep=0.5, stale=2,
            order="random", flip=0,  # each costs seconds of JIT compilation on a small CPU
        )
    elif not (args.train_beton and args.val_beton):
        p.error("--train-beton and --val-beton are required (or --smoke)")
    args.start_ramp = int(0.74 * args.epochs) if args.start_ramp is None else args.start_ramp
    args.end_ramp = int(0.86 * args.epochs) if args.end_ramp is None else args.end_ramp
    return args


# ----------------------------------------------------------------------------- schedules


def get_resolution(args, epoch: int) -> int:
    """Progressive resizing: min_res until start_ramp, max_res from end_ramp, a multiple of 32."""
    assert args.min_res <= args.max_res
    if epoch <= args.start_ramp:
        return args.min_res
    if epoch >= args.end_ramp:
        return args.max_res
    interp = np.interp([epoch], [args.start_ramp, args.end_ramp], [args.min_res, args.max_res])
    return int(np.round(interp[0] / 32)) * 32


def get_lr(args, epoch: float) -> float:
    """Triangular schedule: linear warmup to lr at lr_peak_epoch, then linear decay to 0."""
    xs, ys = [0, args.lr_peak_epoch, args.epochs], [1e-4 * args.lr, args.lr, 0]
    return float(np.interp([epoch], xs, ys)[0])


# ----------------------------------------------------------------------------- data


def create_train_loader(args, device: torch.device, distributed: bool):
    decoder = RandomResizedCropRGBImageDecoder((args.min_res, args.min_res))
    flip = [RandomHorizontalFlip()] if args.flip else []
    if device.type == "cuda":  # ffcv-imagenet's pipeline: normalize to fp16 on the GPU
        image = [decoder, *flip, ToTensor(), ToDevice(device, non_blocking=True),
                 ToTorchImage(), NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float16)]
        label = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]
    else:  # CPU: FFCV's JIT ops (NormalizeImage included) must come before the torch ops
        image = [decoder, *flip, NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32), ToTensor(), ToTorchImage()]
        label = [IntDecoder(), ToTensor(), Squeeze()]
    loader = Loader(
        args.train_beton,
        batch_size=args.batch_size,
        num_workers=args.workers,  # always explicit (FFCV's default can exceed the CPU affinity)
        order=OrderOption.RANDOM if distributed or args.order == "random" else OrderOption.QUASI_RANDOM,
        os_cache=bool(args.in_memory),
        drop_last=True,
        pipelines={"image": image, "label": label},
        distributed=distributed,
        seed=0,
    )
    return loader, decoder


def create_val_loader(args, device: torch.device, distributed: bool) -> Loader:
    decoder = CenterCropRGBImageDecoder((args.val_res, args.val_res), ratio=DEFAULT_CROP_RATIO)
    if device.type == "cuda":
        image = [decoder, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                 NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float16)]
        label = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]
    else:
        image = [decoder, NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32), ToTensor(), ToTorchImage()]
        label = [IntDecoder(), ToTensor(), Squeeze()]
    return Loader(
        args.val_beton,
        batch_size=args.batch_size,
        num_workers=args.workers,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": image, "label": label},
        distributed=distributed,
    )


class SyntheticImageNet:
    """ImageNet-shaped stand-in: 32x32 RGB images whose colour depends on the class, plus noise."""

    def __init__(self, n: int, num_classes: int) -> None:
        self.n, self.num_classes = n, num_classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        label = i % self.num_classes
        rng = np.random.default_rng(i)
        colour = np.array([60 + 50 * label, 200 - 40 * label, 100 + 30 * (label % 2)])
        image = np.clip(colour + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        return image, label


def write_smoke_betons(folder: str, num_classes: int) -> tuple[str, str]:
    paths = []
    for name, n in (("train", 64), ("val", 32)):
        path = os.path.join(folder, f"{name}.beton")
        fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField()}
        DatasetWriter(path, fields, page_size=1 << 21, num_workers=1).from_indexed_dataset(
            SyntheticImageNet(n, num_classes), chunksize=16
        )
        paths.append(path)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------- model


def create_model_and_scaler(args, device: torch.device):
    model = getattr(torchvision.models, args.arch)(num_classes=args.num_classes)
    model = model.to(device=device, memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    return model, scaler


def create_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    bn = [p for n, p in model.named_parameters() if "bn" in n or "downsample.1" in n]
    others = [p for n, p in model.named_parameters() if not ("bn" in n or "downsample.1" in n)]
    groups = [{"params": bn, "weight_decay": 0.0}, {"params": others, "weight_decay": args.weight_decay}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


# ----------------------------------------------------------------------------- loops


def train_epoch(args, epoch, model, train_loader, optimizer, scaler, loss_fn, device) -> float:
    model.train()
    iters = len(train_loader)  # the wrapper's own length: exact, and what it yields this epoch
    lrs = np.interp(np.arange(iters), [0, iters], [get_lr(args, epoch), get_lr(args, epoch + 1)])
    total, steps = 0.0, 0
    for ix, (images, target) in enumerate(train_loader):
        for group in optimizer.param_groups:
            group["lr"] = lrs[ix]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = loss_fn(model(images), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total, steps = total + loss.item(), steps + 1
    assert steps == iters, (steps, iters)
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(model, val_loader, device) -> tuple[float, float]:
    model.eval()
    correct1 = correct5 = seen = torch.zeros((), device=device)
    for images, target in val_loader:
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            output = model(images)
        top = output.topk(min(5, output.shape[1]), dim=1).indices
        correct1 = correct1 + (top[:, 0] == target).sum()
        correct5 = correct5 + (top == target[:, None]).any(dim=1).sum()
        seen = seen + target.numel()
    stats = torch.stack([correct1, correct5, seen]).double()
    if dist.is_initialized():
        dist.all_reduce(stats)
    return float(stats[0] / stats[2]), float(stats[1] / stats[2])


def main(argv=None) -> None:
    args = get_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # torchrun: the process group must exist before the Loaders are built
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.smoke:
        device = torch.device("cpu")
        args.train_beton, args.val_beton = write_smoke_betons(tempfile.mkdtemp(prefix="sbdata-ffcv-"), args.num_classes)
    torch.backends.cudnn.benchmark = True
    rank0 = not distributed or dist.get_rank() == 0

    model, scaler = create_model_and_scaler(args, device)
    ffcv_train_loader, decoder = create_train_loader(args, device, distributed)
    val_loader = create_val_loader(args, device, distributed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    scorer = model  # the scoring pass uses the model being trained (unwrapped: no DDP collectives)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    optimizer = create_optimizer(args, scorer)

    # --- the sbdata change: wrap the FFCV loader; the rest of the loop is unchanged ---
    train_loader = SelectiveBatchLoader(
        ffcv_train_loader,
        scorer,
        keep=args.keep,
        loss_fn=loss_fn,  # the training loss, label smoothing included (used per example)
        stale=args.stale,
        epochs=args.epochs,
        start=args.sb_start,
        end=args.sb_end,
        interrupt=args.interrupt,
        autocast_dtype=torch.float16 if device.type == "cuda" else None,
    )

    for epoch in range(args.epochs):
        res = get_resolution(args, epoch)
        decoder.output_size = (res, res)  # progressive resizing: takes effect at the next iter()
        began = time.perf_counter()
        train_loss = train_epoch(args, epoch, model, train_loader, optimizer, scaler, loss_fn, device)
        s = train_loader.stats[epoch]
        if rank0:
            print(
                f"epoch {epoch} res {res} mode {s.mode}: loaded {s.loaded} (skipped {s.loads_skipped}), "
                f"scored {s.scored}, trained on {s.yielded} in {s.batches} batches, "
                f"loss {train_loss:.3f}, {time.perf_counter() - began:.1f}s",
                flush=True,
            )
    top1, top5 = evaluate(model, val_loader, device)
    if rank0:
        print(f"val top-1 {top1:.3f} top-5 {top5:.3f}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
