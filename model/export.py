"""Write a trained adapter in another tool's format: ``python -m model.export CHECKPOINT --to release FILE``.

CHECKPOINT is a train.py run directory (or, with --base, any adapter ``load_model`` reads). ``--to release``
writes a ``llama_adapter_v2`` adapter with the query visual path as the official LLaMA-Adapter V2 multimodal
release file (``{'model', 'config'}``, read by the official ``llama.load``; model/checkpoint/release_v2.py says what
it holds and what it refuses).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

FORMATS = ("release",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="train.py run directory (or adapter file + --base)")
    parser.add_argument("--to", choices=FORMATS, required=True, help="target format")
    parser.add_argument("output", metavar="FILE", help="where to write (release: a .pth file)")
    parser.add_argument("--base", help="base model (default: the run's)")
    parser.add_argument("--clip-weights", help="CLIP weights (default: the run's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model import load_checkpoint
    from model.checkpoint import check_writable
    from model.checkpoint.release_v2 import write_release_v2

    try:
        # before the model is loaded: a read-only destination is refused at once
        check_writable(Path(args.output).resolve().parent, f"{args.output} cannot be written there: pick another FILE")
        model, _ = load_checkpoint(args.checkpoint, base=args.base, clip_weights=args.clip_weights)
        path = write_release_v2(model, args.output)
    except (ValueError, FileNotFoundError, OSError) as e:  # CheckpointError / WriteError name the file
        print(f"python -m model.export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (official LLaMA-Adapter V2 release format)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
