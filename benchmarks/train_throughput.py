"""Training throughput (images/s of forward + backward + Adam step) per ensemble member.

Each member at its native input size, with the training recipe's optimiser (Adam, two learning
rates) and frozen batch norm, on random input tensors: this measures the model step only, not
image decoding (the decoded-image cache takes that off the critical path after epoch 1).

CPU (default): every member with channels_last (what ``histoclass train`` uses), and for the
``--compare`` members also the NCHW layout as the baseline.
GPU (``--device cuda``): every member as fp32 NCHW (baseline) and as bf16 autocast +
channels_last (what ``histoclass train`` uses on GPU); also peak memory.

    python benchmarks/train_throughput.py                      # CPU, ~1-3 min on 2 cores
    python benchmarks/train_throughput.py --device cuda --out docs/throughput-gpu.md

Prints a markdown table; ``--out FILE`` also writes it (rewritten after every member, so a
killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from histoclass.models import MEMBERS, create_model, model_preprocess
from histoclass.train import epoch as tu


def step_rate(name: str, device: torch.device, batch: int, steps: int, warmup: int,
              channels_last: bool, amp: torch.dtype | None, size: int | None) -> dict:
    """Images/s of the training step of member ``name``; also input size and peak memory."""
    torch.manual_seed(0)
    model = create_model(name, 2, pretrained=False)
    h, w = model_preprocess(model, size).input_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    tu.freeze_batchnorm(model)
    head = {id(p) for p in tu.head_parameters(model)}
    opt = torch.optim.Adam([
        {"params": [p for p in model.parameters() if id(p) not in head and p.requires_grad],
         "lr": 1e-4},
        {"params": tu.head_parameters(model), "lr": 1e-3}])
    x = torch.randn(batch, 3, h, w, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=device)
    crit = torch.nn.CrossEntropyLoss()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    rate = batch * steps / (time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, opt, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"size": h, "rate": rate, "mem": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--models", default=",".join(MEMBERS))
    ap.add_argument("--compare", default="v1-b0,v2-b0",
                    help="CPU: members also measured without channels_last")
    ap.add_argument("--batch-size", type=int, help="default 8 on CPU, 64 on GPU")
    ap.add_argument("--steps", type=int, help="timed steps; default 3 on CPU, 15 on GPU")
    ap.add_argument("--warmup", type=int, help="untimed steps; default 1 on CPU, 5 on GPU")
    ap.add_argument("--image-size", type=int, help="override every member's native size")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    ap.add_argument("--max-seconds", type=float, default=170, help="skip members after this")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    batch = args.batch_size or (64 if gpu else 8)
    steps = args.steps or (15 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    compare = set(args.compare.split(","))
    bf16 = torch.bfloat16 if not gpu or torch.cuda.is_bf16_supported() else torch.float16
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {args.threads} thread(s)"
    head = [f"Training step throughput on {where}: batch {batch}, {steps} timed steps after "
            f"{warmup} warm-up, torch {torch.__version__}", "",
            "| member | input | config | images/s | vs fp32 NCHW |"
            + (" peak GiB |" if gpu else ""),
            "|---|---|---|---|---|" + ("---|" if gpu else "")]
    lines: list[str] = []
    t_start = time.perf_counter()
    for name in args.models.split(","):
        if time.perf_counter() - t_start > args.max_seconds:
            lines.append(f"| {name} | | skipped (--max-seconds {args.max_seconds:g}) | | |")
            continue
        configs = ([("fp32 NCHW", False, None), (f"{str(bf16)[6:]} + channels_last", True, bf16)]
                   if gpu else ([("fp32 NCHW", False, None)] if name in compare else [])
                   + [("fp32 channels_last", True, None)])
        base = None
        for label, cl, amp in configs:
            try:
                r = step_rate(name, device, batch, steps, warmup, cl, amp, args.image_size)
            except Exception as exc:  # e.g. out of memory: report it and go on
                lines.append(f"| {name} | | {label} | error: {type(exc).__name__}: "
                             f"{str(exc)[:80]} | |")
                continue
            base = r["rate"] if label == "fp32 NCHW" else base
            ratio = f"{r['rate'] / base:.2f}x" if base else "-"
            mem = f" {r['mem']:.2f} |" if gpu else ""
            lines.append(f"| {name} | {r['size']} | {label} | {r['rate']:.1f} | {ratio} |{mem}")
            print(lines[-1], flush=True)
            text = "\n".join(head + lines) + "\n"
            if args.out:
                args.out.write_text(text)
    print("\n" + "\n".join(head + lines))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
