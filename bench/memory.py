"""``python -m bench memory``: will a training set-up fit? Predicted peak memory per device of one training step,
by component (bench/memory_predict.py says how each is counted), and with ``--measure`` the peak of a real step
(bench/memory_measure.py). The set-ups: bench/memory_setup.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from bench.measure import resolve_device
from bench.memory_measure import measure_in_subprocess
from bench.memory_predict import predict
from bench.memory_setup import LLAMA_SHAPES, Setup
from bench.report import write_json

GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``python -m bench memory`` options."""
    parser.add_argument("--shape", default="7b", help=f"model shape: {', '.join(LLAMA_SHAPES)} (default 7b)")
    parser.add_argument("--method", default="llama_adapter", help="PEFT method, with its default settings")
    parser.add_argument(
        "--dtype", help="float32 | bfloat16 | float16 of the frozen base (default bfloat16; --measure on cpu: float32)"
    )
    parser.add_argument("--quantize", default="none", help="none | nf4 | int8: the frozen block linears")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per device (default 4)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    parser.add_argument(
        "--loss-chunk", type=int, default=1024, help="targets per loss chunk, 0: all at once (default 1024)"
    )
    parser.add_argument("--gpus", type=int, default=1, help="devices (processes) of the job (default 1)")
    parser.add_argument("--strategy", default="ddp", help="ddp | fsdp (fsdp shards the frozen base)")
    parser.add_argument("--images", action="store_true", help="with the CLIP tower (--clip) of the visual path")
    parser.add_argument("--clip", default="ViT-L-14-quickgelu", help="open_clip tower with --images")
    parser.add_argument("--measure", action="store_true", help="also run training steps and measure the peak")
    parser.add_argument("--device", help="--measure on: cpu | cuda | cuda:N (default cuda if available)")
    parser.add_argument("--json", metavar="OUT", help="also write the prediction (and measurement) here")


def setup_from_args(args: argparse.Namespace) -> tuple[Setup, torch.device | None]:
    """The set-up and the measuring device (None without --measure); ValueError naming a bad flag."""
    device = resolve_device(args.device) if args.measure else None
    dtype = args.dtype or ("float32" if device is not None and device.type == "cpu" else "bfloat16")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    setup = Setup(
        shape=args.shape, method=args.method, dtype=dtype, quantize=args.quantize, batch=args.batch, seq=args.seq,
        activation_checkpointing=args.activation_checkpointing, loss_chunk=args.loss_chunk, gpus=args.gpus,
        strategy=args.strategy, images=args.images, clip=args.clip,
    )  # fmt: skip
    if args.measure and (setup.gpus > 1 or setup.strategy == "fsdp"):
        raise ValueError("--measure runs one process: leave out --gpus / --strategy fsdp")
    return setup, device


ROWS = (
    ("weights", "weights (frozen base)"),
    ("trainable_optimizer", "trainable + grads + AdamW"),
    ("activations", "activations (saved)"),
    ("logits", "logits / loss"),
    ("block_backward", "block backward beyond loss"),
    ("total", "total"),
)


def format_report(report: dict[str, Any]) -> str:
    """The breakdown table, GiB per device."""
    s, c, b = report["setup"], report["counts"], report["bytes"]
    devices = f"{s['gpus']} GPU{'s' if s['gpus'] > 1 else ''} ({s['strategy']})"
    lines = [
        f"{s['shape']} {s['dtype']}, quantize {s['quantize']}, batch {s['batch']} x seq {s['seq']} per device, "
        f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}, loss chunk "
        f"{s['loss_chunk'] or 'off'}, {devices}{', images' if s['images'] else ''}",
        f"method: {report['method']}; {c['trainable']:,} trainable values, "
        f"{c['block_linears'] + c['other_frozen']:,} frozen LLaMA values"
        + (f" + {c['visual_tower']:,} CLIP" if c["visual_tower"] else "")
        + f", {report['graph_layers']} layers in the backward graph",
        "",
        f"{'component':<30}{'GiB/device':>12}",
    ]
    lines += [f"{label:<30}{b[key] / GIB:>12.2f}" for key, label in ROWS]
    measured = report.get("measured")
    if measured is not None:
        ratio = b["total"] / measured["peak_bytes"] - 1
        lines += [
            f"{'measured peak':<30}{measured['peak_bytes'] / GIB:>12.2f}   prediction {ratio:+.1%}",
            f"  ({measured['device']}: {measured['how']})",
        ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Predict (and with --measure, measure) and print the table; exit status 2 on a bad flag."""
    try:
        setup, device = setup_from_args(args)
        report = predict(setup)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device is not None:
        report["measured"] = measure_in_subprocess(setup, device)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    return 0
