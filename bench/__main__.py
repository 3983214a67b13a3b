"""``python -m bench train|generate``: this project vs PEFT on transformers' LlamaForCausalLM, one method at a time.

Defaults follow the device: on a GPU the 7B shape in bf16 (train: batch 4 x 512 tokens), on a CPU the ~100M
shape in fp32 (train: batch 2 x 256 tokens); generate: prompts of 256 tokens, 128 new tokens, batch 1 and 8.
See BENCHMARKS.md for what is measured and the recorded figures.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from bench.config import BenchConfig
from bench.lengths import ALPACA_MAX, DEFAULT_BATCH, DISTRIBUTIONS
from bench.measure import dtype_name, resolve_device, resolve_dtype
from bench.methods import METHODS
from bench.report import write_json
from bench.run import bench_generate, bench_train, format_generate, format_train
from bench.shapes import SHAPES

# (cpu, cuda) defaults for options left out.
DEFAULTS = {
    "train": {"shape": ("100m", "7b"), "batch": ("2", "4"), "seq": (256, 512), "steps": (3, 10), "warmup": (1, 3)},
    "generate": {"shape": ("100m", "7b"), "batch": ("1,8",) * 2, "seq": (256, 256), "steps": (1, 3), "warmup": (1, 1)},
}


SUBCOMMANDS = {
    "methods": ("bench.compare", "every PEFT method trained on the same data, steps and machine: one comparison table"),
    "memory": ("bench.memory", "predicted peak GPU memory per device of a training set-up (shape, method, quant)"),
}
"""Sub-commands with a module of their own: it gives add_arguments(parser) and main(args) -> exit status."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="This project vs PEFT on transformers' LlamaForCausalLM, same method and weights: speed, memory.",
    )
    sub = parser.add_subparsers(dest="task", required=True)
    helps = {
        "train": "tokens/s and peak memory of an adapter training step (forward, backward, AdamW)",
        "generate": "time to first token and decode tokens/s of greedy generation, with a greedy-agreement check",
    }
    for task, (module, text) in SUBCOMMANDS.items():
        p = sub.add_parser(task, help=text, description=text)
        importlib.import_module(module).add_arguments(p)
    for task, text in helps.items():
        p = sub.add_parser(task, help=text, description=text)
        p.add_argument(
            "--method",
            choices=METHODS,
            default="llama_adapter",
            help="the PEFT method both sides load, built by PEFT (default llama_adapter: PEFT's AdaptionPrompt)",
        )
        p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
        p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, float32 on cpu)")
        p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: 7b on cuda, 100m on cpu)")
        p.add_argument(
            "--batch",
            help="batch size; generate takes a comma list (default: train 4 on cuda / 2 on cpu, generate 1,8)",
        )
        p.add_argument("--seq", type=int, help="train: sequence length (512 / 256); generate: prompt length (256)")
        p.add_argument("--new-tokens", type=int, default=128, help="generate: new tokens per row (default 128)")
        p.add_argument("--steps", type=int, help="timed steps (train) or timed generations per batch (generate)")
        p.add_argument("--warmup", type=int, help="untimed steps / full-length generations first (>= 1)")
        p.add_argument("--threads", type=int, help="torch threads on both sides (default: torch's default here)")
        p.add_argument(
            "--rounds",
            type=int,
            default=1,
            help="run both sides N times, alternating which goes first, pooling their timed steps (busy machines)",
        )
        p.add_argument("--seed", type=int, default=0, help="seed of the shared weights, adapter and inputs")
        p.add_argument("--json", metavar="OUT", help="also write the full report (every measurement) here")
        p.add_argument("--workdir", help="keep the shared HF base and PEFT adapter here (default: a temp dir)")
        p.add_argument("--peak-tflops", type=float, help="device peak dense TFLOP/s for MFU (default: known GPUs)")
        p.add_argument("--peak-bandwidth-gbs", type=float, help="device memory bandwidth GB/s (default: from CUDA)")
        if task == "train":
            p.add_argument(
                "--lengths",
                choices=DISTRIBUTIONS,
                help="realistic example lengths (alpaca: mean 136, median 117, max 405 tokens): useful tokens/s, ours "
                f"with batches grouped by length vs PEFT with random dynamic padding (default batch {DEFAULT_BATCH})",
            )
        compiled = {
            "train": "ours trains with its blocks through torch.compile (compiled in the warmup steps)",
            "generate": "ours decodes with the torch.compile'd fixed-shape step (CUDA graphs on GPU; compiled in "
            "warmup)",
        }
        p.add_argument("--compile", action="store_true", help=compiled[task])
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Fill in the device-dependent defaults and validate."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    gpu = int(device.type == "cuda")
    defaults = {k: v[gpu] for k, v in DEFAULTS[args.task].items()}
    lengths = getattr(args, "lengths", None)
    if lengths is not None:  # bench/lengths.py: the rows take the distribution's lengths
        if args.seq is not None:
            raise ValueError(f"--seq does not apply with --lengths {lengths}: the rows take its lengths")
        defaults.update(seq=ALPACA_MAX, batch=str(DEFAULT_BATCH))

    def pick(name: str) -> object:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    try:
        batches = [int(b) for b in str(pick("batch")).split(",")]
    except ValueError:
        raise ValueError(f"--batch must be integers separated by commas, got {args.batch!r}") from None
    return BenchConfig(
        task=args.task,
        shape=pick("shape"),
        device=str(device),
        dtype=dtype_name(dtype),
        batches=batches,
        seq=pick("seq"),
        new_tokens=args.new_tokens,
        steps=pick("steps"),
        warmup=pick("warmup"),
        threads=args.threads if args.threads is not None else torch.get_num_threads(),
        seed=args.seed,
        rounds=args.rounds,
        peak_tflops=args.peak_tflops,
        peak_bandwidth_gbs=args.peak_bandwidth_gbs,
        workdir=args.workdir,
        method=args.method,
        lengths=lengths,
        compile=getattr(args, "compile", False),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[args.task][0]).main(args)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if cfg.task == "train":
        report = bench_train(cfg)
        print(format_train(report))
    else:
        report = bench_generate(cfg)
        print(format_generate(report))
    if args.json:
        write_json(report, args.json)
    if cfg.task == "generate" and not report["greedy_agree"]:
        if cfg.dtype == "float32":
            print("error: greedy outputs differ in float32: the two implementations disagree", file=sys.stderr)
            return 1
        print(f"note: greedy outputs differ in {cfg.dtype}; near-ties flip under 16-bit rounding", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
