"""eval/scienceqa.py: answer parsing, the official category accuracy on a hand-computed problem set, scoring an
existing results file, and the end-to-end run of a tiny checkpoint with resume after an interruption."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import model.generate as model_generate
from data.scienceqa import build_prompt, load_problems
from data.synthetic import export_scienceqa_hf, make_scienceqa
from eval.common import GENERATIONS_FILE, EvalError, GenerationLog
from eval.scienceqa import format_table, main, parse_answer, score_scienceqa
from model import load_run
from tests.conftest import make_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- parsing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "n_choices", "index", "error"),
    [
        ("The answer is (B)", 3, 1, None),
        ("The answer is B.", 3, 1, None),
        ("(B)", 3, 1, None),
        ("B", 3, 1, None),
        ("  (C).\n", 3, 2, None),
        ("Answer: The answer is (A).", 2, 0, None),
        ("Answer: D", 4, 3, None),
        ("the answer is: (B) because it is blue", 2, 1, None),
        ("The answer is (B). BECAUSE: a lecture. So the answer is B.", 3, 1, None),  # the same letter twice
        ("B. It is the northernmost state.", 4, 1, None),  # LLaVA's "X. " form
        ("(A) Oklahoma", 4, 0, None),
        ("The answer is (E)", 3, -1, "letter E is out of range for 3 choices"),
        ("D", 2, -1, "letter D is out of range for 2 choices"),
        ("The answer is (A). The answer is (C).", 3, -1, "ambiguous: names A, C"),
        ("The answer is Blue", 3, -1, "no answer letter found"),
        ("A dog on a mat", 3, -1, "no answer letter found"),
        ("b", 3, -1, "no answer letter found"),
        ("", 3, -1, "no answer letter found"),
    ],
)
def test_parse_answer_table(text, n_choices, index, error):
    assert parse_answer(text, n_choices) == (index, error)


# ---- scoring a hand-computed set -------------------------------------------------------------------------------
NAT, SOC, LAN = "natural science", "social science", "language science"
# pid: (subject, hint, has image, grade, answer, n choices, topic, split)
CRAFTED = {
    "1": (NAT, "", True, "grade2", 0, 2, "physics", "test"),
    "2": (NAT, "A hint.", True, "grade8", 1, 3, "physics", "test"),
    "3": (SOC, "A hint.", False, "grade5", 2, 3, "geography", "test"),
    "4": (SOC, "", False, "grade10", 0, 2, "geography", "test"),
    "5": (LAN, "A hint.", True, "grade3", 1, 2, "grammar", "test"),
    "6": (LAN, "", False, "grade12", 1, 4, "grammar", "test"),
    "7": (NAT, "", False, "grade7", 0, 2, "physics", "test"),
    "8": (SOC, "h", True, "grade1", 3, 4, "geography", "test"),
    "9": (NAT, "", False, "grade4", 0, 2, "physics", "train"),
}
OUTPUTS = {
    "1": "The answer is (A)",  # right
    "2": "The answer is (A)",  # wrong
    "3": "(C)",  # right
    "4": "I am not sure",  # unparseable
    "5": "The answer is (A). The answer is (B)",  # ambiguous
    "6": "B",  # right
    # "7" missing from the results
    "8": "The answer is (D).",  # right
    "9": "The answer is (A)",  # a train pid: not in the test split
}


def write_scienceqa(root: Path, crafted=CRAFTED) -> Path:
    """The official layout (problems.json, pid_splits.json, images/{split}/{pid}/image.png) for ``crafted``."""
    problems, splits = {}, {"train": [], "val": [], "test": []}
    for pid, (subject, hint, image, grade, answer, n, topic, split) in crafted.items():
        problems[pid] = {
            "question": f"Question {pid}?", "choices": [f"choice {k}" for k in range(n)], "answer": answer,
            "hint": hint, "image": "image.png" if image else None, "task": "closed choice", "grade": grade,
            "subject": subject, "topic": topic, "category": "Crafted", "skill": "Crafted", "lecture": "",
            "solution": "", "split": split,
        }  # fmt: skip
        splits[split].append(pid)
        if image:
            (root / "images" / split / pid).mkdir(parents=True)
            Image.new("RGB", (8, 8), (40 * int(pid), 0, 0)).save(root / "images" / split / pid / "image.png")
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    return root


@pytest.fixture
def crafted(tmp_path):
    return write_scienceqa(tmp_path / "scienceqa")


def crafted_results() -> dict[str, int]:
    return {pid: parse_answer(text, CRAFTED[pid][5]).index for pid, text in OUTPUTS.items()}


def test_scorer_reproduces_hand_computed_categories(crafted):
    problems = load_problems(crafted, "test")
    results = crafted_results()
    assert results == {"1": 0, "2": 0, "3": 2, "4": -1, "5": -1, "6": 1, "8": 3, "9": 0}
    metrics = score_scienceqa(problems, results, OUTPUTS)
    # Right: 1, 3, 6, 8 of 1..8. TXT = {2, 3, 5, 8} and IMG = {1, 2, 5, 8} overlap on 2, 5, 8; NO = {4, 6, 7}.
    expected = {
        "Avg": (4, 8, 50.0), "NAT": (1, 3, 33.33), "SOC": (2, 3, 66.67), "LAN": (1, 2, 50.0),
        "TXT": (2, 4, 50.0), "IMG": (2, 4, 50.0), "NO": (1, 3, 33.33), "G1-6": (3, 4, 75.0), "G7-12": (1, 4, 25.0),
    }  # fmt: skip
    for category, (right, total, pct) in expected.items():
        assert metrics[category] == pct, category
        assert metrics["counts"][category] == {"correct": right, "total": total}, category
    assert metrics["topics"]["physics"] == {"accuracy": 33.33, "correct": 1, "total": 3}
    assert metrics["parse_failures"] == {
        "count": 2,
        "items": [
            {"pid": "4", "error": "no answer letter found", "output": "I am not sure"},
            {"pid": "5", "error": "ambiguous: names A, B", "output": OUTPUTS["5"]},
        ],
    }
    assert metrics["missing"] == {"count": 1, "pids": ["7"]}
    assert metrics["unexpected"] == {"count": 1, "pids": ["9"]}


def test_table_sits_beside_the_paper_row_with_the_notes(crafted):
    metrics = score_scienceqa(load_problems(crafted, "test"), crafted_results(), OUTPUTS)
    lines = format_table(metrics, label="run").splitlines()
    assert lines[0].split() == ["Avg", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"]
    assert lines[1].split()[-9:] == ["50.00", "33.33", "66.67", "50.00", "50.00", "50.00", "33.33", "75.00", "25.00"]
    assert lines[2].split()[-9:] == "85.19 84.37 88.30 84.36 83.72 80.32 86.90 85.83 84.05".split()
    assert lines[3:] == [
        "unparseable answers (counted wrong): 2: pids 4, 5",
        "missing from the results (counted wrong): 1 of 8: pids 7",
        "in the results but not in this split (ignored): 1: pids 9",
    ]


def test_empty_category_is_none_and_non_int_results_are_errors(crafted):
    problems = [p for p in load_problems(crafted, "test") if p.subject == NAT]
    metrics = score_scienceqa(problems, {"1": 0, "2": 1, "7": 0})
    assert metrics["Avg"] == 100.0 and metrics["SOC"] is None and metrics["counts"]["SOC"]["total"] == 0
    assert score_scienceqa(problems, {"1": "0", "2": "1", "7": "0"})["Avg"] == 100.0  # int() as the official
    with pytest.raises(EvalError, match=r"res.json: results\['2'\] = 'B'; expected a choice index"):
        score_scienceqa(problems, {"1": 0, "2": "B"}, source="res.json")


def test_scoring_a_results_file_reports_missing_pids(crafted, tmp_path, capsys):
    results_file = tmp_path / "predictions.json"
    results_file.write_text(json.dumps({"results": crafted_results(), "outputs": OUTPUTS}))
    args = ["--predictions", str(results_file), "--data", str(crafted), "--output", str(tmp_path / "out")]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics == {"split": "test", **score_scienceqa(load_problems(crafted, "test"), crafted_results(), OUTPUTS)}
    printed = capsys.readouterr().out
    assert "missing from the results (counted wrong): 1 of 8: pids 7" in printed and "50.00" in printed

    results_file.write_text(json.dumps({"1": 0}))
    assert main(args) == 2
    assert f'{results_file}: expected an object with "results"' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(crafted)])  # neither --checkpoint nor --predictions


def test_scoring_needs_no_images_but_generating_names_the_missing_one(crafted, tmp_path, capsys):
    expected = score_scienceqa(load_problems(crafted, "test"), crafted_results(), OUTPUTS)
    shutil.rmtree(crafted / "images")  # what a scoring machine holds: problems.json and pid_splits.json only
    assert sorted(p.name for p in crafted.iterdir()) == ["pid_splits.json", "problems.json"]
    results_file = tmp_path / "predictions.json"
    results_file.write_text(json.dumps({"results": crafted_results(), "outputs": OUTPUTS}))
    out = tmp_path / "out"
    assert main(["--predictions", str(results_file), "--data", str(crafted), "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"split": "test", **expected}
    assert metrics["IMG"] == 50.0 and metrics["counts"]["IMG"] == {"correct": 2, "total": 4}  # still from "image"
    capsys.readouterr()
    argv = ["--checkpoint", str(tmp_path), "--data", str(crafted), "--output", str(tmp_path / "gen")]
    assert main(argv) == 2  # generating needs the images: the first missing one is named
    missing = crafted / "images" / "test" / "1" / "image.png"
    assert capsys.readouterr().err == f"error: {crafted / 'problems.json'}: pid 1: image file {missing} is missing\n"


# ---- end to end on a tiny checkpoint ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_scienceqa(tmp_path_factory.mktemp("data") / "sqa", n_train=2, n_val=2, n_test=8, image_size=32)


def test_end_to_end_resumes_after_an_interruption(tiny_run, synthetic, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    args = ["--checkpoint", str(tiny_run), "--data", str(synthetic), "--output", str(out)]
    args += ["--batch-size", "3", "--max-new-tokens", "6", "--device", "cpu"]
    problems = load_problems(synthetic, "test")
    assert len(problems) == 8 and any(p.image_path for p in problems) and not all(p.image_path for p in problems)
    real_generate, prompts_seen = model_generate.generate, []

    def interrupted_after_one_batch(model, prompts, images=None, **kwargs):
        if prompts_seen:
            raise KeyboardInterrupt
        prompts_seen.extend(prompts)
        return real_generate(model, prompts, images, **kwargs)

    monkeypatch.setattr(model_generate, "generate", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    log = out / GENERATIONS_FILE
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 3 and not (out / "predictions.json").exists()
    # Mark one finished record (to tell a kept output from a regenerated one) and cut a record short, as a kill
    # in the middle of a write would.
    first = {**json.loads(lines[1]), "output": "The answer is (A)"}
    log.write_text("\n".join([lines[0], json.dumps(first), *lines[2:]]) + '\n{"pid": "1')

    def counting(model, prompts, images=None, **kwargs):
        prompts_seen.extend(prompts)
        return real_generate(model, prompts, images, **kwargs)

    prompts_seen.clear()
    monkeypatch.setattr(model_generate, "generate", counting)
    assert main(args) == 0
    assert prompts_seen == [build_prompt(p) for p in problems[3:]]  # only the 5 not yet done
    predictions = json.loads((out / "predictions.json").read_text())
    assert list(predictions) == ["results", "outputs"]
    assert list(predictions["results"]) == [p.pid for p in problems]
    assert predictions["outputs"][first["pid"]] == "The answer is (A)" and predictions["results"][first["pid"]] == 0

    model = load_run(tiny_run)  # the resumed outputs are what the model generates for each prompt and image alone
    for p in problems[3:]:
        alone = real_generate(model, build_prompt(p), p.image_path, max_new_tokens=6, temperature=0)
        assert predictions["outputs"][p.pid] == alone
        assert predictions["results"][p.pid] == parse_answer(alone, len(p.choices)).index
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {
        "split": "test",
        **score_scienceqa(problems, predictions["results"], predictions["outputs"]),
    }
    assert "LLaMA-Adapter (paper, test)" in capsys.readouterr().out

    prompts_seen.clear()  # everything is done: a rerun only rescores
    assert main(args) == 0 and prompts_seen == []
    assert json.loads((out / "metrics.json").read_text()) == metrics

    other = [*args[:-4], "--max-new-tokens", "7", "--device", "cpu"]
    assert main(other) == 2
    assert "holds generations made with other settings (max_new_tokens: 6 -> 7)" in capsys.readouterr().err


def test_text_only_run_answers_without_images(synthetic, tmp_path, monkeypatch):
    run = make_tiny_run(tmp_path / "text-run", visual=False)
    seen = []

    def recording(model, prompts, images=None, **kwargs):
        seen.extend(images)
        return [""] * len(prompts)

    monkeypatch.setattr(model_generate, "generate", recording)
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(run), "--data", str(synthetic), "--output", str(out), "--device", "cpu"]) == 0
    assert len(seen) == 8 and seen == [None] * 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["Avg"] == 0.0 and metrics["parse_failures"]["count"] == 8


def test_hugging_face_copy_gives_the_same_predictions(tiny_run, synthetic, tmp_path):
    hf = export_scienceqa_hf(synthetic, tmp_path / "hf", fmt="disk")
    shutil.copy(synthetic / "pid_splits.json", hf / "pid_splits.json")  # pids rebuilt as the official ones
    assert any(p.image_bytes for p in load_problems(hf, "test"))  # images arrive as encoded PNG bytes
    common = ["--checkpoint", str(tiny_run), "--max-new-tokens", "4", "--device", "cpu"]
    for name, root in (("official", synthetic), ("hf", hf)):
        assert main([*common, "--data", str(root), "--output", str(tmp_path / name)]) == 0
    official = json.loads((tmp_path / "official" / "predictions.json").read_text())
    assert json.loads((tmp_path / "hf" / "predictions.json").read_text()) == official
    official_metrics = json.loads((tmp_path / "official" / "metrics.json").read_text())
    assert json.loads((tmp_path / "hf" / "metrics.json").read_text())["counts"] == official_metrics["counts"]


def test_generation_log_round_trips_any_text_and_drops_a_cut_line(tmp_path):
    path, header = tmp_path / GENERATIONS_FILE, {"checkpoint": "run", "max_new_tokens": 6}
    texts = {"1": "line\nbreak", "2": "sep\u2028arator \u00e9", "3": ""}
    GenerationLog(path, header, key_field="pid").append(texts.items())
    with open(path, "a") as f:
        f.write('{"pid": "4", "outp')  # killed mid-write
    reopened = GenerationLog(path, header, key_field="pid")
    assert reopened.done == texts and path.read_text().endswith('"pid": "3", "output": ""}\n')
    reopened.append([("4", "The answer is (A)")])
    assert GenerationLog(path, header, key_field="pid").done == {**texts, "4": "The answer is (A)"}
    with pytest.raises(EvalError, match=r"other settings \(max_new_tokens: 6 -> 8\)"):
        GenerationLog(path, {**header, "max_new_tokens": 8}, key_field="pid")


def test_a_full_disk_during_generation_is_one_error_naming_the_log_and_the_rerun_resumes(
    tiny_run, synthetic, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "eval"
    args = ["--checkpoint", str(tiny_run), "--data", str(synthetic), "--output", str(out)]
    args += ["--batch-size", "4", "--max-new-tokens", "3", "--device", "cpu"]
    real_fsync, calls = os.fsync, []

    def fsync_fails_on_the_second_batch(fd):
        calls.append(fd)
        if len(calls) == 3:  # 1: the header, 2: the first batch, 3: the second batch
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_the_second_batch)
    assert main(args) == 1
    log = out / GENERATIONS_FILE
    last_line = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last_line == f"error: {log}: cannot write (No space left on device); earlier records are kept"
    assert not (out / "predictions.json").exists()
    assert len(GenerationLog(log, json.loads(log.read_text().splitlines()[0])["header"], "pid").done) >= 4
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(args) == 0
    assert len(json.loads((out / "predictions.json").read_text())["results"]) == 8
