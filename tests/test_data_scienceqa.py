"""data/scienceqa.py: official layout and Hugging Face copy (save_to_disk, parquet), malformed records, prompts."""

import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data import DataError
from data.scienceqa import FORMATS, Problem, build_prompt, build_target, load_problems, to_example
from data.synthetic import export_scienceqa_hf, make_scienceqa

SIZES = dict(n_train=40, n_val=12, n_test=30)


@pytest.fixture(scope="module")
def sqa(tmp_path_factory):
    return make_scienceqa(tmp_path_factory.mktemp("sqa") / "scienceqa", seed=3, **SIZES)


@pytest.fixture
def copy(sqa, tmp_path):
    """A private copy of the dataset to break."""
    return Path(shutil.copytree(sqa, tmp_path / "scienceqa"))


def problem(**changes) -> Problem:
    fields = dict(
        pid="7",
        question="Which color is the ball?",
        choices=["red", "blue", "green"],
        answer=1,
        hint="",
        image_path=None,
        task="closed choice",
        grade="grade3",
        subject="natural science",
        topic="physics",
        category="Colors",
        skill="Identify colors",
        lecture="Colors help us.\nLook closely.",
        solution="The ball is  blue.",
        split="test",
    )
    return Problem(**{**fields, **changes})


def test_official_layout_reads_every_split_in_pid_splits_order(sqa):
    pid_splits = json.loads((sqa / "pid_splits.json").read_text())
    raw = json.loads((sqa / "problems.json").read_text())
    for split in ("train", "val", "test", "trainval", "minitrain", "minival", "minitest"):
        problems = load_problems(sqa, split)
        assert [p.pid for p in problems] == pid_splits[split]
        for p in problems:
            rec = raw[p.pid]
            assert (p.question, p.choices, p.answer, p.hint, p.grade, p.split) == (
                rec["question"],
                rec["choices"],
                rec["answer"],
                rec["hint"],
                rec["grade"],
                rec["split"],
            )
            if rec["image"] is None:
                assert p.image_path is None and not p.has_image
            else:
                assert p.image_path == sqa / "images" / rec["split"] / p.pid / "image.png" and p.image_path.is_file()
    assert [p.pid for p in load_problems(sqa, "validation")] == pid_splits["val"]
    assert [p.pid for p in load_problems(sqa / "problems.json", "val")] == pid_splits["val"]


def test_captions_are_attached_to_image_problems(sqa):
    captions = json.loads((sqa / "captions.json").read_text())["captions"]
    problems = load_problems(sqa, "train")
    with_image = [p for p in problems if p.has_image]
    assert with_image and [p.caption for p in with_image] == [captions[p.pid] for p in with_image]
    assert all(p.caption == "" for p in problems if not p.has_image)


def test_prompt_formats_are_exact():
    p = problem(hint="Tom has a ball.", caption="A blue ball.")
    assert build_prompt(p) == (
        "Question: Which color is the ball?\nContext: Tom has a ball.\nChoices: (A) red (B) blue (C) green\nAnswer:"
    )
    assert build_target(p) == "The answer is (B)"
    assert build_prompt(p, "QCM-A") == (
        "Question: Which color is the ball?\nContext: Tom has a ball.\nOptions: (A) red (B) blue (C) green\nAnswer:"
    )
    assert build_prompt(p, "CQM-A") == (
        "Context: Tom has a ball.\nQuestion: Which color is the ball?\nOptions: (A) red (B) blue (C) green\nAnswer:"
    )
    assert build_prompt(p, "QCM-A", use_caption=True).split("\n")[1] == "Context: Tom has a ball. A blue ball."
    assert build_prompt(problem()).split("\n")[1] == "Context: N/A"
    assert build_target(p, "QCM-A") == "The answer is B."
    assert build_target(p, "QCM-LEA") == "Colors help us.\nLook closely. The ball is blue. The answer is B."
    assert build_target(p, "QCM-ALE") == "The answer is B. BECAUSE: Colors help us.\nLook closely. The ball is blue."
    assert build_target(problem(lecture="", solution=""), "QCM-ALE") == "The answer is B."
    with pytest.raises(ValueError, match="unknown ScienceQA prompt format 'QCM-X'; choose one of llama_adapter"):
        build_prompt(p, "QCM-X")


def test_examples_keep_metadata_for_per_category_scores(sqa):
    for p in load_problems(sqa, "test"):
        ex = to_example(p, "QCM-LEA")
        assert ex.prompt == build_prompt(p, "QCM-LEA") and ex.target == build_target(p, "QCM-LEA")
        assert ex.image == p.image_path
        assert ex.meta == {
            "pid": p.pid,
            "split": "test",
            "answer": p.answer,
            "n_choices": len(p.choices),
            "subject": p.subject,
            "grade": p.grade,
            "topic": p.topic,
            "category": p.category,
            "skill": p.skill,
            "task": p.task,
            "has_text": bool(p.hint),
            "has_image": p.image_path is not None,
        }


def _edit_problems(root: Path, pid: str, edit) -> None:
    file = root / "problems.json"
    data = json.loads(file.read_text())
    edit(data[pid])
    file.write_text(json.dumps(data))


def _first(root: Path, split: str, *, image: bool) -> str:
    data = json.loads((root / "problems.json").read_text())
    pids = json.loads((root / "pid_splits.json").read_text())[split]
    return next(pid for pid in pids if (data[pid]["image"] is not None) == image)


BREAKAGES = {
    "missing field": (lambda r: r.pop("answer"), r"missing field\(s\) answer"),
    "answer out of range": (lambda r: r.update(answer=len(r["choices"])), r"answer \d is not an index into the"),
    "negative answer": (lambda r: r.update(answer=-1), r"answer -1 is not an index"),
    "unknown split": (lambda r: r.update(split="dev"), r"unknown split 'dev'"),
    "choices not a list": (lambda r: r.update(choices="red, blue"), r"field 'choices' must be a list"),
    "bad grade": (lambda r: r.update(grade="grade13"), r"unknown grade 'grade13'"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_malformed_record_names_file_and_pid_or_is_skipped_and_counted(copy, breakage):
    edit, message = BREAKAGES[breakage]
    pid = _first(copy, "train", image=False)
    _edit_problems(copy, pid, edit)
    with pytest.raises(DataError, match=rf"{copy / 'problems.json'}: pid {pid}: {message}"):
        load_problems(copy, "train")
    with pytest.warns(UserWarning, match=rf"skipped 1 of {SIZES['n_train']} invalid records \(first: pid {pid}:"):
        problems = load_problems(copy, "train", skip_invalid=True)
    assert len(problems) == SIZES["n_train"] - 1 and pid not in {p.pid for p in problems}


def test_missing_image_file_names_the_record_and_the_file(copy):
    pid = _first(copy, "val", image=True)
    image = copy / "images" / "val" / pid / "image.png"
    image.unlink()
    with pytest.raises(DataError, match=rf"problems.json: pid {pid}: image file {image} is missing"):
        load_problems(copy, "val")
    with pytest.warns(UserWarning, match="skipped 1 of"):
        assert len(load_problems(copy, "val", skip_invalid=True)) == SIZES["n_val"] - 1


def test_broken_files_and_unknown_splits(copy):
    with pytest.raises(DataError, match=rf"{copy / 'pid_splits.json'}: unknown split 'dev'; the file has minitest"):
        load_problems(copy, "dev")
    splits = json.loads((copy / "pid_splits.json").read_text())
    splits["test"].append("99999")
    (copy / "pid_splits.json").write_text(json.dumps(splits))
    with pytest.raises(DataError, match=r"problems.json: pid 99999 is listed in pid_splits.json\['test'\] but is not"):
        load_problems(copy, "test")
    text = (copy / "problems.json").read_text()
    (copy / "problems.json").write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=rf"{copy / 'problems.json'}: invalid JSON at line \d+ column \d+"):
        load_problems(copy, "test")
    (copy / "problems.json").unlink()
    with pytest.raises(DataError, match=f"{copy}: not a ScienceQA folder: no problems.json"):
        load_problems(copy, "test")


@pytest.fixture(scope="module", params=["disk", "parquet"])
def hf_copy(request, sqa, tmp_path_factory):
    return export_scienceqa_hf(sqa, tmp_path_factory.mktemp(request.param) / "hf", fmt=request.param)


def _without_image(p: Problem) -> Problem:
    return dataclasses.replace(p, image_path=None, image_bytes=None, caption="")


@pytest.mark.parametrize("split", ["train", "val", "test", "trainval", "minitest"])
def test_hugging_face_copy_gives_the_same_problems(sqa, hf_copy, split):
    official = load_problems(sqa, split)
    hf = load_problems(hf_copy, split, pid_splits=sqa / "pid_splits.json")
    assert [_without_image(p) for p in hf] == [_without_image(p) for p in official]
    for a, b in zip(official, hf):
        assert (a.image_path is None) == (b.image_bytes is None)
        if a.image_path is not None:
            assert b.image_bytes == a.image_path.read_bytes()
            assert Image.open(io.BytesIO(b.image_bytes)).convert("RGB").tobytes() == Image.open(a.image_path).tobytes()
    examples = [to_example(p) for p in hf]
    assert [e.meta for e in examples] == [to_example(p).meta for p in official]
    assert all(isinstance(e.image, bytes) for e in examples if e.meta["has_image"])


def test_hugging_face_copy_without_pid_splits(sqa, hf_copy, tmp_path):
    problems = load_problems(hf_copy, "validation")
    assert [p.pid for p in problems] == [f"val-{i}" for i in range(SIZES["n_val"])]
    assert all(p.split == "val" for p in problems)
    with pytest.raises(DataError, match="derived splits need a pid_splits.json"):
        load_problems(hf_copy, "minitrain")
    wrong = tmp_path / "pid_splits.json"
    wrong.write_text(json.dumps({"train": ["1"], "val": ["2"], "test": ["3"]}))
    with pytest.raises(DataError, match=rf"{wrong}: lists 1 'train' pids but .* has {SIZES['n_train']} rows"):
        load_problems(hf_copy, "train", pid_splits=wrong)


def test_parquet_copy_with_a_missing_column_is_refused(sqa, tmp_path):
    import pyarrow.parquet as pq

    out = export_scienceqa_hf(sqa, tmp_path / "hf", fmt="parquet")
    file = out / "data" / "test-00000-of-00001.parquet"
    pq.write_table(pq.read_table(file).drop_columns(["answer"]), file)
    with pytest.raises(DataError, match=rf"{file}: missing column\(s\) answer"):
        load_problems(out, "test")


def test_every_format_ends_the_prompt_with_the_answer_cue_and_states_the_letter_once(sqa):
    for p in load_problems(sqa, "train"):
        for fmt in FORMATS:
            letter = f"({p.answer_letter})" if fmt == "llama_adapter" else f"{p.answer_letter}."
            assert build_prompt(p, fmt).endswith("\nAnswer:")
            assert build_target(p, fmt).count("The answer is") == 1
            assert f"The answer is {letter}" in build_target(p, fmt)


# ---- image paths that leave the dataset, duplicates, hostile JSON -------------------------------------------------
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_image_path_leaving_the_image_folder_is_refused_by_name(copy, tmp_path, kind, outside):
    pid = _first(copy, "val", image=True)
    image = copy / "images" / "val" / pid / "image.png"
    images = (copy / "images").resolve()
    if kind == "dotdot":
        _edit_problems(copy, pid, lambda r: r.update(image="../../../../outside/secret.png"))
        message = f"path '../../../../outside/secret.png' has a '..' component, which would leave {copy / 'images'}"
    elif kind == "absolute":
        _edit_problems(copy, pid, lambda r: r.update(image=str(outside)))
        message = f"path '{outside}' is absolute; it must be relative to {copy / 'images'}"
    else:
        image.unlink()
        image.symlink_to(outside)
        message = f"path {image} resolves to {outside.resolve()}, outside {images} (a link that leaves the folder)"
    for require_images in (True, False):  # refused for scoring too: the record itself is hostile
        with pytest.raises(DataError) as info:
            load_problems(copy, "val", require_images=require_images)
        assert str(info.value) == f"{copy / 'problems.json'}: pid {pid}: image {message}"


def test_a_linked_image_folder_is_fine(copy, tmp_path):
    elsewhere = tmp_path / "big-disk" / "images"
    elsewhere.parent.mkdir()
    shutil.move(copy / "images", elsewhere)
    (copy / "images").symlink_to(elsewhere, target_is_directory=True)
    problems = [p for p in load_problems(copy, "val") if p.has_image]
    assert problems and all(p.image_path.resolve().is_relative_to(elsewhere) for p in problems)


def test_hugging_face_image_path_must_stay_in_the_dataset_folder(sqa, tmp_path, outside):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = export_scienceqa_hf(sqa, tmp_path / "hf", fmt="parquet")
    file = out / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(file)
    images = table.column("image").to_pylist()
    row = next(i for i, im in enumerate(images) if im is not None)
    (out / "images").mkdir()
    (out / "images" / "kept.png").write_bytes(images[row]["bytes"])

    def with_path(path: str) -> None:
        field = table.schema.field("image")
        column = pa.array([*images[:row], {"bytes": None, "path": path}, *images[row + 1 :]], type=field.type)
        pq.write_table(table.set_column(table.schema.get_field_index("image"), field, column), file)

    with_path("images/kept.png")  # a path relative to the dataset folder is read from there
    assert load_problems(out, "test")[row].image_path == out / "images" / "kept.png"
    with_path(str(outside))
    with pytest.raises(DataError) as info:
        load_problems(out, "test")
    assert str(info.value) == f"{file}: row {row} (pid test-{row}): image path '{outside}' is absolute; it must be " \
        f"relative to {out}"  # fmt: skip
    with_path("../outside/secret.png")
    with pytest.raises(DataError, match=rf"row {row} \(pid test-{row}\): image path '\.\./outside/secret\.png' has a"):
        load_problems(out, "test")


def test_a_pid_in_two_splits_is_an_error_naming_it(copy):
    splits = json.loads((copy / "pid_splits.json").read_text())
    leaked = splits["test"][3]
    splits["train"].append(leaked)
    (copy / "pid_splits.json").write_text(json.dumps(splits))
    for split in ("train", "test", "minival"):  # whatever split is asked for: the file is wrong
        with pytest.raises(DataError) as info:
            load_problems(copy, split)
        assert str(info.value) == (
            f"{copy / 'pid_splits.json'}: pid {leaked} is in both 'train' and 'test'; train / val / test must be "
            "disjoint (a problem in two of them leaks between training and evaluation)"
        )


def test_a_pid_listed_twice_in_a_split_is_used_once_with_a_counted_warning(copy, hf_copy):
    splits = json.loads((copy / "pid_splits.json").read_text())
    val = splits["val"]
    splits["val"] = [*val, val[2], val[0], val[2]]
    (copy / "pid_splits.json").write_text(json.dumps(splits))
    message = (
        f"{copy / 'pid_splits.json'}: split 'val' lists 3 pid(s) more than once (first: {val[0]}); "
        "each problem is used once"
    )
    with pytest.warns(UserWarning) as caught:
        problems = load_problems(copy, "val")
    assert [str(w.message) for w in caught] == [message]
    assert [p.pid for p in problems] == val
    splits["val"] = val  # the Hugging Face copy's rows follow the file it was built from
    minitest = splits["minitest"]
    splits["minitest"] = [*minitest, minitest[0]]
    (copy / "pid_splits.json").write_text(json.dumps(splits))
    with pytest.warns(UserWarning, match=r"split 'minitest' lists 1 pid\(s\) more than once"):
        hf = load_problems(hf_copy, "minitest", pid_splits=copy / "pid_splits.json")
    assert [p.pid for p in hf] == minitest


def test_lone_surrogate_and_deep_nesting_name_the_file_and_record(copy):
    pid = _first(copy, "test", image=False)
    _edit_problems(copy, pid, lambda r: r.update(question="HOSTILE"))
    problems_file = copy / "problems.json"
    clean = problems_file.read_bytes()
    problems_file.write_bytes(clean.replace(b"HOSTILE", b"Which \\ud800 one?"))
    with pytest.raises(DataError) as info:
        load_problems(copy, "test")
    assert (
        str(info.value) == f'{problems_file}: ["{pid}"]["question"] holds a lone surrogate \\ud800, which is not text'
    )
    problems_file.write_bytes(clean)
    splits_file = copy / "pid_splits.json"
    splits_file.write_bytes(b'{"test": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(DataError) as info:
        load_problems(copy, "test")
    assert str(info.value) == f"{splits_file}: JSON nested too deeply to read (lists / objects inside each other)"


def test_parquet_text_that_is_not_utf8_names_the_file(sqa, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = export_scienceqa_hf(sqa, tmp_path / "hf", fmt="parquet")
    file = out / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(file)
    raw = [q.encode() for q in table.column("question").to_pylist()]
    raw[5] = b"Which \xed\xa0\x80 one?"  # a UTF-8-encoded surrogate: pyarrow stores it unchecked
    binary = pa.array(raw, type=pa.binary())
    column = pa.Array.from_buffers(pa.string(), len(binary), binary.buffers())
    index = table.schema.get_field_index("question")
    pq.write_table(table.set_column(index, table.schema.field("question"), column), file)
    with pytest.raises(DataError, match=rf"^{file}: row [0-5] or a row near it holds text that is not UTF-8 \("):
        load_problems(out, "test")
