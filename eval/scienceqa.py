"""ScienceQA evaluation: greedy answers from a run, the answer letter parsed, accuracy by the official categories.

    python -m eval.scienceqa --checkpoint runs/RUN --data /data/scienceqa --output runs/RUN/eval-test
    python -m eval.scienceqa --predictions predictions.json --data /data/scienceqa [--output DIR]

Scoring follows ScienceQA's ``tools/evaluate_acc.py``: a problem counts for TXT when its hint is non-empty and for
IMG when it has an image (the two overlap), for NO when it has neither; NAT / SOC / LAN by subject; G1-6 / G7-12 by
grade; Avg = correct / number of problems in the split. Percentages are rounded to 2 decimals as there.

Parsing a generated answer is deterministic (the official GPT-3 script falls back to a *random* choice, which
makes scores irreproducible). In order:
1. every "The answer is X" / "The answer is (X)" in the text (phrase case-insensitive, letter upper-case): one
   distinct letter -> that answer, two different letters -> failure (ambiguous);
2. the whole output (after an optional leading "Answer:") is "B", "B.", "(B)" or "(B).";
3. the output starts with "(B) ", "B. " or "B) " (LLaVA's rule).
The letter must lie within the problem's choices. A failure is recorded as index -1 (always wrong), counted and
listed with its reason and text in metrics.json.

Scoring a results file (``--predictions``) reads problems.json and pid_splits.json only, as the official scorer
does: the folder may hold no images at all. Generating (``--checkpoint``) needs every image of the split and
refuses a missing one by name.

A pid of the split that is missing from a results file counts as wrong (as an unanswered question) and is reported
by count and name; a pid in the results that is not in the split is reported and ignored. Both are printed with
the table, so a partial results file cannot pass for a full one.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from data import read_json
from eval.common import (
    GENERATIONS_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    EvalError,
    GenerationItem,
    GenerationLog,
    add_model_arguments,
    format_rows,
    generate_all,
    load_run_from_args,
    percent,
    run_cli,
    write_json,
)

LETTERS = "ABCDE"
CATEGORIES = ("Avg", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
SUBJECT_CATEGORY = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
# LLaMA-Adapter V1 paper, Table 2 (ScienceQA test, 1.8M parameters).
PAPER_ROW = {
    "Avg": 85.19, "NAT": 84.37, "SOC": 88.30, "LAN": 84.36, "TXT": 83.72,
    "IMG": 80.32, "NO": 86.90, "G1-6": 85.83, "G7-12": 84.05,
}  # fmt: skip
DEFAULT_PROMPT_FORMAT = "llama_adapter"
LISTED_IN_TABLE = 10  # pids named in the printed notes; metrics.json lists them all

_ANSWER_PHRASE = re.compile(r"(?i:the answer is)[\s:]*\(?([A-Z])\)?(?![A-Za-z0-9])")
_WHOLE = re.compile(r"\(([A-Z])\)\.?|([A-Z])\.?")
_LEADING = re.compile(r"\(([A-Z])\)(?:\s|$)|([A-Z])[.)]\s")
_ANSWER_PREFIX = re.compile(r"(?i:answer)\s*:\s*")


class ParsedAnswer(NamedTuple):
    """A parsed output: the 0-based choice index, or -1 with ``error`` saying why."""

    index: int
    error: str | None = None


def parse_answer(text: str, n_choices: int) -> ParsedAnswer:
    """The choice an output names (rules in the module docstring); index -1 and a reason when there is none."""
    letters = list(dict.fromkeys(m.group(1) for m in _ANSWER_PHRASE.finditer(text)))  # distinct, in order
    if len(letters) > 1:
        return ParsedAnswer(-1, f"ambiguous: names {', '.join(letters)}")
    if not letters:
        body = text.strip()
        prefix = _ANSWER_PREFIX.match(body)
        body = body[prefix.end() :] if prefix else body
        match = _WHOLE.fullmatch(body) or _LEADING.match(body)
        if match is None:
            return ParsedAnswer(-1, "no answer letter found")
        letters = [match.group(1) or match.group(2)]
    index = ord(letters[0]) - ord("A")
    if index >= n_choices:
        return ParsedAnswer(-1, f"letter {letters[0]} is out of range for {n_choices} choices")
    return ParsedAnswer(index)


def _categories(problem: Any) -> list[str]:
    """The official groups a problem counts in (besides Avg)."""
    groups = []
    if problem.subject in SUBJECT_CATEGORY:
        groups.append(SUBJECT_CATEGORY[problem.subject])
    has_text, has_image = bool(problem.hint), problem.has_image
    groups += ["TXT"] * has_text + ["IMG"] * has_image + ["NO"] * (not has_text and not has_image)
    grade = int(problem.grade.removeprefix("grade")) if problem.grade.removeprefix("grade").isdigit() else None
    if grade is not None:
        groups.append("G1-6" if grade <= 6 else "G7-12")
    return groups


def _check_results(results: Mapping[str, Any], source: str) -> dict[str, int]:
    checked = {}
    for pid, value in results.items():
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.lstrip("-").isdigit():
                value = int(value)  # the official scorer applies int(); accept what it accepts
            else:
                raise EvalError(f"{source}: results[{pid!r}] = {value!r}; expected a choice index (int, -1 = none)")
        checked[str(pid)] = value
    return checked


def score_scienceqa(
    problems: Sequence[Any],
    results: Mapping[str, Any],
    outputs: Mapping[str, str] | None = None,
    *,
    source: str = "results",
) -> dict[str, Any]:
    """Official ScienceQA accuracy of ``results`` ({pid: choice index}) over ``problems`` (one split).

    problems: data.scienceqa Problem objects (pid, answer, choices, hint, has_image, subject, grade, topic).
    outputs: the generated texts, used to explain parse failures (results of -1). ``source`` names the results
    in error messages. Returns a JSON-able dict: the nine categories as percentages (None for an empty group),
    ``counts`` {category: {correct, total}}, ``topics``, ``parse_failures``, ``missing`` and ``unexpected``.
    """
    if not problems:
        raise EvalError("no problems to score against (empty split?)")
    results = _check_results(results, source)
    correct = dict.fromkeys(CATEGORIES, 0)
    total = dict.fromkeys(CATEGORIES, 0)
    topics: dict[str, list[int]] = {}
    missing, failures = [], []
    for problem in problems:
        pid = str(problem.pid)
        if pid not in results:
            missing.append(pid)
        pred = results.get(pid, -1)
        right = pred == problem.answer
        if pred == -1 and pid in results:
            text = (outputs or {}).get(pid)
            reason = parse_answer(text, len(problem.choices)).error if text is not None else None
            failures.append({"pid": pid, "error": reason or "no parseable answer", "output": text})
        for group in ("Avg", *_categories(problem)):
            correct[group] += right
            total[group] += 1
        topic = topics.setdefault(problem.topic, [0, 0])
        topic[0] += right
        topic[1] += 1
    split_pids = {str(p.pid) for p in problems}
    unexpected = sorted((pid for pid in results if pid not in split_pids), key=_pid_order)
    metrics: dict[str, Any] = {c: percent(correct[c], total[c]) for c in CATEGORIES}
    metrics["counts"] = {c: {"correct": correct[c], "total": total[c]} for c in CATEGORIES}
    metrics["topics"] = {
        t: {"accuracy": percent(c, n), "correct": c, "total": n} for t, (c, n) in sorted(topics.items())
    }
    metrics["parse_failures"] = {"count": len(failures), "items": failures}
    metrics["missing"] = {"count": len(missing), "pids": missing}
    metrics["unexpected"] = {"count": len(unexpected), "pids": unexpected}
    return metrics


def _pid_order(pid: str) -> tuple[int, int | str]:
    return (0, int(pid)) if pid.isdigit() else (1, pid)


def _named(pids: Sequence[str]) -> str:
    more = len(pids) - LISTED_IN_TABLE
    return ", ".join(pids[:LISTED_IN_TABLE]) + (f", ... ({more} more in metrics.json)" if more > 0 else "")


def format_table(metrics: Mapping[str, Any], label: str = "this run") -> str:
    """The category table of ``metrics`` (from score_scienceqa) beside the paper's LLaMA-Adapter row, with notes on
    parse failures, missing and unexpected pids."""
    n = metrics["counts"]["Avg"]["total"]
    rows = [
        (f"{label} (n={n})", [metrics[c] for c in CATEGORIES]),
        ("LLaMA-Adapter (paper, test)", [PAPER_ROW[c] for c in CATEGORIES]),
    ]
    lines = [format_rows(CATEGORIES, rows)]
    failures = metrics["parse_failures"]
    if failures["count"]:
        pids = [item["pid"] for item in failures["items"]]
        lines.append(f"unparseable answers (counted wrong): {failures['count']}: pids {_named(pids)}")
    if metrics["missing"]["count"]:
        lines.append(
            f"missing from the results (counted wrong): {metrics['missing']['count']} of {n}: "
            f"pids {_named(metrics['missing']['pids'])}"
        )
    if metrics["unexpected"]["count"]:
        lines.append(
            f"in the results but not in this split (ignored): {metrics['unexpected']['count']}: "
            f"pids {_named(metrics['unexpected']['pids'])}"
        )
    return "\n".join(lines)


# ---- generation ----------------------------------------------------------------------------------------------------
def predict(
    model: Any,
    problems: Sequence[Any],
    output_dir: str | Path,
    *,
    prompt_format: str,
    header: dict[str, Any],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    compile: bool = False,
) -> dict[str, Any]:
    """Generate an answer for every problem (resuming from ``output_dir/generations.jsonl``), parse it, and write
    ``predictions.json`` in the official results format; returns that dict {"results", "outputs"}.

    ``header`` identifies the model and settings in the generation log (a mismatch with an existing log is an
    error); ``evaluate`` passes the run directory and adapter hash.
    """
    from data.prompts import Query, log_fields, template_of
    from data.scienceqa import build_prompt

    output_dir = Path(output_dir)
    template = template_of(model)
    header = {**header, "prompt_format": prompt_format, **log_fields(template)}
    log = GenerationLog(output_dir / GENERATIONS_FILE, header, key_field="pid")
    prompts = {p.pid: template.prompt(Query(build_prompt(p, prompt_format), whole=True)) for p in problems}
    items = [GenerationItem(str(p.pid), prompts[p.pid], _image_input(p)) for p in problems]
    outputs = generate_all(
        model, items, log, batch_size=batch_size, max_new_tokens=max_new_tokens, desc="ScienceQA", compile=compile
    )
    predictions = {
        "results": {str(p.pid): parse_answer(outputs[str(p.pid)], len(p.choices)).index for p in problems},
        "outputs": {str(p.pid): outputs[str(p.pid)] for p in problems},
    }
    write_json(output_dir / PREDICTIONS_FILE, predictions)
    return predictions


def evaluate(
    model: Any,
    problems: Sequence[Any],
    output_dir: str | Path,
    *,
    checkpoint: str | Path,
    adapter_sha256: str,
    data: str | Path,
    split: str,
    prompt_format: str,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    compile: bool = False,
) -> dict[str, Any]:
    """Generate and score: ``predict`` on ``problems`` (of ``split`` of the ScienceQA folder ``data``), scored into
    ``output_dir/metrics.json`` {"split", ...score_scienceqa}; returns those metrics.

    ``checkpoint`` (the run directory) and ``adapter_sha256`` identify the model in the generation log; both the
    command line and train.py (after training) evaluate through here.
    """
    header = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "adapter_sha256": adapter_sha256,
        "data": str(Path(data).resolve()),
        "split": split,
        "max_new_tokens": max_new_tokens,
    }
    predictions = predict(
        model,
        problems,
        output_dir,
        prompt_format=prompt_format,
        header=header,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        compile=compile,
    )
    metrics = {"split": split, **score_scienceqa(problems, predictions["results"], predictions["outputs"])}
    write_json(Path(output_dir) / METRICS_FILE, metrics)
    return metrics


def _image_input(problem: Any) -> Path | io.BytesIO | None:
    """What the visual preprocess opens: the file (official layout) or the encoded PNG (Hugging Face copy)."""
    return io.BytesIO(problem.image_bytes) if problem.image_path is None and problem.has_image else problem.image_path


def read_predictions(path: str | Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    """(results, outputs or None) from a results file {"results": {pid: index}, "outputs"?: {pid: text}}."""
    data = read_json(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise EvalError(f'{path}: expected an object with "results": {{pid: choice index}}')
    outputs = data.get("outputs")
    if outputs is not None and not isinstance(outputs, dict):
        raise EvalError(f'{path}: "outputs" must be an object {{pid: generated text}}')
    wrong = next((pid for pid, text in (outputs or {}).items() if not isinstance(text, str)), None)
    if wrong is not None:
        raise EvalError(f"{path}: outputs[{wrong!r}] = {outputs[wrong]!r}; expected the generated text (a string)")
    return data["results"], outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.scienceqa",
        description="Evaluate a run on ScienceQA (generate, parse the letter, official category accuracy), "
        "or score an existing results file with --predictions.",
    )
    add_model_arguments(parser, default_max_new_tokens=64)
    parser.add_argument("--predictions", metavar="FILE", help="score this results file instead of generating")
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="ScienceQA folder: official layout (problems.json, pid_splits.json, images/) or the Hugging Face copy",
    )
    parser.add_argument("--split", default="test", help="pid_splits.json split: test | val | minitest ... (test)")
    parser.add_argument(
        "--prompt-format",
        help=f"override the run's recorded prompt format (default: the recorded one, else {DEFAULT_PROMPT_FORMAT})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return run_cli(build_parser(), argv, _run, score_option="predictions")


def _run(args: argparse.Namespace) -> int:
    from data.scienceqa import load_problems

    problems = load_problems(args.data, args.split, require_images=args.predictions is None)  # scoring: no images
    if args.predictions is not None:
        results, outputs = read_predictions(args.predictions)
        metrics = {"split": args.split, **score_scienceqa(problems, results, outputs, source=args.predictions)}
        if args.output is not None:
            write_json(Path(args.output) / METRICS_FILE, metrics)
        label = Path(args.predictions).name
    else:
        run = load_run_from_args(args)
        metrics = evaluate(
            run.model,
            problems,
            args.output,
            checkpoint=args.checkpoint,
            adapter_sha256=run.adapter_sha256,
            data=args.data,
            split=args.split,
            prompt_format=args.prompt_format or run.sidecar.get("prompt_format") or DEFAULT_PROMPT_FORMAT,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            compile=args.compile,
        )
        label = Path(args.checkpoint).name
    print(format_table(metrics, label=f"{label}: {args.split}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
