"""What eval.scienceqa and eval.coco share: loading a run, the resumable generation log, batched greedy decoding,
atomic JSON output and the common command-line options.

Resume protocol: generations are appended to ``generations.jsonl`` in the output folder, one JSON record per item,
flushed and fsynced after every batch. Its first line is a header naming what produced them (run directory, adapter
hash, split, prompt format, decoding length); a restart with the same header skips the items already there, a
different header is an error rather than a silent mix of two models' outputs. A line cut short by a killed process
is dropped on reopen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERATIONS_FILE = "generations.jsonl"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.json"


class EvalError(ValueError):
    """A problem with the user's files or arguments; the message names the file, field or value."""


# ---- files ----------------------------------------------------------------------------------------------------------
def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON atomically (model.checkpoint.write_text_atomic: temp file, fsync,
    rename)."""
    from model.checkpoint import write_text_atomic

    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # serialise first: a bad value writes nothing
    write_text_atomic(Path(path), text)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (identifies the adapter a generation log came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class GenerationLog:
    """Append-only JSON-lines record of generated texts, keyed by item id; the resume point of an evaluation.

    Line 1 is ``{"header": header}``; every other line is ``{key_field: id, "output": text}``.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], key_field: str) -> None:
        self.path = Path(path)
        self.key_field = key_field
        self.done: dict[Any, str] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._reopen(header)
        else:
            self._append_lines([json.dumps({"header": header}, ensure_ascii=False)])

    def _reopen(self, header: dict[str, Any]) -> None:
        raw = self.path.read_bytes()
        if not raw.endswith(b"\n"):
            # The process died mid-line: cut the partial record so the next append starts on a fresh line.
            raw = raw[: raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(raw))
        lines = raw.decode("utf-8").split("\n")[:-1]  # not splitlines(): outputs may hold U+2028 unescaped
        try:
            found = json.loads(lines[0])["header"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EvalError(f"{self.path}: first line is not a generation-log header; delete the file") from e
        if found is None:
            self._append_lines([json.dumps({"header": header}, ensure_ascii=False)])
            return
        if found != header:
            diff = ", ".join(f"{k}: {found.get(k)!r} -> {header.get(k)!r}" for k in header if found.get(k) != header[k])
            raise EvalError(
                f"{self.path} holds generations made with other settings ({diff}); "
                "use another --output folder or delete the file to start over"
            )
        for n, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
                self.done[record[self.key_field]] = record["output"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvalError(f"{self.path}:{n}: malformed record; delete the file to start over") from e

    def _append_lines(self, lines: list[str]) -> None:
        from model.checkpoint import append_text

        append_text(self.path, "".join(line + "\n" for line in lines))  # a cut last line is dropped by _reopen

    def append(self, items: Iterable[tuple[Any, str]]) -> None:
        """Record (id, output) pairs durably (one write, flushed and fsynced)."""
        items = list(items)
        self._append_lines([json.dumps({self.key_field: i, "output": text}, ensure_ascii=False) for i, text in items])
        self.done.update(items)


# ---- the model side -------------------------------------------------------------------------------------------------
@dataclass
class GenerationItem:
    """One request to the model: an id, the prompt text and its image (path / PIL image) or None."""

    id: Any
    prompt: str
    image: Any = None


def generate_all(
    model: Any,
    items: Sequence[GenerationItem],
    log: GenerationLog,
    *,
    batch_size: int,
    max_new_tokens: int,
    desc: str,
    compile: bool = False,
) -> dict[Any, str]:
    """Greedy-decode every item not yet in ``log``, ``batch_size`` at a time, recording each batch as it finishes.

    Returns {id: output} for all items (those from earlier runs included). Images are dropped when the model has
    no visual path (a text-only adapter evaluated on image problems: the LLaMA-Adapter_T setting). ``compile``:
    decode with the torch.compile'd step (model.generate; the same greedy outputs).
    """
    from tqdm import tqdm

    from model.generate import generate

    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    todo = [item for item in items if item.id not in log.done]
    has_visual = getattr(model, "visual", None) is not None
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="item", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            outputs = generate(
                model,
                [item.prompt for item in batch],
                [item.image if has_visual else None for item in batch],
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                compile=compile,
            )
            log.append(zip([item.id for item in batch], outputs, strict=True))
            bar.update(len(batch))
    return {item.id: log.done[item.id] for item in items}


@dataclass
class LoadedRun:
    """A run's model (tokenizer attached), its adapter.json sidecar and the adapter file's hash."""

    model: Any
    sidecar: dict[str, Any]
    adapter_sha256: str


def load_run_for_eval(
    run_dir: str | Path,
    *,
    base: str | None = None,
    clip_weights: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedRun:
    """Load a train.py run directory, or an adapter file from elsewhere with ``base`` (an official V1 / V2 release
    ``.pth``, a PEFT directory: ``model.load_checkpoint``), for evaluation with the device / dtype resolved
    (model.devices: auto is CUDA in bfloat16 / float16 when present, else CPU in float32); load_run applies the seed
    the run recorded. The sidecar of a file from elsewhere is empty; its sha256 is that of the file itself."""
    from model import load_checkpoint
    from model.checkpoint import adapter_paths
    from model.devices import resolve_device, resolve_dtype

    run_dir = Path(run_dir)
    tensors_path, sidecar_path = adapter_paths(run_dir)
    is_run = sidecar_path.is_file() and tensors_path.is_file()
    if not is_run and (base is None or not run_dir.exists()):
        raise EvalError(
            f"{run_dir}: not a run directory (needs adapter.safetensors and adapter.json from train.py); an adapter "
            "file from elsewhere (official release .pth, PEFT directory) needs --base"
        )
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model, sidecar = load_checkpoint(
        run_dir, base=base, clip_weights=clip_weights, dtype=torch_dtype, device=torch_device
    )
    digest = file_sha256(tensors_path) if is_run else file_sha256(run_dir) if run_dir.is_file() else ""
    return LoadedRun(model=model, sidecar=sidecar or {}, adapter_sha256=digest)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, *, default_max_new_tokens: int) -> None:
    """The options every generating evaluation takes (run directory, overrides, decoding, output)."""
    parser.add_argument(
        "--checkpoint",
        metavar="RUN_DIR|FILE",
        help="run directory written by train.py, or an adapter file with --base (official V1 / V2 release .pth)",
    )
    parser.add_argument("--base", help="override the base model recorded in adapter.json (the run moved machines)")
    parser.add_argument("--clip-weights", help="override the CLIP weights file recorded in adapter.json")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the frozen weights (auto: bfloat16/float16 on GPU, float32 on CPU)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together (default: 8)")
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=default_max_new_tokens,
        help=f"generation length cap (default: {default_max_new_tokens})",
    )
    parser.add_argument("--output", metavar="DIR", help="folder for predictions.json, generations.jsonl, metrics.json")
    parser.add_argument(
        "--compile", action="store_true", help="decode with the torch.compile'd step (same outputs; faster on GPU)"
    )


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, score_option: str) -> argparse.Namespace:
    """The arguments, with exactly one of --checkpoint (generate, needs --output) and ``score_option`` (score an
    existing file); a usage error exits with status 2, as argparse's own."""
    args = parser.parse_args(argv)
    flag = "--" + score_option.replace("_", "-")
    if (args.checkpoint is None) == (getattr(args, score_option) is None):
        parser.error(f"give exactly one of --checkpoint RUN_DIR (generate) or {flag} FILE (score)")
    if args.checkpoint is not None and args.output is None:
        parser.error("--output DIR is required with --checkpoint")
    return args


def run_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    run: Callable[[argparse.Namespace], int],
    *,
    score_option: str,
) -> int:
    """The shared command line (``parse_cli``), then ``run``; a problem with the user's files or values is one
    ``error:`` line and exit status 2."""
    args = parse_cli(parser, argv, score_option=score_option)
    try:
        if args.output is not None:  # before the model is loaded: a read-only folder is refused at once
            from model.checkpoint import check_writable

            check_writable(Path(args.output), "the evaluation writes its files there: pick another --output")
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # EvalError, DataError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write failed (model.checkpoint.WriteError names the file); what was written is kept
        print(f"error: {e}", file=sys.stderr)
        return 1


def load_run_from_args(args: argparse.Namespace) -> LoadedRun:
    """load_run_for_eval with the options add_model_arguments declared."""
    return load_run_for_eval(
        args.checkpoint, base=args.base, clip_weights=args.clip_weights, device=args.device, dtype=args.dtype
    )


def percent(correct: int, total: int) -> float | None:
    """100 * correct / total rounded to 2 decimals (the official scripts' precision); None for an empty group."""
    return round(100.0 * correct / total, 2) if total else None


def format_rows(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[float | None]]]) -> str:
    """A plain-text table: one label column, then right-aligned numbers (2 decimals, '-' for None)."""
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(c), 6) for c in columns]
    lines = [" " * label_width + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths, strict=True))]
    for label, values in rows:
        cells = ("-" if v is None else f"{v:.2f}" for v in values)
        lines.append(f"{label:<{label_width}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)
