"""data/coco.py: Karpathy split and official annotations agree; training / evaluation items; malformed files."""

import json
import re
import shutil

import pytest
from PIL import Image

from data import DataError
from data.coco import (
    CocoImage,
    caption_prompt,
    ground_truth,
    load_annotations,
    load_examples,
    load_images,
    load_karpathy,
)
from data.synthetic import make_coco

N = dict(n_train=8, n_restval=3, n_val=4, n_test=5)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco") / "coco", seed=1, **N)


@pytest.fixture
def copy(coco, tmp_path):
    return shutil.copytree(coco, tmp_path / "coco")


def test_caption_prompt_is_the_alpaca_no_input_template():
    assert caption_prompt() == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nGenerate caption of this image\n\n### Response:"
    )


def test_karpathy_splits_paths_and_references(coco):
    raw = json.loads((coco / "dataset_coco.json").read_text())["images"]
    train = load_karpathy(coco / "dataset_coco.json", "train")
    assert len(train) == N["n_train"] + N["n_restval"]  # train + restval, as captioning work trains on
    assert [len(load_karpathy(coco / "dataset_coco.json", s)) for s in ("restval", "val", "test")] == [3, 4, 5]
    by_id = {e["cocoid"]: e for e in raw}
    for image in train:
        entry = by_id[image.image_id]
        assert image.path == coco / entry["filepath"] / entry["filename"]
        assert Image.open(image.path).format == "JPEG"
        assert image.references == [s["raw"].strip() for s in entry["sentences"]] and len(image.references) == 5
    assert {by_id[i.image_id]["filepath"] for i in load_karpathy(coco / "dataset_coco.json", "test")} == {"val2014"}
    assert any(s["raw"].endswith(" ") for e in raw for s in e["sentences"])  # raw quirks exist and are stripped


@pytest.mark.parametrize(("split", "ann_set"), [("train", None), ("val", "val2014"), ("test", "val2014")])
def test_karpathy_and_official_annotations_agree(coco, split, ann_set):
    karpathy = load_images(coco, split)
    if ann_set is None:  # Karpathy train = train2014 images + restval (from val2014)
        official = load_images(coco, "train2014") + load_images(coco / "annotations" / "captions_val2014.json")
    else:
        official = load_annotations(coco / "annotations" / f"captions_{ann_set}.json")
    official_by_id = {i.image_id: i for i in official}
    assert [official_by_id[i.image_id] for i in karpathy] == karpathy


def test_training_items_one_per_caption_and_eval_items_per_image(coco):
    images = load_images(coco, "train")
    examples = load_examples(coco, "train")
    assert len(examples) == sum(len(i.references) for i in images) == 5 * 11
    assert all(e.prompt == caption_prompt() for e in examples)
    assert [(e.meta["image_id"], e.image, e.target) for e in examples] == [
        (i.image_id, i.path, r) for i in images for r in i.references
    ]
    test = load_images(coco, "test")
    assert all(isinstance(i, CocoImage) and isinstance(i.image_id, int) for i in test)


def test_ground_truth_file_round_trips_through_the_official_reader(coco, tmp_path):
    test = load_images(coco, "test")
    gt = ground_truth(test)
    assert sorted(gt) == ["annotations", "images", "info", "licenses", "type"]
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"]) == 25
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert load_annotations(tmp_path / "gt.json", image_dir=coco / "val2014") == test


def _edit_karpathy(root, edit):
    file = root / "dataset_coco.json"
    data = json.loads(file.read_text())
    index = next(i for i, e in enumerate(data["images"]) if e["split"] == "test")
    edit(data["images"][index])
    file.write_text(json.dumps(data))
    return index, data["images"][index]["cocoid"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e.pop("filename"), "missing field 'filename'"),
        (lambda e: e.update(split="dev"), "unknown split 'dev'"),
        (lambda e: e.update(sentences=[]), "no captions"),
        (lambda e: e.update(cocoid=str(e["cocoid"] % 100)), "cocoid must be an integer"),
    ],
)
def test_malformed_karpathy_entry_names_file_and_entry(copy, edit, message):
    index, cocoid = _edit_karpathy(copy, edit)
    file = copy / "dataset_coco.json"
    with pytest.raises(DataError, match=rf"{file}: image entry {index} \(cocoid {cocoid}\): {message}"):
        load_images(copy, "test")
    with pytest.warns(UserWarning, match=r"skipped 1 of \d+ invalid records"):
        assert len(load_images(copy, "test", skip_invalid=True)) == N["n_test"] - 1


def test_missing_image_and_bad_files(copy):
    image = load_images(copy, "val")[0]
    image.path.unlink()
    with pytest.raises(DataError, match=rf"cocoid {image.image_id}\): image file {image.path} is missing"):
        load_images(copy, "val")
    with pytest.raises(DataError, match=rf"captions_val2014.json: image id {image.image_id}: image file .* is missing"):
        load_annotations(copy / "annotations" / "captions_val2014.json")
    with pytest.raises(DataError, match="unknown split 'minival'; choose one of train, restval, val, test"):
        load_images(copy, "minival")
    ann = copy / "annotations" / "captions_train2014.json"
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 10**6, "image_id": 7, "caption": "orphan"})
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"{ann}: annotations\[\d+\]: image_id 7 is not in 'images'"):
        load_annotations(ann)
    ann.write_text(ann.read_text()[:-10])
    with pytest.raises(DataError, match=rf"{ann}: invalid JSON at line"):
        load_annotations(ann)
    with pytest.raises(DataError, match="holds neither dataset_coco.json nor annotations/captions_x.json"):
        load_images(copy / "annotations", "x")


# ---- image paths that leave the dataset, duplicate ids, hostile JSON ----------------------------------------------
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_karpathy_image_path_leaving_the_image_root_is_refused_by_name(copy, tmp_path, kind, outside):
    entries = json.loads((copy / "dataset_coco.json").read_text())["images"]
    index = next(i for i, e in enumerate(entries) if e["split"] == "test")  # the entry _edit_karpathy edits
    entry, cocoid = entries[index], entries[index]["cocoid"]
    if kind == "dotdot":
        _edit_karpathy(copy, lambda e: e.update(filepath="val2014/../..", filename="outside/secret.jpg"))
        message = f"path 'val2014/../..' has a '..' component, which would leave {copy}"
    elif kind == "absolute":
        _edit_karpathy(copy, lambda e: e.update(filename=str(outside)))
        message = f"path '{outside}' is absolute; it must be relative to {copy}"
    else:
        image = copy / entry["filepath"] / entry["filename"]
        image.unlink()
        image.symlink_to(outside)
        message = (
            f"path {image} resolves to {outside.resolve()}, outside {copy.resolve()} (a link that leaves the folder)"
        )
    with pytest.raises(DataError) as info:
        load_images(copy, "test")
    assert str(info.value) == f"{copy / 'dataset_coco.json'}: image entry {index} (cocoid {cocoid}): image {message}"


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_annotation_file_name_leaving_the_image_folder_is_refused_by_name(copy, tmp_path, kind, outside):
    ann = copy / "annotations" / "captions_val2014.json"
    data = json.loads(ann.read_text())
    image = data["images"][1]
    folder = copy / "val2014"
    if kind == "dotdot":
        image["file_name"] = "../../outside/secret.jpg"
        message = f"path '../../outside/secret.jpg' has a '..' component, which would leave {folder}"
    elif kind == "absolute":
        image["file_name"] = str(outside)
        message = f"path '{outside}' is absolute; it must be relative to {folder}"
    else:
        (folder / image["file_name"]).unlink()
        (folder / image["file_name"]).symlink_to(outside)
        message = (
            f"path {folder / image['file_name']} resolves to {outside.resolve()}, outside {folder.resolve()} "
            "(a link that leaves the folder)"
        )
    ann.write_text(json.dumps(data))
    for require_images in (True, False):
        with pytest.raises(DataError) as info:
            load_annotations(ann, require_images=require_images)
        assert str(info.value) == f"{ann}: image id {image['id']}: image {message}"


def test_a_duplicate_cocoid_or_image_id_is_refused_or_skipped_and_counted(copy):
    file = copy / "dataset_coco.json"
    data = json.loads(file.read_text())
    train = next(i for i, e in enumerate(data["images"]) if e["split"] == "train")
    test = next(i for i, e in enumerate(data["images"]) if e["split"] == "test")
    cocoid = data["images"][train]["cocoid"]
    data["images"][test]["cocoid"] = cocoid  # the same image in train and test: leakage
    file.write_text(json.dumps(data))
    message = (
        f"image entry {test} (cocoid {cocoid}): cocoid {cocoid} is also image entry {train} "
        "(splits 'train' and 'test'); one entry per image"
    )
    with pytest.raises(DataError) as info:
        load_karpathy(file, "test")
    assert str(info.value) == f"{file}: {message}"
    with pytest.warns(UserWarning) as caught:
        assert len(load_karpathy(file, "test", skip_invalid=True)) == N["n_test"] - 1
    assert [str(w.message) for w in caught] == [
        f"{file}: skipped 1 of {N['n_test']} invalid records (first: {message})"
    ]

    ann = copy / "annotations" / "captions_val2014.json"
    data = json.loads(ann.read_text())
    data["images"].append(dict(data["images"][0]))
    ann.write_text(json.dumps(data))
    n = len(data["images"]) - 1
    message = f"images[{n}]: id {data['images'][0]['id']} is also images[0]"
    with pytest.raises(DataError) as info:
        load_annotations(ann)
    assert str(info.value) == f"{ann}: {message}"
    with pytest.warns(UserWarning, match=rf"skipped 1 of \d+ invalid records \(first: {re.escape(message)}\)"):
        assert len(load_annotations(ann, skip_invalid=True)) == n


def test_lone_surrogate_and_deep_nesting_name_the_file_and_record(copy):
    file = copy / "dataset_coco.json"
    index, _ = _edit_karpathy(copy, lambda e: e["sentences"][1].update(raw="HOSTILE"))
    file.write_bytes(file.read_bytes().replace(b'"HOSTILE"', b'"A dog \\udfff on a mat."'))
    with pytest.raises(DataError) as info:
        load_images(copy, "test")
    assert str(info.value) == (
        f'{file}: ["images"][{index}]["sentences"][1]["raw"] holds a lone surrogate \\udfff, which is not text'
    )
    ann = copy / "annotations" / "captions_val2014.json"
    ann.write_bytes(b'{"images": [], "annotations": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(DataError) as info:
        load_annotations(ann)
    assert str(info.value) == f"{ann}: JSON nested too deeply to read (lists / objects inside each other)"
