"""eval/coco.py: loading the split (via data.coco), results validation, pycocoevalcap parity (with and without
Java), and the end-to-end caption run on a tiny model with resume after an interruption."""

import json
import shutil

import pytest
from PIL import Image
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import eval.coco as coco
import model.generate as model_generate
from data.coco import caption_prompt
from data.synthetic import make_coco
from eval.coco import METRIC_NAMES, EvalError, check_results, format_table, load_split, python_tokenize, score_captions
from eval.common import GENERATIONS_FILE
from model import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java is needed for the official PTB tokenizer and METEOR")

REFERENCES = {
    101: [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.",
        "Man surfing on a big blue wave.",
    ],
    102: [
        "Two dogs playing with a frisbee in the park.",
        "A couple of dogs running on the grass.",
        "Dogs chase a red frisbee across a field.",
    ],
    103: [
        "A plate of food with broccoli and rice.",
        "A white plate topped with rice, chicken and broccoli.",
        "Healthy dinner (rice and vegetables) on a plate.",
    ],
    104: [
        "A red double decker bus driving down a street.",
        "A bus is parked at the curb near a building.",
        "The red bus isn't moving; it's stopped at a light.",
    ],
    105: ["A cat sleeping on a laptop keyboard.", "A gray cat lying on top of a computer.", "The cat's asleep!"],
}
CAPTIONS = {
    101: "A man riding a wave on a surfboard.",
    102: "Two dogs run across a grassy field.",
    103: "A plate of rice and broccoli.",
    104: "A red bus driving down the street.",
    105: "A cat lying on a laptop.",
}


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def write_coco_gt(path, references=REFERENCES):
    """A COCO-format ground truth with its images beside it (data.coco's default image folder)."""
    for i in references:
        write_image(path.parent / f"COCO_val2014_{i:012d}.jpg")
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": 8, "width": 8} for i in references]
    annotations = [
        {"id": 1000 * i + k, "image_id": i, "caption": c} for i, caps in references.items() for k, c in enumerate(caps)
    ]
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return path


def write_karpathy(path, references=REFERENCES, splits=None):
    """dataset_coco.json (images under val2014/ beside it): every image in 'test' unless ``splits`` says otherwise."""
    entries = []
    for n, (i, caps) in enumerate(references.items()):
        write_image(path.parent / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        sentences = [
            {"raw": c, "tokens": python_tokenize(c).split(), "imgid": n, "sentid": 10 * n + k}
            for k, c in enumerate(caps)
        ]
        entries.append({
            "filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "imgid": n,
            "split": (splits or {}).get(i, "test"), "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
        })  # fmt: skip
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def write_results(path, captions=CAPTIONS):
    path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()]))
    return path


@pytest.fixture(scope="module")
def java_scores(tmp_path_factory):
    """(ours via the CLI, pycocoevalcap's COCOEvalCap with SPICE stubbed out) on the same two files."""
    pytest.importorskip("pycocotools")
    if not HAS_JAVA:
        pytest.skip("java is needed for the official PTB tokenizer and METEOR")
    import pycocoevalcap.eval as official
    import pycocoevalcap.meteor.meteor as meteor_module
    from pycocotools.coco import COCO

    class NoSpice:  # evaluate() builds Spice(), which downloads CoreNLP; everything else is the official path
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    folder = tmp_path_factory.mktemp("coco")
    gt, res = write_coco_gt(folder / "gt.json"), write_results(folder / "res.json")
    meteor = meteor_module.Meteor()  # one METEOR JVM for both sides (it takes ~10 s to load its tables)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module, "Meteor", lambda: meteor)
        mp.setattr(official, "Meteor", lambda: meteor)
        mp.setattr(official, "Spice", NoSpice)
        assert coco.main(["--results", str(res), "--annotations", str(gt), "--output", str(folder / "out")]) == 0
        ours = json.loads((folder / "out" / "metrics.json").read_text())
        ground_truth = COCO(str(gt))
        results = ground_truth.loadRes(str(res))
        evaluator = official.COCOEvalCap(ground_truth, results)
        evaluator.params["image_id"] = results.getImgIds()
        evaluator.evaluate()
    return ours, evaluator.eval


@needs_java
def test_scores_equal_pycocoevalcap(java_scores):
    ours, reference = java_scores
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(100 * reference[name], rel=1e-12, abs=1e-12), name
    assert ours["tokenizer"] == "ptb" and ours["skipped"] == ["SPICE"] and ours["images"] == 5
    assert ours["missing"] == {"count": 0, "image_ids": []}
    assert 0 < ours["Bleu_4"] < ours["Bleu_1"] <= 100 and ours["CIDEr"] > 0


@needs_java
def test_python_tokenizer_matches_ptb_on_caption_text():
    texts = [c for caps in REFERENCES.values() for c in caps] + list(CAPTIONS.values())
    texts += ["Two dogs' toys aren't here!", 'A "quoted" t-shirt costs $3.50 -- cheap...', "I can't, won't go", ""]
    ptb = PTBTokenizer().tokenize({n: [{"caption": t}] for n, t in enumerate(texts)})
    assert [python_tokenize(t) for t in texts] == [ptb[n][0] for n in range(len(texts))]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A man (in red) riding a horse, on the beach.", "a man -lrb- in red -rrb- riding a horse on the beach"),
        ("The bus isn't moving; it's stopped.", "the bus is n't moving it 's stopped"),
        ('A "quoted" t-shirt costs $3.50 -- cheap...', "a quoted t-shirt costs $ 3.50 cheap"),
        ("lots...of dots", "lots of dots"),
    ],
)
def test_python_tokenizer_table(text, tokens):
    assert python_tokenize(text) == tokens


def test_without_java_the_pure_python_metrics_still_come_out(monkeypatch, java_scores):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    metrics = score_captions(REFERENCES, CAPTIONS)
    assert "METEOR" not in metrics and metrics["skipped"] == ["SPICE", "METEOR"]
    assert metrics["tokenizer"] == "python-approximation"
    assert any("java not found" in note for note in metrics["notes"])
    # On these captions the approximation tokenizes exactly as PTB, so the Java-free metrics are the official ones.
    ours, _ = java_scores
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert metrics[name] == pytest.approx(ours[name], rel=1e-12), name
    assert "METEOR" in format_table(metrics).splitlines()[0] and "java not found" in format_table(metrics)


def test_karpathy_and_coco_format_give_the_same_references(tmp_path):
    karpathy = load_split(write_karpathy(tmp_path / "dataset_coco.json", splits={105: "train"}), "test")
    assert [(im.image_id, im.path, im.references) for im in karpathy] == [
        (i, tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg", REFERENCES[i]) for i in (101, 102, 103, 104)
    ]
    gt = load_split(write_coco_gt(tmp_path / "gt.json"), "ignored for COCO format")
    assert {im.image_id: im.references for im in gt} == REFERENCES
    with pytest.raises(EvalError, match="dataset_coco.json: no images to evaluate \\(split 'val'\\)"):
        load_split(tmp_path / "dataset_coco.json", "val")


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({"101": "x"}, "expected a JSON list"),
        ([{"image_id": 101}], "entry 0 must be"),
        ([{"image_id": "101", "caption": "x"}], r"entry 0: image_id must be an int, got '101' \(str\)"),
        ([{"image_id": 101, "caption": 7}], "caption must be a string"),
        ([{"image_id": 101, "caption": "a"}, {"image_id": 101, "caption": "b"}], "101 has more than one caption"),
        ([{"image_id": 999, "caption": "a"}], r"1 image_ids are not in the annotations, e.g. \[999\]"),
        ([], "no captions"),
    ],
)
def test_bad_results_are_clear_errors(results, message):
    with pytest.raises(EvalError, match=message):
        check_results(results, REFERENCES, source="res.json")


def test_partial_results_are_scored_on_their_images_and_flagged(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    partial = {i: CAPTIONS[i] for i in (101, 102, 103)}
    metrics = score_captions(REFERENCES, partial)
    alone = score_captions({i: REFERENCES[i] for i in partial}, partial)
    assert metrics["images"] == 3 and metrics["missing"] == {"count": 2, "image_ids": [104, 105]}
    assert metrics["CIDEr"] == alone["CIDEr"] and any(n.startswith("partial: 2 of 5") for n in metrics["notes"])


# ---- end to end on a tiny checkpoint ---------------------------------------------------------------------------
def test_end_to_end_resumes_after_an_interruption(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # the pure-Python scorers keep this fast
    root = make_coco(tmp_path / "coco", n_train=1, n_restval=1, n_val=1, n_test=5, image_size=32)
    out = tmp_path / "eval"
    annotations = root / "dataset_coco.json"
    args = ["--checkpoint", str(tiny_run), "--annotations", str(annotations), "--output", str(out)]
    args += ["--batch-size", "2", "--max-new-tokens", "5", "--device", "cpu"]
    real_generate, calls = model_generate.generate, []

    def interrupted_after_one_batch(model, prompts, images=None, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return real_generate(model, prompts, images, **kwargs)

    monkeypatch.setattr(model_generate, "generate", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        coco.main(args)
    assert len((out / GENERATIONS_FILE).read_text().splitlines()) == 1 + 2 and not (out / "predictions.json").exists()

    def counting(model, prompts, images=None, **kwargs):
        calls.append(len(prompts))
        return real_generate(model, prompts, images, **kwargs)

    calls.clear()
    monkeypatch.setattr(model_generate, "generate", counting)
    assert coco.main(args) == 0
    assert calls == [2, 1]  # the 3 images not captioned before the interruption
    images = load_split(annotations, "test")
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [im.image_id for im in images]
    model = load_run(tiny_run)
    for im, p in zip(images, predictions, strict=True):  # each caption is the model's for that image alone
        assert set(p) == {"image_id", "caption"}
        assert p["caption"] == real_generate(model, caption_prompt(), im.path, max_new_tokens=5, temperature=0).strip()

    metrics = json.loads((out / "metrics.json").read_text())
    references = {im.image_id: im.references for im in images}
    captions = {p["image_id"]: p["caption"] for p in predictions}
    assert {k: metrics[k] for k in METRIC_NAMES if k in metrics} == {
        k: v for k, v in score_captions(references, captions).items() if k in METRIC_NAMES
    }
    assert metrics["images"] == 5 and metrics["tokenizer"] == "python-approximation"
    assert "LLaMA-Adapter V2 (paper)" in capsys.readouterr().out

    # The written results file scores the same without a model.
    rescored = tmp_path / "rescored"
    assert coco.main(["--results", str(out / "predictions.json"), "--annotations", str(annotations),
                      "--output", str(rescored)]) == 0  # fmt: skip
    assert json.loads((rescored / "metrics.json").read_text()) == metrics


def test_results_file_with_a_duplicate_is_refused(tmp_path, capsys):
    gt = write_coco_gt(tmp_path / "gt.json")
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": 101, "caption": "a"}, {"image_id": 101, "caption": "b"}]))
    assert coco.main(["--results", str(res), "--annotations", str(gt)]) == 2
    assert capsys.readouterr().err == (
        f"error: {res}: image_id 101 has more than one caption (entry 1); one per image\n"
    )


@pytest.mark.parametrize("layout", ["coco", "karpathy"])
def test_scoring_needs_no_images_but_generating_names_the_missing_one(tmp_path, monkeypatch, capsys, layout):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # the Python tokenizer: no JVM start-up
    if layout == "coco":
        annotations = write_coco_gt(tmp_path / "gt.json")
        for image in tmp_path.glob("*.jpg"):
            image.unlink()
        missing = tmp_path / "COCO_val2014_000000000101.jpg"
        entry = f"{annotations}: image id 101"
    else:
        annotations = write_karpathy(tmp_path / "dataset_coco.json")
        shutil.rmtree(tmp_path / "val2014")
        missing = tmp_path / "val2014" / "COCO_val2014_000000000101.jpg"
        entry = f"{annotations}: image entry 0 (cocoid 101)"
    assert sorted(p.name for p in tmp_path.iterdir()) == [annotations.name]
    res = write_results(tmp_path / "res.json")
    assert coco.main(["--results", str(res), "--annotations", str(annotations), "--output", str(tmp_path / "o")]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics == {"annotations": str(annotations), "split": "test", **score_captions(REFERENCES, CAPTIONS)}
    assert metrics["images"] == 5 and metrics["missing"]["count"] == 0
    capsys.readouterr()
    argv = ["--checkpoint", str(tmp_path), "--annotations", str(annotations), "--output", str(tmp_path / "gen")]
    assert coco.main(argv) == 2  # generating needs the images: the first missing one is named
    assert capsys.readouterr().err == f"error: {entry}: image file {missing} is missing\n"


@needs_java
def test_ptb_lines_stay_aligned_when_a_caption_holds_a_line_break():
    captions = {1: ["A dog\r on a\u2028mat.", ""], 2: ["   "], 3: ["two\nlines"], 4: ["The end."]}
    assert coco.tokenize(captions, use_java=True) == {
        1: ["a dog on a mat", ""],
        2: [""],
        3: ["two lines"],
        4: ["the end"],
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give exactly one of --checkpoint RUN_DIR (generate) or --results FILE (score)"),
        (["--checkpoint", "run", "--results", "r.json"], "give exactly one of"),
        (["--checkpoint", "run"], "--output DIR is required with --checkpoint"),
    ],
)
def test_command_line_names_the_missing_or_clashing_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        coco.main([*argv, "--annotations", "a.json"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_annotations_file_or_a_folder_that_is_no_run_is_one_error_line(tmp_path, capsys):
    root = make_coco(tmp_path / "coco", n_train=1, n_restval=1, n_val=1, n_test=1, image_size=32)
    common = ["--checkpoint", str(tmp_path), "--images", str(root), "--output", str(tmp_path / "out")]
    for annotations, message in [(tmp_path / "nope.json", "nope.json: no such file"), (root / "dataset_coco.json",
                                 f"{tmp_path}: not a run directory")]:  # fmt: skip
        assert coco.main([*common, "--annotations", str(annotations)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written for a failed start
