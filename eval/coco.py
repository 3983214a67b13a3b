"""COCO Caption evaluation: greedy captions from a run, scored with pycocoevalcap's scorers.

    python -m eval.coco --checkpoint runs/RUN --annotations dataset_coco.json --images /data/coco --output DIR
    python -m eval.coco --results DIR/predictions.json --annotations coco_karpathy_test_gt.json [--output DIR]

Annotations (read by data.coco): Karpathy's ``dataset_coco.json`` (a file named ``dataset_*.json``; the images of
``--split``, at ``IMAGES/filepath/filename``, references = the ``raw`` sentences) or a COCO-format ground truth
``{"images": [...], "annotations": [...]}`` such as captions_val2014.json or BLIP's coco_karpathy_test_gt.json (all
its images, at ``IMAGES/file_name``; ``--split`` does not apply). ``--images`` defaults as in data.coco.
Scoring a results file (``--results``) reads the annotations and the results only, as pycocoevalcap does: no image
needs to be there. Generating (``--checkpoint``) refuses a missing image by name.

Scoring is what ``COCOEvalCap.evaluate()`` computes, minus SPICE: both sides tokenized with the PTB tokenizer
(Stanford CoreNLP, lower-cased, punctuation dropped), then BLEU-1..4, METEOR, ROUGE_L and CIDEr(-D) called directly
(``evaluate()`` itself would build SPICE, which downloads Stanford CoreNLP 3.6.0 on first use; it is skipped). Only
images that have a caption are scored (as ``params['image_id'] = cocoRes.getImgIds()``); CIDEr's IDF comes from the
scored images' references, so a partial results file is flagged in the metrics and the printout. Numbers are saved
on the papers' scale (pycocoevalcap's fractions x 100).

Without Java (no ``java`` on PATH) METEOR is skipped and the tokenizer is a Python approximation of PTB
(lower-case, punctuation split off and dropped, brackets mapped to -lrb- / -rrb- as PTB does): BLEU, ROUGE_L and
CIDEr still come out, close to but not exactly the official figures; metrics.json says so.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data import read_json
from data.coco import CocoImage, caption_prompt, load_annotations, load_karpathy
from data.prompts import log_fields, template_of
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
    run_cli,
    write_json,
)

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr")
# LLaMA-Adapter V2 paper, Table 3 (COCO Caption; the paper reports BLEU@4 and CIDEr only).
PAPER_ROW = {"Bleu_4": 36.2, "CIDEr": 122.2}
SPICE_NOTE = "SPICE skipped: pycocoevalcap's Spice() downloads Stanford CoreNLP 3.6.0 at first use"
NO_JAVA_NOTE = (
    "java not found: METEOR skipped and captions tokenized by a Python approximation of the PTB tokenizer; "
    "BLEU / ROUGE_L / CIDEr are close to, not exactly, the official figures"
)
# Tokens PTBTokenizer removes after tokenizing (pycocoevalcap's list; '"' becomes `` or '' there, also removed).
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-"} | set(". ? ! , : - -- ... ;".split())
# With -lowerCase PTB writes brackets as lower-case -lrb- ..., which the list above (upper case) does not remove.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_PY_TOKEN = re.compile(r"n't\b|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-./:][^\W_]+)*|\.\.\.|--|\S")


# ---- annotations and results ----------------------------------------------------------------------------------------
def load_split(
    annotations: str | Path,
    split: str = "test",
    images_dir: str | Path | None = None,
    *,
    require_images: bool = True,
) -> list[CocoImage]:
    """The images to evaluate with their references, read by data.coco: a Karpathy file (``dataset_*.json``: the
    images of ``split``, at ``images_dir/filepath/filename``) or a COCO-format ground truth (every image, at
    ``images_dir/file_name``). ``images_dir`` defaults as in data.coco (beside the annotations).
    ``require_images=False`` (scoring) does not look for the image files."""
    if Path(annotations).name.startswith("dataset_"):
        images = load_karpathy(annotations, split, image_root=images_dir, require_images=require_images)
    else:
        images = load_annotations(annotations, image_dir=images_dir, require_images=require_images)
    if not images:
        raise EvalError(f"{annotations}: no images to evaluate (split {split!r})")
    return images


MAX_CAPTION_CHARS = 10_000
"""Longest caption a results file may hold (COCO's reference captions are ~50 characters; ours stop at
eval_max_new_tokens): a 20 MB one would keep the scorers busy for minutes."""


def check_results(results: Any, references: Mapping[int, list[str]], source: str = "results") -> dict[int, str]:
    """{image_id: caption} from a results list [{"image_id": int, "caption": str}]: one caption per image, every
    image_id present in the annotations (what COCO.loadRes asserts), with errors naming the entry."""
    if not isinstance(results, list):
        raise EvalError(f'{source}: expected a JSON list of {{"image_id": int, "caption": str}}')
    captions: dict[int, str] = {}
    for i, item in enumerate(results):
        if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
            raise EvalError(f'{source}: entry {i} must be {{"image_id": int, "caption": str}}, got {item!r:.80}')
        image_id, caption = item["image_id"], item["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise EvalError(f"{source}: entry {i}: image_id must be an int, got {image_id!r} "
                            f"({type(image_id).__name__})")  # fmt: skip
        if not isinstance(caption, str):
            raise EvalError(f"{source}: entry {i} (image_id {image_id}): caption must be a string, got {caption!r}")
        if len(caption) > MAX_CAPTION_CHARS:  # scoring cost grows with its length (CIDEr's n-grams, METEOR's search)
            raise EvalError(
                f"{source}: entry {i} (image_id {image_id}): caption of {len(caption):,} characters, over the limit of "
                f"{MAX_CAPTION_CHARS:,}; a caption is a sentence"
            )
        if image_id in captions:
            raise EvalError(f"{source}: image_id {image_id} has more than one caption (entry {i}); one per image")
        captions[image_id] = caption
    unknown = [i for i in captions if i not in references]
    if unknown:
        raise EvalError(f"{source}: {len(unknown)} image_ids are not in the annotations, e.g. {unknown[:5]}")
    if not captions:
        raise EvalError(f"{source}: no captions")
    return captions


# ---- scoring --------------------------------------------------------------------------------------------------------
def python_tokenize(caption: str) -> str:
    """Approximate PTBTokenizer + pycocoevalcap's punctuation filter, for machines without Java."""
    text = re.sub(r"n't\b", " n't", caption.lower().replace("\n", " "))
    tokens = (_BRACKETS.get(t, t) for t in _PY_TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t != '"')


def tokenize(captions: Mapping[int, list[str]], use_java: bool) -> dict[int, list[str]]:
    """{id: [caption]} -> {id: [tokenized caption]}: pycocoevalcap's PTBTokenizer, or ``python_tokenize``."""
    if not use_java:
        return {i: [python_tokenize(c) for c in caps] for i, caps in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTB reads one caption per line and its output is matched back by line number: a \r or U+2028 inside a
    # caption would shift every later one. Collapsing whitespace runs to one space changes no token.
    lines = {i: [{"caption": " ".join(c.split())} for c in caps] for i, caps in captions.items()}
    tokenized = PTBTokenizer().tokenize(lines)
    short = [i for i, caps in captions.items() if len(tokenized.get(i, [])) != len(caps)]
    if short:
        raise EvalError(f"PTB tokenizer output does not line up with the captions (image_id {short[0]} first)")
    return tokenized


def score_captions(references: Mapping[int, list[str]], captions: Mapping[int, str]) -> dict[str, Any]:
    """pycocoevalcap's BLEU-1..4, METEOR, ROUGE_L and CIDEr of ``captions`` {image_id: caption} against
    ``references`` {image_id: [caption, ...]}, over the images that have a caption; values x 100.

    Uses Java (PTB tokenizer, METEOR) when ``java`` is on PATH, else the Python fallback (see module docstring).
    Returns a JSON-able dict: the metric values, ``images`` scored, ``missing`` references without a caption,
    ``tokenizer``, ``skipped`` and ``notes``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [i for i in references if i in captions]
    unknown = [i for i in captions if i not in references]
    if unknown:
        raise EvalError(f"{len(unknown)} captioned image_ids have no references, e.g. {unknown[:5]}")
    if not ids:
        raise EvalError("no captions to score")
    use_java = shutil.which("java") is not None
    gts = tokenize({i: list(references[i]) for i in ids}, use_java)
    res = tokenize({i: [captions[i]] for i in ids}, use_java)

    values: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    values.update({f"Bleu_{n + 1}": b for n, b in enumerate(bleu)})
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()  # starts a JVM; dropping the last reference stops it
        values["METEOR"], _ = meteor.compute_score(gts, res)
        del meteor
    values["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    values["CIDEr"], _ = Cider().compute_score(gts, res)

    missing = [i for i in references if i not in captions]
    metrics: dict[str, Any] = {name: 100.0 * float(values[name]) for name in METRIC_NAMES if name in values}
    metrics["scale"] = "percent: pycocoevalcap value x 100"
    metrics["images"] = len(ids)
    metrics["missing"] = {"count": len(missing), "image_ids": missing}
    metrics["tokenizer"] = "ptb" if use_java else "python-approximation"
    metrics["skipped"] = ["SPICE"] + ([] if use_java else ["METEOR"])
    metrics["notes"] = [SPICE_NOTE] + ([] if use_java else [NO_JAVA_NOTE])
    if missing:
        metrics["notes"].append(
            f"partial: {len(missing)} of {len(references)} images have no caption; scored the other {len(ids)} "
            "(CIDEr's IDF depends on the scored set, so this is not comparable with a full-split score)"
        )
    return metrics


def format_table(metrics: Mapping[str, Any], label: str = "this run") -> str:
    """The metrics beside the LLaMA-Adapter V2 paper row, with the notes (skipped metrics, partial results)."""
    rows = [
        (f"{label} (n={metrics['images']})", [metrics.get(name) for name in METRIC_NAMES]),
        ("LLaMA-Adapter V2 (paper)", [PAPER_ROW.get(name) for name in METRIC_NAMES]),
    ]
    return "\n".join([format_rows(COLUMNS, rows), *metrics["notes"]])


# ---- generation -----------------------------------------------------------------------------------------------------
def predict(
    model: Any,
    images: Sequence[CocoImage],
    output_dir: str | Path,
    *,
    header: dict[str, Any],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Caption every image (resuming from ``output_dir/generations.jsonl``) and write ``predictions.json``
    [{"image_id", "caption"}]; returns that list."""
    if getattr(model, "visual", None) is None:
        raise EvalError("this run has no visual path (a text-only adapter); it cannot caption images")
    output_dir = Path(output_dir)
    template = template_of(model)
    log = GenerationLog(output_dir / GENERATIONS_FILE, {**header, **log_fields(template)}, key_field="image_id")
    prompt = caption_prompt(template)
    items = [GenerationItem(im.image_id, prompt, im.path) for im in images]
    outputs = generate_all(
        model, items, log, batch_size=batch_size, max_new_tokens=max_new_tokens, desc="COCO", compile=compile
    )
    results = [{"image_id": im.image_id, "caption": outputs[im.image_id].strip()} for im in images]
    write_json(output_dir / PREDICTIONS_FILE, results)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.coco",
        description="Caption COCO images with a run and score them with pycocoevalcap (no SPICE), "
        "or score an existing results file with --results.",
    )
    add_model_arguments(parser, default_max_new_tokens=32)
    parser.add_argument("--results", metavar="FILE", help='score this [{"image_id", "caption"}] file instead')
    parser.add_argument(
        "--annotations", required=True, metavar="FILE", help="Karpathy dataset_coco.json or a COCO-format GT file"
    )
    parser.add_argument(
        "--images",
        metavar="DIR",
        help="images root: Karpathy: the folder holding val2014/ (default: the annotation file's folder); "
        "COCO format: the folder of the file_name images (default: as data.coco.load_annotations)",
    )
    parser.add_argument("--split", default="test", help="Karpathy split to evaluate: test | val (default: test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return run_cli(build_parser(), argv, _run, score_option="results")


def _run(args: argparse.Namespace) -> int:
    images = load_split(args.annotations, args.split, args.images, require_images=args.results is None)
    references = {im.image_id: im.references for im in images}
    if args.results is not None:
        results = read_json(Path(args.results))
        label = Path(args.results).name
    else:
        run = load_run_from_args(args)
        header = {
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "adapter_sha256": run.adapter_sha256,
            "annotations": str(Path(args.annotations).resolve()),
            "split": args.split,
            "max_new_tokens": args.max_new_tokens,
        }
        results = predict(
            run.model,
            images,
            args.output,
            header=header,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            compile=args.compile,
        )
        label = Path(args.checkpoint).name
    captions = check_results(results, references, source=args.results or "generated captions")
    metrics = {"annotations": str(args.annotations), "split": args.split, **score_captions(references, captions)}
    if args.output is not None:
        write_json(Path(args.output) / METRICS_FILE, metrics)
    print(format_table(metrics, label=label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
