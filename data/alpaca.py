"""Alpaca instruction data (``alpaca_data.json``).

The file is a JSON list of {"instruction", "input", "output"} objects. A record is prompted by a ``PromptTemplate``
(data/prompts.py): by default the two exact Alpaca templates of stanford_alpaca's train.py, reused verbatim by
LLaMA-Adapter's fine-tuning code; the no-input one is used when ``input`` is missing or exactly "". The response is
appended directly after "### Response:" (training target = output, then EOS).

The real file has 28 records whose ``output`` is "" (stanford_alpaca issue #265); the official training code trains
on them with EOS alone as the target, and so do we: they load, and one ``EmptyOutputWarning`` gives their count.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from data import DataError, InvalidRecords, read_json
from data.collate import Example
from data.prompts import ALPACA, PromptTemplate, Query


class EmptyOutputWarning(UserWarning):
    """Records of a file whose ``output`` is empty or blank: their training target is EOS alone. ``count`` says
    how many (``warnings.catch_warnings(record=True)`` gives callers the number)."""

    def __init__(self, message: str, count: int) -> None:
        super().__init__(message)
        self.count = count


@dataclass
class AlpacaRecord:
    """One record of alpaca_data.json; ``index`` is its position in the file."""

    instruction: str
    input: str
    output: str
    index: int


def load_records(path: str | Path, *, skip_invalid: bool = False) -> list[AlpacaRecord]:
    """The records of an alpaca_data.json. A malformed record (not an object, missing / non-string / blank
    instruction, missing / non-string output, non-string input) raises DataError naming the file and the record
    index; with ``skip_invalid=True`` it is skipped and one warning gives the count. An empty ``output`` is valid
    (target EOS alone, as the official training has it); one ``EmptyOutputWarning`` gives the number of such
    records."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{instruction, input, output}} objects")
    out, invalid = [], InvalidRecords(path, skip_invalid)
    for i, rec in enumerate(data):
        problem = _check(rec)
        if problem:
            invalid(f"record {i}: {problem}")
            continue
        out.append(AlpacaRecord(rec["instruction"], rec.get("input") or "", rec["output"], i))
    invalid.warn(len(data))
    empty = [r.index for r in out if not r.output.strip()]
    if empty:
        message = (
            f"{path}: {len(empty)} records have an empty output (first: record {empty[0]}); "
            "their target is EOS alone, as in the official Alpaca training"
        )
        warnings.warn(EmptyOutputWarning(message, len(empty)), stacklevel=2)
    return out


def _check(rec: object) -> str | None:
    if not isinstance(rec, dict):
        return f"expected an object, got {type(rec).__name__}"
    for key in ("instruction", "output"):
        if key not in rec:
            return f"missing field {key!r}"
        if not isinstance(rec[key], str):
            return f"field {key!r} must be a string, got {rec[key]!r}"
    if not rec["instruction"].strip():
        return f"field 'instruction' must be a non-empty string, got {rec['instruction']!r}"
    if rec.get("input") is not None and not isinstance(rec["input"], str):
        return f"field 'input' must be a string, got {rec['input']!r}"
    return None


def to_example(record: AlpacaRecord, template: PromptTemplate = ALPACA) -> Example:
    """A text-only training ``Example``: the instruction (and input) prompted by ``template`` -> output."""
    prompt, target = template.example(Query(record.instruction, record.input), record.output)
    return Example(prompt=prompt, target=target, image=None, meta={"index": record.index})


def load_examples(path: str | Path, *, skip_invalid: bool = False, template: PromptTemplate = ALPACA) -> list[Example]:
    """Training examples of an alpaca_data.json file."""
    return [to_example(r, template) for r in load_records(path, skip_invalid=skip_invalid)]
