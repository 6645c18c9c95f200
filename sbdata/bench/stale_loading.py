"""Micro-benchmark: how long a stale epoch takes to load, against a full epoch.

A dataset of small JPEG images, decoded in ``__getitem__`` (Pillow) as a real image pipeline
does, is read through a 2-worker DataLoader. A full epoch loads and decodes every image. A
stale epoch of ``SelectiveBatchLoader(stale=n)`` picks ``keep`` of them from cached losses
first and loads only those. Both run side by side, alternating, in one process; the ratio of
median times is reported (no training step, so this isolates the data pipeline).

    python -m sbdata.bench.stale_loading            # ~1 min on 2 CPU cores
    python -m sbdata.bench.stale_loading --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sbdata import SelectiveBatchLoader


def _pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("this benchmark decodes JPEGs with Pillow: pip install pillow") from e
    return Image


class JpegDataset(Dataset):
    """``n`` synthetic ``size``x``size`` RGB JPEGs, decoded to float tensors on every access."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        image_cls = _pillow()
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 10, (n,), generator=gen)
        self.blobs = []
        base = torch.linspace(0, 255, size).repeat(size, 1)
        for i in range(n):
            noise = torch.randint(0, 64, (size, size, 3), generator=gen)
            pixels = (base[..., None] + noise + 7 * i) % 256
            buffer = io.BytesIO()
            image_cls.fromarray(pixels.to(torch.uint8).numpy()).save(buffer, format="JPEG", quality=90)
            self.blobs.append(buffer.getvalue())

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        image = _pillow().open(io.BytesIO(self.blobs[i])).convert("RGB")
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = x.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float().div_(255)
        return x, int(self.labels[i])


def _time_epoch(iterable) -> float:
    began = time.perf_counter()
    for _ in iterable:
        pass
    return time.perf_counter() - began


def run(n: int, size: int, batch_size: int, keep: float, reps: int, num_workers: int) -> dict:
    dataset = JpegDataset(n, size)
    make_loader = lambda: DataLoader(  # noqa: E731
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    plain = make_loader()
    scorer = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10))
    sb = SelectiveBatchLoader(make_loader(), scorer, keep=keep, stale="once")
    _time_epoch(sb)  # the one scoring epoch fills the cache
    _time_epoch(plain)  # warm both worker pools
    full, stale = [], []
    for _ in range(reps):
        full.append(_time_epoch(plain))
        stale.append(_time_epoch(sb))
        assert sb.stats.history[-1].mode == "stale"
    last = sb.stats.history[-1]
    result = {
        "examples": n,
        "image_size": size,
        "batch_size": batch_size,
        "keep": keep,
        "num_workers": num_workers,
        "full_epoch_s": statistics.median(full),
        "stale_epoch_s": statistics.median(stale),
        "stale_loaded": last.loaded,
        "stale_skipped": last.loads_skipped,
    }
    result["ratio"] = result["stale_epoch_s"] / result["full_epoch_s"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.size, args.reps = 256, 32, 2
    result = run(args.examples, args.size, args.batch_size, args.keep, args.reps, args.num_workers)
    print(json.dumps(result, indent=2))
    print(f"stale epoch / full epoch = {result['ratio']:.3f} (keep={args.keep})")
    return result


if __name__ == "__main__":
    main()
