"""Serve the demo: ``python -m app [--checkpoint RUN_DIR|FILE] [--base DIR] [--clip-weights FILE] [--port 7860]``.

--checkpoint takes a train.py run directory or an adapter file from elsewhere with --base (an official LLaMA-Adapter
V1 or V2 release ``.pth``, e.g. BIAS-7B.pth with --base <llama_dir>/7B --clip-weights <OpenAI CLIP state dict>; a
PEFT directory; our ``.safetensors``). ``make train`` writes runs/demo: ``--checkpoint runs/demo`` serves it. Without
--checkpoint the newest run under runs/ with a visual path is served (else the newest run: ``choose_run``), and the
command and the app's header say which and why; without any run the command says to train one first. --base /
--clip-weights point a run at weights that moved (they default to what the run's adapter.json records); --base alone
serves that base model with a zero-init adapter (text only). The server binds 127.0.0.1; --host 0.0.0.0 exposes it on
the network and --share asks Gradio for a public link: both are opt-in. The server's files are its user's alone
(umask 077; uploads in a private folder, bounded in size, removed when it stops). --compile decodes with the
torch.compile'd step (model.generate): the same replies, faster on a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.engine import Engine

RUNS_DIR = Path(__file__).resolve().parents[1] / "runs"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def choose_run(runs_dir: Path | None = None) -> tuple[Path, str] | None:
    """The run served without --checkpoint and why: the newest run under ``runs_dir`` (default: the repository's
    runs/) whose adapter has a visual path, since the demo is about images; else the newest run. None: no run."""
    runs_dir = runs_dir if runs_dir is not None else RUNS_DIR
    runs = _runs_by_age(runs_dir)
    if not runs:
        return None
    of = f"of {len(runs)} runs under {runs_dir}" if len(runs) > 1 else f"the only run under {runs_dir}"
    visual = [run for run in runs if _has_visual_path(run)]
    if len(runs) == 1:
        return runs[0], f"{of}; --checkpoint RUN_DIR serves another"
    if visual:
        return visual[-1], f"the newest with a visual path, {of}; --checkpoint RUN_DIR serves another"
    return runs[-1], f"the newest, {of}, none with a visual path (text only); --checkpoint RUN_DIR serves another"


def _runs_by_age(runs_dir: Path) -> list[Path]:
    """Run directories under ``runs_dir``, oldest adapter.json first."""
    sidecars = sorted(runs_dir.glob("*/adapter.json"), key=lambda p: p.stat().st_mtime) if runs_dir.is_dir() else []
    return [sidecar.parent for sidecar in sidecars]


def _has_visual_path(run_dir: Path) -> bool:
    """Whether the run's adapter.json records a visual config (an unreadable one counts as none)."""
    from model.checkpoint import read_json

    try:
        return bool((read_json(run_dir / "adapter.json").get("model_config") or {}).get("visual"))
    except (ValueError, AttributeError):
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app", description="Serve the LLaMA-Adapter demo: multimodal chat and image questions."
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="RUN_DIR|FILE",
        help=f"run directory of train.py (default: the newest in {RUNS_DIR} with a visual path; make train writes "
        "runs/demo), or an adapter file (official V1 / V2 release .pth, PEFT directory) with --base",
    )
    parser.add_argument(
        "--base", metavar="DIR", help="LLaMA base (Meta / Hugging Face directory or preset name); default: the run's"
    )
    parser.add_argument("--clip-weights", type=Path, metavar="FILE", help="local CLIP weights; default: the run's")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also publish a public gradio.live link")
    parser.add_argument("--max-file-size", default="10mb", help="largest upload accepted (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="frozen weights' dtype (auto: bfloat16/float16 on GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="decode with the torch.compile'd step (first reply compiles; GPU speed)"
    )
    return parser


def load_engine(args: argparse.Namespace, why: str = "") -> Engine:
    """Load the model the arguments name (raises CheckpointError / FileNotFoundError naming the file). Without
    --checkpoint (and --base) the run ``choose_run`` picks; ``why`` (or its reason) is said in the app's header.

    torch, the model and gradio are imported here and in ``main``, not at the top: ``--help`` answers at once."""

    from app.engine import Engine
    from model import load_checkpoint, load_model
    from model.devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.checkpoint is None and args.base is not None:
        model = load_model(args.base, clip_weights=args.clip_weights, dtype=dtype, device=device)
        return Engine(model, name=f"base {args.base}, zero-init adapter", compile=args.compile)
    chosen = None if args.checkpoint is not None else choose_run()
    if args.checkpoint is None and chosen is None:
        raise FileNotFoundError(
            f"no trained run found under {RUNS_DIR}: run `make train` first (it trains the tiny default in minutes), "
            "or pass --checkpoint RUN_DIR"
        )
    run_dir, why = (args.checkpoint, why) if chosen is None else chosen
    model, sidecar = load_checkpoint(
        run_dir, base=args.base, clip_weights=args.clip_weights, dtype=dtype, device=device
    )
    if sidecar is None:  # an adapter file from elsewhere (official V1 / V2 release, PEFT)
        kind = model.method.name if model.config.visual is None else f"{model.method.name}, {model.config.visual.kind}"
        return Engine(model, name=f"adapter {Path(run_dir).name} ({kind}) on {args.base}", compile=args.compile)
    about = about_run(sidecar.get("extra") or {})
    if why:  # chosen without --checkpoint: the header says so too
        about = f"Serving `{run_dir}`: {why}." + (f"\n\n{about}" if about else "")
    return Engine(
        model,
        question_format=_question_format(sidecar.get("prompt_format")),
        name=f"run {Path(run_dir).name}",
        about=about,
        compile=args.compile,
    )


EMBEDDED_DEFAULT_NOTE = (
    "**This is the embedded tiny default** (`make train`): a 4-layer LLaMA 64 wide and a tiny CLIP, trained in "
    "minutes on a CPU on synthetic pictures of one centred shape. It knows the shape's **colour** (red, green, "
    "blue, yellow) and **size** (big, small); which shape it is, it mostly guesses. Ask about them in Chat "
    "(*What color is the shape in the picture?*, *Is the shape big or small?*, *Describe the picture.*), press "
    "Caption, or Answer with choices in the Image tab. Without an image it knows a few trained instructions "
    "(*Tell me about alpacas.*); anything else gets a fluent but made-up reply. Serve a run trained on real weights "
    "with `--checkpoint RUN_DIR`."
)
TINY_NOTE = (
    "**This is the tiny recipe** (`python train.py`): a 4-layer LLaMA 64 wide and a tiny CLIP, trained in seconds on "
    "a CPU on synthetic ScienceQA problems about pictures of one shape. It answers questions **with choices** about "
    "the shape's **colour** or **size**: use the Image tab's Answer. Captions and open chat are prompts it was not "
    "trained on, so their answers are nonsense."
)
TASK_NOTES = {
    "mix": "Trained on every format the demo serves: questions with choices (Answer), captions (Caption), "
    "conversations about an image and text instructions (Chat).",
    "scienceqa": "Trained on ScienceQA: Answer, with choices, is its task; Chat and Caption send prompts it was not "
    "trained on.",
    "coco": "Trained on COCO captions: Caption is its task; Chat and Answer send prompts it was not trained on.",
    "alpaca": "Trained on Alpaca instructions: Chat (text) is its task; it has not learned to use images.",
}


def about_run(extra: dict[str, Any]) -> str:
    """What a run was trained for, from its adapter.json's ``extra`` (recipe and task, as train.py records them)."""
    if extra.get("recipe") == "demo" and extra.get("task") == "mix":
        return EMBEDDED_DEFAULT_NOTE
    if extra.get("recipe") == "tiny" and extra.get("task") == "scienceqa":
        return TINY_NOTE
    note = TASK_NOTES.get(extra.get("task"), "")
    return f"Recipe {extra['recipe']}. {note}".strip() if extra.get("recipe") else note


def _question_format(prompt_format: str | None) -> str:
    """The run's ScienceQA format when it was trained on ScienceQA, else LLaMA-Adapter V1's."""
    from data.scienceqa import FORMATS

    return prompt_format if prompt_format in FORMATS else "llama_adapter"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no usage reporting
    why = ""
    chosen = choose_run() if args.checkpoint is None and args.base is None else None
    if chosen is not None:
        args.checkpoint, why = chosen
        print(f"serving {args.checkpoint}: {why}")
    try:
        engine = load_engine(args, why)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError / TokenizerError are ValueErrors
        print(f"python -m app: {e}", file=sys.stderr)
        return 2
    from app.ui import build_demo, launch

    print(f"serving {engine.describe()}")
    os.umask(0o077)  # the folders and files the server writes (uploads, Gradio's cache) are this user's alone
    demo = build_demo(engine)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share, max_file_size=args.max_file_size)
    finally:
        shutil.rmtree(demo.GRADIO_CACHE, ignore_errors=True)  # Gradio deletes the files, not their folders
    return 0


if __name__ == "__main__":
    sys.exit(main())
