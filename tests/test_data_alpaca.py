"""data/alpaca.py: the two exact Alpaca templates and alpaca_data.json reading."""

import json

import pytest

from data import DataError
from data.alpaca import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt, load_examples, load_records
from data.synthetic import make_alpaca

# stanford_alpaca train.py PROMPT_DICT, character for character
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def test_templates_are_exact():
    assert PROMPT_WITH_INPUT == WITH_INPUT and PROMPT_NO_INPUT == NO_INPUT
    assert format_prompt("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n"
        "2 and 3\n\n### Response:"
    )
    assert (
        format_prompt("Name a color.")
        == format_prompt("Name a color.", "")
        == (
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
            "\n\n### Instruction:\nName a color.\n\n### Response:"
        )
    )
    braces = format_prompt("Use {braces} as is", "{input}")  # user text is never treated as a template
    assert braces.endswith("### Instruction:\nUse {braces} as is\n\n### Input:\n{input}\n\n### Response:")


def test_generated_file_reads_through_the_real_loader(tmp_path):
    path = make_alpaca(tmp_path / "alpaca_data.json", n=50, seed=2)
    raw = json.loads(path.read_text())
    assert isinstance(raw, list) and len(raw) == 50
    assert all(sorted(r) == ["input", "instruction", "output"] for r in raw)
    assert 0 < sum(bool(r["input"]) for r in raw) < 50
    examples = load_examples(path)
    for i, (rec, ex) in enumerate(zip(raw, examples)):
        assert ex.prompt == format_prompt(rec["instruction"], rec["input"])
        assert ex.target == rec["output"] and ex.image is None and ex.meta == {"index": i}
    assert make_alpaca(tmp_path / "again.json", n=50, seed=2).read_bytes() == path.read_bytes()


def test_missing_input_field_uses_the_no_input_template(tmp_path):
    path = tmp_path / "a.json"
    records = [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "X", "input": None, "output": "Y"}]
    path.write_text(json.dumps(records))
    assert [r.input for r in load_records(path)] == ["", ""]
    assert load_examples(path)[0].prompt == NO_INPUT.format(instruction="Say hi.")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"input": "", "output": "x"}, "record 1: missing field 'instruction'"),
        ({"instruction": "x", "input": "", "output": ""}, "record 1: field 'output' must be a non-empty string"),
        ({"instruction": "x", "input": 3, "output": "y"}, "record 1: field 'input' must be a string, got 3"),
        (["x"], "record 1: expected an object, got list"),
    ],
)
def test_malformed_record_names_file_and_index_or_is_skipped(tmp_path, record, message):
    path = tmp_path / "alpaca_data.json"
    good = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    path.write_text(json.dumps([good, record, good]))
    with pytest.raises(DataError, match=f"{path}: {message}"):
        load_records(path)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 invalid records \(first: record 1"):
        assert [r.index for r in load_records(path, skip_invalid=True)] == [0, 2]


def test_invalid_json_and_wrong_top_level(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text('[{"instruction": "a",')
    with pytest.raises(DataError, match=f"{path}: invalid JSON at line 1 column"):
        load_records(path)
    path.write_text('{"instruction": "a"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(path)
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        load_records(tmp_path / "missing.json")
