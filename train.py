"""Train LLaMA-Adapter prompts (and the visual projection) on ScienceQA, COCO Caption or Alpaca.

    python train.py                                   # embedded default: tiny model, synthetic ScienceQA, CPU
    python train.py --no-images                       # the same without images (the text-only control)
    python train.py --recipe scienceqa --base /llama/7B --clip-weights /clip/ViT-L-14.safetensors \\
        --data /data/scienceqa
    torchrun --nproc_per_node 8 train.py --recipe alpaca --base /llama/7B --data alpaca_data.json
    torchrun --nproc_per_node 8 train.py --recipe alpaca --base /llama/65B --data alpaca_data.json --dist.strategy fsdp
    python train.py --resume runs/tiny-20250101-120000  # continue a stopped or killed run, as recorded
    python train.py --resume runs/x --epochs 10 --allow-changes  # continue it with a changed setting
    python train.py --recipe coco --help              # every setting, its meaning and the recipe's value
    python train.py --recipe v2 --base /llama/7B --clip-weights clip.pt --data /data/mix  # the V2 release's two
                                                      # phases: captions, then instructions (train.py --resume OUT)

Settings live in four typed dataclasses (model, data, optim, run) filled by a named recipe; every field can be
overridden as ``--section.field VALUE`` (nested: ``--model.llama_adapter.prompt_len 10``), and a few common ones have a
short alias (``--base``, ``--clip``, ``--data``, ``--lr`` ...). Field docstrings are the ``--help`` text.

The training code is the package ``training`` (one module per concern; the run directory's files are described in
training/state.py). Run as a program, Ctrl-C or SIGTERM saves the state and stops at the next step.
"""

import os
import signal
import sys

from training import TrainingError
from training.cli import parse_args
from training.phases import is_phased, run_phases
from training.run import run


def main(argv: list[str] | None = None, *, handle_signals: bool = False) -> int:
    """Command-line entry point; returns the exit status (usage errors exit 2 from argparse).

    handle_signals: install the SIGINT / SIGTERM handlers that save and stop (train.py run as a program; never
    inside a test process).
    """
    invocation = parse_args(argv, description="\n\n".join(__doc__.split("\n\n")[:2]))  # summary and usage
    try:
        if is_phased(invocation.config):  # --recipe v2: pretrain, then finetune, each a run of its own
            return run_phases(invocation.config, invocation.resume, handle_signals=handle_signals)
        return run(invocation.config, invocation.resume, handle_signals=handle_signals)
    except TrainingError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"\n{prefix}error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C: stop now; the last saved state.pt is still whole
        print("\naborted; the run directory keeps its last saved state (continue with --resume)", file=sys.stderr)
        return 128 + signal.SIGINT


def exit_process(status: int) -> None:
    """End the process with ``status``. Under torchrun, skip interpreter teardown: there a gloo worker thread still
    releasing the Python tensors of a collective (DDP keeps the process group alive past destroy_process_group)
    can abort the process with "terminate called without an active exception" (pytorch/pytorch#190489), rarely
    but also after the barrier every rank passes at the end. Every file is written, synced and closed by now."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    exit_process(main(handle_signals=True))
