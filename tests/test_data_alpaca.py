"""data/alpaca.py: alpaca_data.json reading, and the two exact Alpaca templates (data/prompts.py)."""

import json
import warnings

import pytest

from data import DataError
from data.alpaca import EmptyOutputWarning, load_examples, load_records
from data.collate import IGNORE_INDEX, Collator
from data.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt
from data.synthetic import make_alpaca, synthetic_corpus, train_tokenizer
from model.tokenizer import load_tokenizer

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
        ({"instruction": " ", "input": "", "output": "x"}, "record 1: field 'instruction' must be a non-empty string"),
        ({"instruction": "x", "input": "", "output": 3}, "record 1: field 'output' must be a string, got 3"),
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


# Records as alpaca_data.json holds them (indent 4, as released); two have "output": "", as 28 of the real file do.
REAL_FORMAT = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.", "output": ""},
    {"instruction": "Name a color.", "input": "", "output": "Red."},
    {"instruction": "Find the odd one out.", "input": "Twitter, Instagram, Telegram", "output": ""},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]


def test_empty_outputs_load_with_a_count_and_train_on_eos_alone(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(REAL_FORMAT, indent=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = load_examples(path)
    assert len(examples) == 5 and [ex.target for ex in examples] == [r["output"] for r in REAL_FORMAT]
    [warning] = caught
    assert warning.category is EmptyOutputWarning and warning.message.count == 2
    assert str(warning.message) == (
        f"{path}: 2 records have an empty output (first: record 1); their target is EOS alone, "
        "as in the official Alpaca training"
    )
    tok = load_tokenizer(train_tokenizer(synthetic_corpus(n=200), tmp_path / "tok.model"))
    batch = Collator(tok, 512)(examples)
    width = batch["tokens"].shape[1]
    for row in (1, 3):
        n = int(batch["lengths"][row])
        assert batch["tokens"][row, :n].tolist() == [*tok.encode(examples[row].prompt, bos=True), tok.eos_id]
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * (n - 1) + [tok.eos_id] + [IGNORE_INDEX] * (width - n)
    assert batch["labels"][0].ne(IGNORE_INDEX).sum() == len(tok.encode(REAL_FORMAT[0]["output"], bos=False)) + 1


def test_lone_surrogate_and_deep_nesting_are_data_errors_naming_the_file(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_bytes(
        b'[\n    {"instruction": "Say hi.", "input": "", "output": "Hi."},\n'
        b'    {"instruction": "Say bye.", "input": "", "output": "Bye \\ud800 now."}\n]\n'
    )
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value) == f'{path}: [1]["output"] holds a lone surrogate \\ud800, which is not text'
    path.write_bytes(b'[{"instruction": "\\ud83d\\ude00 is fine", "input": "", "output": "a pair: \\ud83d\\ude00"}]')
    assert load_records(path)[0].output == "a pair: \U0001f600"  # a valid escaped pair is one character
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value) == f"{path}: JSON nested too deeply to read (lists / objects inside each other)"
