"""The mix task (every format the demo serves, in one folder) and the LLaVA conversation reader it brings."""

import json

import pytest

import train
from app.engine import Turn
from app.engine import chat_prompt as demo_chat_prompt
from data import DataError
from data.llava import load_conversations, load_examples
from data.prompts import chat_prompt
from data.synthetic import synthetic_corpus, train_tokenizer
from data.synthetic_mix import make_mix
from training.tasks import TASKS

SMALL = dict(n_scienceqa=(24, 4, 6), n_coco=(6, 2, 3), n_llava=8, n_alpaca=10)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return make_mix(tmp_path_factory.mktemp("data") / "mix", **SMALL)


def write_llava(folder, records):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "a.jpg").write_bytes(b"")
    file = folder / "llava.json"
    file.write_text(json.dumps(records))
    return file


def turns(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def test_each_answer_is_one_example_in_the_demos_chat_prompt(tmp_path):
    file = write_llava(tmp_path, [{"id": "x", "image": "a.jpg", "conversations": turns(
        "<image>\nWhat color is it?", "It is red.", "Is it big?", "It is small.", "And the shape?")}])  # fmt: skip
    examples = load_examples(file)
    # the tag is gone, the unanswered last question teaches nothing and is dropped
    assert [(e.target, e.meta["id"], e.image) for e in examples] == [
        ("It is red.", "x#0", tmp_path / "images" / "a.jpg"),
        ("It is small.", "x#1", tmp_path / "images" / "a.jpg"),
    ]
    # the exact prompt the demo's chat sends for the second question after the first answer
    assert examples[1].prompt == demo_chat_prompt([Turn("What color is it?", "It is red.")], "Is it big?")
    assert examples[0].prompt == chat_prompt([], "What color is it?")
    assert "### Input:" in examples[1].prompt and "### Input:" not in examples[0].prompt
    after = [{"image": "a.jpg", "conversations": turns("Describe it.\n<image>", "A cat.")}]
    tagged_after = write_llava(tmp_path, after)
    assert load_conversations(tagged_after)[0].turns == [("Describe it.", "A cat.")]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("text", "record 0: expected an object, got str"),
        ({"conversations": turns("q", "a")}, "record 0: field 'image' must name an image file"),
        ({"image": "a.jpg", "conversations": turns("q")}, "record 0: field 'conversations' must be a list of at least"),
        ({"image": "a.jpg", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
         "record 0: conversations[0] must be a 'human' turn, got 'gpt'"),
        ({"image": "a.jpg", "conversations": turns("q", 7)}, "record 0: conversations[1].value must be a string"),
        ({"image": "a.jpg", "conversations": turns("<image>", "a")}, "record 0: conversations[0].value is blank"),
        ({"image": "../secret.jpg", "conversations": turns("q", "a")}, "record 0: field 'image': path '../secret.jpg'"),
    ],
)  # fmt: skip
def test_a_malformed_conversation_is_named_by_file_and_record(tmp_path, record, message):
    file = write_llava(tmp_path, [record])
    with pytest.raises(DataError, match="llava.json: " + message.replace("[", r"\[").replace("(", r"\(")):
        load_conversations(file)
    with pytest.warns(UserWarning, match="skipped 1 of 1 invalid records"):
        assert load_conversations(file, skip_invalid=True) == []


def test_the_mix_reads_every_part_and_only_the_split_ones_for_evaluation(mix):
    train_set = TASKS["mix"].reader(mix, "train", "llama_adapter")
    kinds = {e.prompt.split("### Instruction:\n")[-1].split("\n")[0] if "###" in e.prompt else "sqa" for e in train_set}
    assert "sqa" in kinds and "Generate caption of this image" in kinds
    assert sum("Tell me about" in e.prompt or "sentence" in e.prompt for e in train_set) > 0  # alpaca
    assert sum(str(e.image).endswith(".jpg") and "/llava/" in str(e.image) for e in train_set) >= 8  # llava
    test_set = TASKS["mix"].reader(mix, "test", "llama_adapter")
    assert len(test_set) == 6 + 3  # ScienceQA problems + COCO captions (one per image): no unsplit part
    assert all("/llava/" not in str(e.image) for e in test_set)


def test_the_mix_is_byte_identical_from_the_same_seed(tmp_path):
    a, b = make_mix(tmp_path / "a", **SMALL), make_mix(tmp_path / "b", **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) > 40
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_a_folder_without_any_part_is_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: holds none of the mix's parts"):
        TASKS["mix"].reader(tmp_path / "empty", "train", "llama_adapter")


def test_train_py_on_a_mix_scores_questions_and_captions(mix, tmp_path):
    tokenizer = train_tokenizer(synthetic_corpus(seed=0, n=400), tmp_path / "tokenizer.model")
    out = tmp_path / "run"
    argv = [
        "--data.task", "mix", "--data", str(mix), "--data.synthetic", "false", "--base", "tiny",
        "--tokenizer", str(tokenizer), "--optim.max_steps", "2",
        "--optim.batch_size", "4", "--run.eval_max_new_tokens", "4", "--run.progress", "false", "--out", str(out),
    ]  # fmt: skip
    assert train.main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["counts"]["IMG"]["total"] > 0  # ScienceQA's table
    captions = json.loads((out / "coco" / "metrics.json").read_text())  # beside it, the caption scores
    assert captions["images"] == 3 and captions["split"] == "test" and "CIDEr" in captions
    assert len(json.loads((out / "coco" / "predictions.json").read_text())) == 3
    sidecar = json.loads((out / "adapter.json").read_text())
    assert sidecar["extra"]["task"] == "mix" and sidecar["prompt_format"] == "llama_adapter"
