"""Write a trained adapter in another tool's format: ``python -m model.export CHECKPOINT --to FORMAT OUT``.

CHECKPOINT is a train.py run directory (or, with --base, any adapter ``load_model`` reads; for ``--to hf`` also a
base directory alone). Formats:

- ``release``: a ``llama_adapter_v2`` adapter with the query visual path as the official LLaMA-Adapter V2 multimodal
  release file (``{'model', 'config'}``, read by the official ``llama.load``; model/checkpoint/release_v2.py says
  what it holds and what it refuses).
- ``peft``: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for
  ``PeftModel.from_pretrained``: llama_adapter, lora, prefix, prompt, ptuning (model/checkpoint/peft_export.py).
- ``hf``: a merged Hugging Face checkpoint for ``AutoModelForCausalLM.from_pretrained``: the base alone, LoRA and
  LLaMA-Adapter V2 without active prompts folded into the weights (model/checkpoint/hf_export.py).

``--text-only`` (peft, hf): a multimodal adapter is written without its visual path, computing what the model
computes for text-only input; without it a model with a visual path is refused (neither format takes images).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.llama import Transformer

FORMATS = ("release", "peft", "hf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="train.py run directory (or adapter file + --base)")
    parser.add_argument("--to", choices=FORMATS, required=True, help="target format")
    parser.add_argument("output", metavar="OUT", help="where to write (release: a .pth file; peft, hf: a directory)")
    parser.add_argument("--base", help="base model (default: the run's)")
    parser.add_argument("--clip-weights", help="CLIP weights (default: the run's)")
    parser.add_argument(
        "--text-only", action="store_true", help="peft, hf: leave a visual path out (what the model does on text)"
    )
    return parser


def is_base_dir(path: Path) -> bool:
    """Whether ``path`` is a base directory alone (Meta or Hugging Face weights, no adapter of ours or PEFT's)."""
    from model.checkpoint import CheckpointError, detect_base_format

    if not path.is_dir() or (path / "adapter.json").is_file() or (path / "adapter_config.json").is_file():
        return False
    try:
        detect_base_format(path)
    except CheckpointError:
        return False
    return True


def load_base_only(path: Path) -> Transformer:
    """The base of ``path`` with no method (``ModelConfig.method`` None) and its tokenizer, if it has one."""
    from model import ModelConfig, Transformer, attach_tokenizer, find_tokenizer
    from model.checkpoint import open_base

    ckpt = open_base(path)
    with torch.device("meta"):
        model = Transformer(ModelConfig(llama=ckpt.llama, method=None))
    ckpt.load_into(model, dtype=None, device=torch.device("cpu"))
    tokenizer = find_tokenizer(path)
    if tokenizer is not None:
        attach_tokenizer(model, tokenizer)
    return model.eval()


def export(args: argparse.Namespace) -> str:
    """Load CHECKPOINT and write it as ``args.to``; returns what was written, for people."""
    from model import load_checkpoint
    from model.checkpoint import check_writable
    from model.checkpoint.hf_export import write_hf
    from model.checkpoint.peft_export import write_peft
    from model.checkpoint.release_v2 import write_release_v2

    source, target = Path(args.checkpoint), Path(args.output).resolve()
    # before the model is loaded: a read-only destination is refused at once
    check_writable(target.parent if args.to == "release" else target, f"{args.output} cannot be written there: pick "
                   f"another {'FILE' if args.to == 'release' else 'DIR'}")  # fmt: skip
    if args.to == "hf" and args.base is None and is_base_dir(source):
        model = load_base_only(source)
    else:
        model, _ = load_checkpoint(source, base=args.base, clip_weights=args.clip_weights)
    if args.to == "release":
        return f"{write_release_v2(model, args.output)} (official LLaMA-Adapter V2 release format)"
    if args.to == "peft":
        return f"{write_peft(model, args.output, text_only=args.text_only)} (PEFT {model.method.peft_type} adapter)"
    what = "the base model" if model.config.method is None else f"the base with {model.method.name} folded in"
    return f"{write_hf(model, args.output, text_only=args.text_only)} (Hugging Face LlamaForCausalLM: {what})"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = export(args)
    except (ValueError, FileNotFoundError, OSError) as e:  # CheckpointError / WriteError name the file
        print(f"python -m model.export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
