"""Decode throughput with and without the decoded-image cache, on real H&E images.

Usage: python benchmarks/decode_cache.py [DATA] [--size 224] [--epochs 3]

DATA defaults to ../shared/data/breakhis-sample (700x460 PNG), else the bundled sample. Prints a
markdown table: images/s of one epoch over the dataset when every image is decoded (baseline),
the first cached epoch (decode + write), and later cached epochs (np.load only), with ratios.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from histoclass.data import scan
from histoclass.data.dataset import ManifestDataset
from histoclass.data.manifest import sample_path
from histoclass.data.transforms import Preprocess

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/breakhis-sample"


def epoch_rate(data: ManifestDataset) -> float:
    """Images per second for one pass over ``data`` in this process."""
    start = time.perf_counter()
    for i in range(len(data)):
        data[i]
    return len(data) / (time.perf_counter() - start)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=str(DEFAULT if DEFAULT.exists() else sample_path()))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    frame = scan(args.data).frame
    pre = Preprocess((args.size, args.size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    plain = ManifestDataset(frame, pre, train=True)
    rows = [("decode every epoch (baseline)", max(epoch_rate(plain) for _ in range(args.epochs)))]
    with tempfile.TemporaryDirectory() as tmp:
        cached = ManifestDataset(frame, pre, train=True, cache_dir=tmp)
        rows.append(("cache, first epoch (decode + write)", epoch_rate(cached)))
        rows.append(("cache, later epochs (np.load)",
                     max(epoch_rate(cached) for _ in range(args.epochs))))
        raw = ManifestDataset(frame, pre, cache_dir=tmp)
        start = time.perf_counter()
        for i in range(len(raw)):
            raw.image(i)
        rows.append(("cache hit, array only (no augmentation)",
                     len(raw) / (time.perf_counter() - start)))
    base = rows[0][1]
    print(f"{len(frame)} images from {args.data}, resized to {args.size}px, 1 thread, "
          f"{cpu_name()}, torch {torch.__version__}\n")
    print("| pipeline | images/s | ms/image | vs baseline |\n|---|---:|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {1000 / rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
