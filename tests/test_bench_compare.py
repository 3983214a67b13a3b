"""``python -m bench methods`` (bench/compare.py) on the embedded default at a tiny size (2 steps, one learning rate,
4 items of val and test): every shipped method with every figure in methods.md and methods.json, the picture, the
loss at step 0 equal to the base model's exactly for the methods that start as the base model, the README's 7B
counts, resuming without retraining but redoing an interrupted unit, identical scores from two invocations, and the
errors for an unknown method or changed settings."""

import argparse
import json
from pathlib import Path

import pytest

from bench import compare
from eval.scienceqa import CATEGORIES

TINY = ["--steps", "2", "--lr-sweep", "1", "--eval-limit", "4"]
STARTS_AS_BASE = {"llama_adapter", "llama_adapter_v2", "lora", "dora", "ia3", "houlsby"}
"""tests/test_method_contract.py's IDENTITY_AT_INIT: the methods whose fresh adapter is exactly the base model."""
FIGURES = ("trainable_values", "saved_values", "trainable_values_7b", "trainable_values_7b_clip", "adapter_bytes",
           "chosen_lr", "steps", "final_loss", "tokens_per_s", "peak_memory_mib", "decode_tokens_per_s", "step0_loss",
           "base_step0_loss")  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench methods")
    compare.add_arguments(p)
    return p


def invoke(*argv: str) -> int:
    return compare.main(parser().parse_args(list(argv)))


def report(out: Path) -> dict:
    return json.loads((out / "methods.json").read_text())


def scores(out: Path) -> dict:
    """Every score and loss at step 0 of every method (what must repeat exactly)."""
    methods = report(out)["methods"]
    keys = ("val", "test", "no_images", "step0_loss", "base_step0_loss", "final_loss", "chosen_lr")
    return {name: {k: m[k] for k in keys} for name, m in methods.items()}


@pytest.fixture(scope="module", autouse=True)
def no_loss_curves():
    """Each run's loss_curve.png (train.py's, tested with it) costs more than its two training steps here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("training.run.plot_loss_curve", lambda run_dir: None)
        yield


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-methods")
    assert invoke(*TINY, "--out", str(out)) == 0
    return out


def test_every_method_appears_with_every_figure_in_the_json(first):
    r = report(first)
    assert list(r["methods"]) == compare.shipped_methods() and len(r["methods"]) == 10  # ten shipped methods
    assert r["header"]["date"] and r["header"]["device"]["cpu_cores"] >= 1 and "git_commit" in r["header"]
    assert r["settings"]["steps"] == 2 and r["settings"]["lr_multipliers"] == [1.0]
    for name, m in r["methods"].items():
        assert m["error"] is None, name
        assert all(m[k] is not None for k in FIGURES), name
        assert m["steps"] == 2 and m["chosen_lr_multiplier"] == 1.0 and m["chosen_lr"] == r["settings"]["peak_lr"]
        for split in (m["val"], m["test"], m["no_images"]["test"]):
            assert set(CATEGORIES) <= set(split) and split["n"] == 4, name
        assert m["tokens_per_s"] > 0 and m["decode_tokens_per_s"] > 0 and m["peak_memory_mib"] > 0
        assert m["adapter_bytes"] == (first / "runs" / f"{name}-lr1" / "adapter.safetensors").stat().st_size
        assert m["trainable_values_7b_clip"] - m["trainable_values_7b"] == 557_136  # the README's ViT-L/14 projection
        assert [s["lr_multiplier"] for s in m["sweep"]] == [1.0]
    assert r["methods"]["llama_adapter"]["trainable_values_7b"] == 1_229_760  # the README's table
    assert r["methods"]["prompt"]["trainable_values_7b"] == 81_920
    # prefix tuning and P-tuning train an MLP / encoder but save only the prompts it made
    smaller = {n for n, m in r["methods"].items() if m["saved_values"] < m["trainable_values"]}
    assert {"prefix", "ptuning"} <= smaller and "llama_adapter" not in smaller


def test_the_loss_at_step_0_is_the_base_models_exactly_for_methods_that_start_as_it(first):
    methods = report(first)["methods"]
    base = {m["base_step0_loss"] for m in methods.values()}
    assert len(base) == 1  # the same batch, the same base model, for every method
    assert {n for n, m in methods.items() if m["starts_as_base"]} == STARTS_AS_BASE
    for name in STARTS_AS_BASE:
        assert methods[name]["step0_loss"] == methods[name]["base_step0_loss"]


def test_the_markdown_has_every_method_in_every_table_and_the_picture_exists(first):
    md = (first / "methods.md").read_text()
    for column in (*CATEGORIES, "no images: Avg", "no images: IMG", "val Avg", "trainable values", "saved", "at 7B",
                   "7B + CLIP", "adapter file", "train tokens/s", "peak memory MiB", "decode tokens/s",
                   "loss at step 0", "base model's", "x1"):  # fmt: skip
        assert f"| {column} |" in md, column
    for name in compare.shipped_methods():
        assert md.count(f"| `{name}` |") == 3, name  # scores, costs, sweep
    assert md.count("(= base)") == len(STARTS_AS_BASE)
    assert (first / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_invocation_redoes_only_the_interrupted_unit(first):
    results = sorted((first / "results").glob("*.json"))
    # per method: one learning rate, the chosen run's test scoring, the control
    assert len(results) == len(compare.shipped_methods()) * 3
    expected = scores(first)
    interrupted = first / "results" / "prompt-lr1-noimages.json"
    interrupted.unlink()  # its run directory stays, as a killed run leaves it
    (first / "runs" / "prompt-lr1-noimages" / "stale").write_text("left by the interrupted run")
    before = {p: p.stat().st_mtime_ns for p in results if p != interrupted}
    assert invoke(*TINY, "--out", str(first)) == 0
    assert report(first)["settings"]["trained_by_this_invocation"] == 1
    assert {p: p.stat().st_mtime_ns for p in results if p != interrupted} == before  # finished units: read back
    assert interrupted.is_file() and not (first / "runs" / "prompt-lr1-noimages" / "stale").exists()
    assert scores(first) == expected


def test_a_truncated_result_file_is_redone_with_a_note(first, capsys):
    damaged = first / "results" / "prompt-lr1-noimages.json"
    expected = scores(first)
    damaged.write_text(damaged.read_text()[:40])  # cut, as a full disk or a copy gone wrong leaves it
    assert invoke(*TINY, "--out", str(first)) == 0
    captured = capsys.readouterr()
    assert "prompt-lr1-noimages: its result file cannot be read" in captured.err + captured.out
    assert report(first)["settings"]["trained_by_this_invocation"] == 1 and scores(first) == expected


def test_two_invocations_give_identical_scores(first, tmp_path):
    """AdaMix (a random expert per step) alone in a fresh folder repeats what it scored after seven other methods."""
    assert invoke(*TINY, "--methods", "adamix", "--out", str(tmp_path)) == 0
    assert scores(tmp_path) == {"adamix": scores(first)["adamix"]}


def test_an_unknown_method_is_one_error_listing_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["--methods", "lora,loar"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --methods: unknown method(s) loar; choose from " in err
    assert all(name in err for name in compare.shipped_methods())


def test_other_settings_on_the_same_out_are_refused(first, capsys):
    assert invoke("--steps", "3", "--lr-sweep", "1", "--eval-limit", "4", "--out", str(first)) == 2
    err = capsys.readouterr().err
    assert "holds runs made with other settings (steps: 2 -> 3, config.optim.max_steps: 2 -> 3," in err
    assert "use another --out or delete it" in err
