"""ScienceQA: the official layout and the Hugging Face copy, and the prompt formats.

Layouts read unchanged (``load_problems`` recognizes which one ``root`` holds):

- Official (lupantech/ScienceQA, ``data/scienceqa/``): ``problems.json`` {pid: record with question, choices,
  answer, hint, image, task, grade, subject, topic, category, skill, lecture, solution, split},
  ``pid_splits.json`` {split: [pid, ...]} (train / val / test / trainval / minitrain / minival / minitest) and
  ``images/{split}/{pid}/{image}`` (``image`` is "image.png" or null). An optional ``captions.json`` (in ``root`` or
  its parent, the official ``data/captions.json``) gives each image-bearing problem a ``caption``.
- Hugging Face (e.g. derek-thomas/ScienceQA): a ``datasets`` ``save_to_disk`` folder (``dataset_dict.json``) or
  parquet files ``[data/]{split}-NNNNN-of-NNNNN*.parquet``; splits train / validation / test, the same columns
  without ``pid`` and ``split``, the image as an encoded PNG. Row i of a split is ``pid_splits[split][i]`` of the
  official file (the copy was built by walking pid_splits), so pids are rebuilt from a ``pid_splits.json`` in
  ``root`` or given as ``pid_splits=``; without one they are ``"{split}-{row}"``. "validation" and "val" name the
  same split in both layouts; the derived splits (trainval, mini*) need pid_splits.

Prompt formats (``build_prompt`` / ``build_target``; reference/data_formats.md Sec. 1.7):

- ``llama_adapter`` (default; LLaMA-Adapter V1 paper, Sec. 5.1 and Fig. 4: question, textual context, options,
  no lecture or explanation)::

      Question: {question}
      Context: {hint, "N/A" if empty}
      Choices: (A) {choice 0} (B) {choice 1} ...
      Answer:                                        -> target "The answer is (B)"

- ScienceQA's own layouts ``{input}-{output}``: input ``QCM`` (lines "Question:", "Context:", "Options:") or
  ``CQM`` (context first); output ``A`` ("The answer is B."), ``LEA`` ("{lecture} {solution} The answer is B.",
  the chain-of-thought target LLaVA trains on) or ``ALE`` ("The answer is B. BECAUSE: {lecture} {solution}").
  The prompt ends with "Answer:" as in ScienceQA's base prompt. Unlike the GPT-3 code we keep real newlines in
  lectures and solutions (as LLaVA does after conversion); runs of spaces are collapsed.

Checks on the files: train / val / test in pid_splits.json must be disjoint (a pid in two of them is a DataError:
a problem in both training and evaluation data); a pid listed twice in one split is used once, with one warning
giving the count (the duplicate adds nothing, and scoring must not count a problem twice). Image paths named by the
files (``image``, a pid, the Hugging Face ``image.path``) must stay inside the image folder, ``..`` and links
included. Scoring needs no image at all (``require_images=False``): the official scorer reads problems.json and
pid_splits.json only.

``use_caption=True`` appends the problem's caption to the context (ScienceQA's captioned text baselines).
Every ``Example`` keeps the problem's metadata (pid, subject, grade, has_text, has_image, ...) for per-category
scoring.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data import DataError, ImageFolder, InvalidRecords, read_json
from data.collate import Example
from data.prompts import ALPACA, PromptTemplate, Query

BASE_SPLITS = ("train", "val", "test")
HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
SUBJECTS = ("natural science", "social science", "language science")
GRADES = tuple(f"grade{i}" for i in range(1, 13))
FORMATS = ("llama_adapter", "QCM-A", "QCM-LEA", "QCM-ALE", "CQM-A", "CQM-LEA", "CQM-ALE")
STRING_FIELDS = ("question", "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
HF_COLUMNS = ("image", "choices", "answer", *STRING_FIELDS)


@dataclass
class Problem:
    """One ScienceQA problem with every field of problems.json; ``answer`` is the 0-based index into ``choices``.

    The image is a file (``image_path``, official layout) or the encoded PNG (``image_bytes``, Hugging Face copy).
    """

    pid: str
    question: str
    choices: list[str]
    answer: int
    hint: str
    image_path: Path | None
    task: str
    grade: str
    subject: str
    topic: str
    category: str
    skill: str
    lecture: str
    solution: str
    split: str
    caption: str = ""
    image_bytes: bytes | None = None

    @property
    def image(self) -> Path | bytes | None:
        """The image as a path or encoded bytes (None for text-only problems)."""
        return self.image_path if self.image_path is not None else self.image_bytes

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def answer_letter(self) -> str:
        return string.ascii_uppercase[self.answer]

    def meta(self) -> dict[str, Any]:
        """Metadata for evaluation (ScienceQA groups: subject, has_text/has_image/no context, grade)."""
        return {
            "pid": self.pid,
            "split": self.split,
            "answer": self.answer,
            "n_choices": len(self.choices),
            "subject": self.subject,
            "grade": self.grade,
            "topic": self.topic,
            "category": self.category,
            "skill": self.skill,
            "task": self.task,
            "has_text": bool(self.hint),
            "has_image": self.has_image,
        }


# ---- reading ----------------------------------------------------------------------------------------------------
def canonical_split(split: str) -> str:
    """ "validation" -> "val" (the Hugging Face name of the official split); other names unchanged."""
    return "val" if split == "validation" else split


def check_record(rec: Any) -> None:
    """Raise ValueError (message without the file) if ``rec`` is not a valid problems.json record."""
    if not isinstance(rec, dict):
        raise ValueError(f"record is a {type(rec).__name__}, not an object")
    missing = [k for k in ("question", "choices", "answer", "image", "split", *STRING_FIELDS) if k not in rec]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for key in STRING_FIELDS:
        if not isinstance(rec[key], str):
            raise ValueError(f"field {key!r} must be a string, got {rec[key]!r}")
    choices = rec["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"field 'choices' must be a list of at least 2 strings, got {choices!r}")
    if len(choices) > len(string.ascii_uppercase):
        raise ValueError(f"{len(choices)} choices; at most {len(string.ascii_uppercase)} can be lettered")
    answer = rec["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"answer {answer!r} is not an index into the {len(choices)} choices")
    if rec["split"] not in BASE_SPLITS:
        raise ValueError(f"unknown split {rec['split']!r} (expected one of {', '.join(BASE_SPLITS)})")
    if rec["subject"] not in SUBJECTS:
        raise ValueError(f"unknown subject {rec['subject']!r} (expected one of {', '.join(SUBJECTS)})")
    if rec["grade"] not in GRADES:
        raise ValueError(f"unknown grade {rec['grade']!r} (expected grade1 .. grade12)")


def make_problem(pid: str, rec: dict[str, Any], **image: Any) -> Problem:
    return Problem(
        pid=pid,
        choices=list(rec["choices"]),
        answer=int(rec["answer"]),
        **{k: rec[k] for k in STRING_FIELDS},
        split=rec["split"],
        **image,
    )


def load_problems(
    root: str | Path,
    split: str,
    *,
    skip_invalid: bool = False,
    pid_splits: str | Path | None = None,
    require_images: bool = True,
) -> list[Problem]:
    """The problems of ``split`` (train / val / validation / test / trainval / minitrain / ...), in file order.

    root: the official folder (problems.json, pid_splits.json, images/), a Hugging Face ``save_to_disk`` folder,
        or a folder of parquet files. pid_splits: a pid_splits.json for a Hugging Face copy (default: the one in
        root, if any). require_images: False to read the problems without looking for their image files (scoring
        never opens one); ``image_path`` is still set (and ``has_image`` true) for image problems.
    A malformed record (missing field, answer out of range, unknown split, missing image file, image path leaving
    the image folder) raises DataError naming the file and the pid; with ``skip_invalid=True`` it is skipped and one
    warning gives the count.
    """
    root = Path(root)
    if root.is_file() and root.name == "problems.json":
        root = root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such ScienceQA folder")
    split = canonical_split(split)
    if (root / "problems.json").is_file():
        return _load_official(root, split, skip_invalid, require_images)
    splits_file = Path(pid_splits) if pid_splits is not None else root / "pid_splits.json"
    from data.scienceqa_hf import load_hf

    return load_hf(root, split, skip_invalid, splits_file if splits_file.is_file() else None, require_images)


def read_pid_splits(file: Path) -> dict[str, list[str]]:
    data = read_json(file)
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in data.values()
    ):
        raise DataError(f"{file}: expected an object {{split: [pid strings]}}")
    first_split: dict[str, str] = {}
    for split in BASE_SPLITS:
        for pid in data.get(split, []):
            if first_split.setdefault(pid, split) != split:
                raise DataError(
                    f"{file}: pid {pid} is in both {first_split[pid]!r} and {split!r}; train / val / test must be "
                    "disjoint (a problem in two of them leaks between training and evaluation)"
                )
    return data


def split_pids(pid_splits: dict[str, list[str]], split: str, file: Path) -> list[str]:
    """The pids ``split`` lists, as listed (repeats included)."""
    if split not in pid_splits:
        raise DataError(f"{file}: unknown split {split!r}; the file has {', '.join(sorted(pid_splits))}")
    return pid_splits[split]


def pids_once(pids: list[str], split: str, file: Path) -> list[str]:
    """``pids`` with repeats dropped (first kept); one warning with the count and the first repeated pid."""
    unique = list(dict.fromkeys(pids))
    if len(unique) < len(pids):
        first = next(pid for pid, n in Counter(pids).items() if n > 1)
        warnings.warn(
            f"{file}: split {split!r} lists {len(pids) - len(unique)} pid(s) more than once (first: {first}); "
            "each problem is used once",
            stacklevel=4,
        )
    return unique


def load_captions(root: Path) -> dict[str, str]:
    """captions.json in root or its parent (the official data/captions.json beside data/scienceqa/)."""
    for file in (root / "captions.json", root.parent / "captions.json"):
        if file.is_file():
            data = read_json(file)
            captions = data.get("captions") if isinstance(data, dict) else None
            if not isinstance(captions, dict):
                raise DataError(f"{file}: expected an object with a 'captions' object {{pid: caption}}")
            return {str(k): str(v) for k, v in captions.items()}
    return {}


def _load_official(root: Path, split: str, skip_invalid: bool, require_images: bool) -> list[Problem]:
    problems_file, splits_file = root / "problems.json", root / "pid_splits.json"
    problems = read_json(problems_file)
    if not isinstance(problems, dict):
        raise DataError(f"{problems_file}: expected an object {{pid: problem}}, got a {type(problems).__name__}")
    pids = pids_once(split_pids(read_pid_splits(splits_file), split, splits_file), split, splits_file)
    captions = load_captions(root)
    invalid, images = InvalidRecords(problems_file, skip_invalid), ImageFolder(root / "images")
    out = []
    for pid in pids:
        if pid not in problems:
            invalid(f"pid {pid} is listed in {splits_file.name}[{split!r}] but is not in problems.json")
            continue
        rec = problems[pid]
        try:
            check_record(rec)
        except ValueError as e:
            invalid(f"pid {pid}: {e}")
            continue
        image_path = None
        if rec["image"] is not None:
            if not isinstance(rec["image"], str) or not rec["image"]:
                invalid(f"pid {pid}: field 'image' must be a file name or null, got {rec['image']!r}")
                continue
            try:
                image_path = images.path(rec["split"], pid, rec["image"])
            except ValueError as e:
                invalid(f"pid {pid}: image {e}")
                continue
            if require_images and not image_path.is_file():
                invalid(f"pid {pid}: image file {image_path} is missing")
                continue
        out.append(make_problem(pid, rec, image_path=image_path, caption=captions.get(pid, "")))
    invalid.warn(len(pids))
    return out


# ---- prompts --------------------------------------------------------------------------------------------------------
def _options(choices: list[str]) -> str:
    return " ".join(f"({string.ascii_uppercase[i]}) {c}" for i, c in enumerate(choices))


def _context(problem: Problem, use_caption: bool) -> str:
    text = f"{problem.hint} {problem.caption}" if use_caption else problem.hint
    return text.strip() or "N/A"


def _clean(text: str) -> str:
    """Collapse runs of spaces (ScienceQA's prompt builder does the same) and trim."""
    return re.sub(r" {2,}", " ", text).strip()


def _parse_format(fmt: str) -> tuple[str, str]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown ScienceQA prompt format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "llama_adapter":
        return "QCM", "llama_adapter"
    layout, output = fmt.split("-")
    return layout, output


def build_prompt(problem: Problem, fmt: str = "llama_adapter", *, use_caption: bool = False) -> str:
    """The model input for ``problem`` in format ``fmt`` (see the module doc); ends with "Answer:"."""
    layout, output = _parse_format(fmt)
    question = f"Question: {problem.question}"
    context = f"Context: {_context(problem, use_caption)}"
    options = f"{'Choices' if output == 'llama_adapter' else 'Options'}: {_options(problem.choices)}"
    lines = [question, context] if layout == "QCM" else [context, question]
    return "\n".join([*lines, options, "Answer:"])


def build_target(problem: Problem, fmt: str = "llama_adapter") -> str:
    """The answer text the model is trained to produce for ``problem`` in format ``fmt``."""
    _, output = _parse_format(fmt)
    letter = problem.answer_letter
    if output == "llama_adapter":
        return f"The answer is ({letter})"
    explanation = _clean(f"{problem.lecture} {problem.solution}")
    if output == "A" or (output == "ALE" and not explanation):
        return f"The answer is {letter}."
    if output == "ALE":
        return f"The answer is {letter}. BECAUSE: {explanation}"
    return _clean(f"{explanation} The answer is {letter}.")


def to_example(
    problem: Problem, fmt: str = "llama_adapter", *, use_caption: bool = False, template: PromptTemplate = ALPACA
) -> Example:
    """``problem`` as a training / evaluation ``Example`` (image: path or encoded bytes; meta: ``problem.meta()``):
    the prompt of format ``fmt`` as one message of ``template`` (as it is with the Alpaca templates)."""
    query = Query(build_prompt(problem, fmt, use_caption=use_caption), whole=True)
    prompt, target = template.example(query, build_target(problem, fmt))
    return Example(prompt=prompt, target=target, image=problem.image, meta=problem.meta())
