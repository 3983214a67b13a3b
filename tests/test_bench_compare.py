"""``python -m bench methods`` (bench/compare.py) on the embedded default at a tiny size (2 steps, one learning rate,
one seed, the native visual entry, 4 items of val and test): every shipped method with every figure in methods.md
and methods.json, the picture, the loss at step 0 equal to the base model's exactly for the methods that start as
the base model, the README's 7B counts, resuming without retraining but redoing an interrupted unit, identical
scores from two invocations, and the errors for an unknown method or changed settings. Then two methods with two
seeds and both visual entries: the statistics, the shared entry, and the learning-rate search widening by itself."""

import argparse
import json
from pathlib import Path

import pytest

from bench import compare
from eval.scienceqa import CATEGORIES

TINY = ["--steps", "2", "--lr-sweep", "1", "--lr-widen", "0", "--seeds", "1", "--visual-entry", "native",
        "--eval-limit", "4"]  # fmt: skip
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
    r = report(out)
    keys = ("val", "test", "stats", "seeds", "step0_loss", "base_step0_loss", "final_loss", "chosen_lr")
    cells = {name: {e: {k: f.get(k) for k in keys} for e, f in m.items()} for name, m in r["methods"].items()}
    return {"cells": cells, "pairs": r["pairs"]}


def native(out: Path) -> dict:
    """Each method's figures at the native visual entry."""
    return {name: m["native"] | {"no_images": m["no_images"]} for name, m in report(out)["methods"].items()}


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
    assert list(r["methods"]) == compare.shipped_methods() and len(r["methods"]) == 11  # eleven shipped methods
    assert r["header"]["date"] and r["header"]["device"]["cpu_cores"] >= 1 and "git_commit" in r["header"]
    assert r["settings"]["steps"] == 2 and r["settings"]["lr_multipliers"] == [1.0]
    for name, m in native(first).items():
        assert m["error"] is None, name
        assert all(m[k] is not None for k in FIGURES), name
        assert m["steps"] == 2 and m["chosen_lr_multiplier"] == 1.0 and m["chosen_lr"] == r["settings"]["peak_lr"]
        assert [s["seed"] for s in m["seeds"]] == [0] and m["seeds"][0]["test"] == m["test"]
        for split in (m["val"], m["test"], m["no_images"]["seeds"][0]["test"]):
            assert set(CATEGORIES) <= set(split) and split["n"] == 4, name
        assert m["tokens_per_s"] > 0 and m["decode_tokens_per_s"] > 0 and m["peak_memory_mib"] > 0
        assert m["adapter_bytes"] == (first / "runs" / f"{name}-native-lr1" / "adapter.safetensors").stat().st_size
        assert m["own_values"] + m["projection_values"] == m["trainable_values"] and m["entry_values"] == 0
        assert m["trainable_values_7b_clip"] - m["trainable_values_7b"] == 557_136  # the README's ViT-L/14 projection
        assert [s["lr_multiplier"] for s in m["sweep"]] == [1.0]
    assert native(first)["llama_adapter"]["trainable_values_7b"] == 1_229_760  # the README's table
    assert native(first)["prompt"]["trainable_values_7b"] == 81_920
    # prefix tuning and P-tuning train an MLP / encoder but save only the prompts it made
    smaller = {n for n, m in native(first).items() if m["saved_values"] < m["trainable_values"]}
    assert {"prefix", "ptuning"} <= smaller and "llama_adapter" not in smaller


def test_the_loss_at_step_0_is_the_base_models_exactly_for_methods_that_start_as_it(first):
    methods = native(first)
    base = {m["base_step0_loss"] for m in methods.values()}
    assert len(base) == 1  # the same batch, the same base model, for every method
    assert {n for n, m in methods.items() if m["starts_as_base"]} == STARTS_AS_BASE
    for name in STARTS_AS_BASE:
        assert methods[name]["step0_loss"] == methods[name]["base_step0_loss"]


def test_the_markdown_has_every_method_in_every_table_and_the_picture_exists(first):
    md = (first / "methods.md").read_text()
    for column in ("Avg (mean ± sd)", "95% interval", "IMG", "TXT", "NO", "no images: Avg", "no images: IMG",
                   "val Avg", "own trainable values", "visual projection", "shared entry", "saved", "at 7B",
                   "7B + CLIP", "adapter file", "train tokens/s", "peak memory MiB", "decode tokens/s",
                   "loss at step 0", "base model's", "tried"):  # fmt: skip
        assert f"| {column} |" in md, column
    for name in compare.shipped_methods():
        assert md.count(f"| `{name}` |") == 3, name  # scores, costs, search
    assert md.count("(= base)") == len(STARTS_AS_BASE)
    assert (first / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_invocation_redoes_only_the_interrupted_unit(first):
    results = sorted((first / "results").glob("*.json"))
    # per method: one learning rate, the chosen run's test scoring, the control
    assert len(results) == len(compare.shipped_methods()) * 3
    expected = scores(first)
    interrupted = first / "results" / "prompt-noimages-lr1-seed0.json"
    interrupted.unlink()  # its run directory stays, as a killed run leaves it
    (first / "runs" / "prompt-noimages-lr1-seed0" / "stale").write_text("left by the interrupted run")
    before = {p: p.stat().st_mtime_ns for p in results if p != interrupted}
    assert invoke(*TINY, "--out", str(first)) == 0
    assert report(first)["settings"]["trained_by_this_invocation"] == 1
    assert {p: p.stat().st_mtime_ns for p in results if p != interrupted} == before  # finished units: read back
    assert interrupted.is_file() and not (first / "runs" / "prompt-noimages-lr1-seed0" / "stale").exists()
    assert scores(first) == expected


def test_a_truncated_result_file_is_redone_with_a_note(first, capsys):
    damaged = first / "results" / "prompt-noimages-lr1-seed0.json"
    expected = scores(first)
    damaged.write_text(damaged.read_text()[:40])  # cut, as a full disk or a copy gone wrong leaves it
    assert invoke(*TINY, "--out", str(first)) == 0
    captured = capsys.readouterr()
    assert "prompt-noimages-lr1-seed0: its result file cannot be read" in captured.err + captured.out
    assert report(first)["settings"]["trained_by_this_invocation"] == 1 and scores(first) == expected


def test_two_invocations_give_identical_scores(first, tmp_path):
    """AdaMix (a random expert per step) alone in a fresh folder repeats what it scored after seven other methods."""
    assert invoke(*TINY, "--methods", "adamix", "--out", str(tmp_path)) == 0
    assert scores(tmp_path)["cells"] == {"adamix": scores(first)["cells"]["adamix"]}


def test_an_unknown_method_is_one_error_listing_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["--methods", "lora,loar"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --methods: unknown method(s) loar; choose from " in err
    assert all(name in err for name in compare.shipped_methods())


def test_other_settings_on_the_same_out_are_refused(first, capsys):
    assert invoke(*[("3" if a == "2" else a) for a in TINY], "--out", str(first)) == 2
    err = capsys.readouterr().err
    assert "holds runs made with other settings (steps: 2 -> 3, config.optim.max_steps: 2 -> 3," in err
    assert "use another --out or delete it" in err


# ---- seeds, both visual entries, the statistics -------------------------------------------------------------------
TWO = ["--methods", "llama_adapter,lora", "--steps", "2", "--lr-sweep", "1", "--lr-widen", "0", "--seeds", "2",
       "--eval-limit", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-two")
    assert invoke(*TWO, "--out", str(out)) == 0
    return out


def test_two_seeds_and_both_entries_give_cells_with_intervals_and_pairs(two):
    r = report(two)
    assert r["settings"]["seeds"] == 2 and r["settings"]["visual_entries"] == ["native", "shared"]
    for name, m in r["methods"].items():
        for entry in ("native", "shared"):
            f = m[entry]
            assert [s["seed"] for s in f["seeds"]] == [0, 1], (name, entry)
            avg = [s["test"]["Avg"] for s in f["seeds"]]
            stat = f["stats"]["Avg"]
            assert stat["n"] == 2 and stat["mean"] == pytest.approx(sum(avg) / 2)
            assert stat["sd"] == pytest.approx(abs(avg[0] - avg[1]) / 2**0.5)
            half = 12.706 * stat["sd"] / 2**0.5  # Student's t, 1 degree of freedom
            assert stat["ci95"] == pytest.approx([stat["mean"] - half, stat["mean"] + half])
            assert all("items" not in s["test"] for s in f["seeds"])  # used for the bootstrap, not kept
        assert len(m["no_images"]["seeds"]) == 2 and m["no_images"]["stats"]["Avg"]["n"] == 2
    # two seeds train two different adapters (a seed moves the adapter's init and the data order)
    runs = two / "runs"
    a, b = (runs / f"llama_adapter-native-lr1{s}" / "adapter.safetensors" for s in ("", "-seed1"))
    assert a.read_bytes() != b.read_bytes()
    assert [(p["a"], p["b"]) for p in r["pairs"]["native"]] == [("llama_adapter", "lora")]
    assert {"difference", "ci95", "significant"} <= set(r["pairs"]["shared"][0])


def test_the_shared_entry_trains_prompt_methods_text_only_and_reuses_gated_prompt_methods(two):
    r = report(two)
    adapter, lora = r["methods"]["llama_adapter"], r["methods"]["lora"]
    assert lora["shared"]["same_as_native"] and not (two / "results" / "lora-shared-lr1.json").exists()
    shared = adapter["shared"]
    assert "same_as_native" not in shared and (two / "results" / "llama_adapter-shared-lr1.json").is_file()
    config = json.loads((two / "runs" / "llama_adapter-shared-lr1" / "adapter.json").read_text())
    assert config["model_config"]["visual"]["entry"] == "shared"
    # the method's own tensors are its native ones (prompts and their gates); the shared entry adds 4 heads x 2
    # layers of gates
    assert shared["entry_values"] == 8 and shared["own_values"] == adapter["native"]["own_values"]
    md = (two / "methods.md").read_text()
    assert "## Test scores, shared visual entry" in md and "| `lora` (= native) |" in md
    assert "pairs differ significantly on Avg (2 seed(s)" in md


def test_two_invocations_give_identical_tables(two, tmp_path):
    assert invoke(*TWO, "--out", str(tmp_path)) == 0
    assert scores(tmp_path) == scores(two)

    def tables(out: Path) -> list[str]:  # the scores and pairs (the costs are timings; the header has the date)
        lines = (out / "methods.md").read_text().split("## Costs")[0].splitlines()
        return [line for line in lines if not line.startswith("Machine:")]

    assert tables(tmp_path) == tables(two) and "| `llama_adapter` |" in "\n".join(tables(two))


def test_the_learning_rate_search_widens_until_the_best_is_interior(monkeypatch):
    """A val score that peaks at x1/64: from 0.25, 1, 4 the search adds 1/16 and 1/64 (now interior: 1/256 was
    tried too) within --lr-widen 3; with --lr-widen 1 the best stays at the edge and is flagged."""
    from bench import compare_units

    def fake_run(self, method, entry, multiplier, seed=0, images=True):
        import math

        self.trained += 1
        return {"unit": compare_units.unit_name(method, entry, multiplier), "error": None, "lr_multiplier": multiplier,
                "val": {"Avg": 90 - 5 * abs(math.log(multiplier * 64, 4))}}  # fmt: skip

    monkeypatch.setattr(compare_units.Units, "trained_run", fake_run)

    class Bar:
        total = 0

    for widen, tried, edge in ((3, [1 / 256, 1 / 64, 1 / 16, 0.25, 1, 4], False), (1, [1 / 16, 0.25, 1, 4], True)):
        plan = argparse.Namespace(multipliers=[0.25, 1.0, 4.0], widen=widen, scorer=compare.SCORERS["scienceqa"])
        units = compare_units.Units(plan, Bar())
        sweep, at_edge = units.search("lora", "native")
        assert [r["lr_multiplier"] for r in sweep] == pytest.approx(tried) and at_edge is edge


def test_a_failed_top_rate_brackets_the_best_and_all_failed_widens_down():
    from bench.compare_units import next_multiplier

    assert next_multiplier([0.25, 1, 4], 4) == 16 and next_multiplier([0.25, 1, 4], 0.25) == 0.0625
    assert next_multiplier([0.25, 1, 4, 16], 4) is None  # x16 failed: x4 is bracketed
    assert next_multiplier([0.25, 1, 4], None) == 0.0625 and next_multiplier([1], 1) == 0.25


def test_a_unit_made_with_other_method_settings_is_redone_and_new_methods_can_join(first, capsys):
    """settings.json leaves the methods' own sections out (a method added to model/methods later runs into the same
    OUT); each unit records its method's section and is redone, said so, when that changed."""
    settings = json.loads((first / "settings.json").read_text())
    assert "lora" not in settings["config"]["model"] and "adapter" not in settings["config"]["model"]
    unit = first / "results" / "lora-native-lr1.json"
    record = json.loads(unit.read_text())
    assert record["method_settings"]["rank"] == 8
    record["method_settings"]["rank"] = 4  # as if LoRA's default rank had been 4 when it ran
    unit.write_text(json.dumps(record))
    expected = scores(first)
    assert invoke(*TINY, "--out", str(first)) == 0
    out = capsys.readouterr()
    assert "lora-native-lr1: " in out.err + out.out and "was made with another method_settings" in out.err + out.out
    assert report(first)["settings"]["trained_by_this_invocation"] == 1  # retrained bit for bit: the rest reused
    assert scores(first) == expected
