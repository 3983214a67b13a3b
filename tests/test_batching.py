"""training/batching.py: the steps of an epoch grouped by length (every example once, the same schedule on every
rank, resumable mid-epoch), random batches as before with --data.group_by_length false, and train.py runs that
report the useful-token share and resume bit for bit with grouped batches."""

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

import train
from bench.lengths import ALPACA_EXAMPLES, alpaca_like_lengths, random_batches, useful_fraction
from data.collate import Collator, Example
from data.synthetic import make_alpaca, synthetic_corpus, train_tokenizer
from training import TrainingError
from training.batching import IndexedCollate, epoch_steps, grouped_steps, step_batches
from training.config import OptimArgs
from training.dist import Dist
from training.optim import plan_steps

CPU = torch.device("cpu")


def dist(rank: int, world: int) -> Dist:
    return Dist(rank=rank, world=world, local_rank=rank, device=CPU)


def ranks(world: int) -> list[Dist]:
    return [dist(rank, world) for rank in range(world)]


def lengths_of(n: int, seed: int = 0) -> list[int]:
    return alpaca_like_lengths(n, seed)


@pytest.mark.parametrize("n, world, per_step", [(100, 1, 8), (100, 2, 8), (101, 2, 4), (103, 4, 6), (3, 4, 2)])
@pytest.mark.parametrize("grouped", [True, False])
def test_every_example_once_per_epoch_and_the_same_steps_on_every_rank(n, world, per_step, grouped):
    """Every rank has the same number of steps and samples per step; all ranks together see every example once, plus
    the padding to a multiple of the world size: the first (fewer than world) examples repeated. The schedule
    matches StepPlan's count."""
    lengths = lengths_of(n) if grouped else None
    shares = [epoch_steps(n, d, seed=3, epoch=1, samples_per_step=per_step, lengths=lengths) for d in ranks(world)]
    sizes = [[len(step) for step in steps] for steps in shares]
    assert all(s == sizes[0] for s in sizes)  # same steps, same sizes on every rank
    assert all(size == per_step for size in sizes[0][:-1]) and 0 < sizes[0][-1] <= per_step  # only the last short
    plan = plan_steps(OptimArgs(batch_size=per_step, grad_accum=1), n, world)
    assert len(sizes[0]) == plan.steps_per_epoch and sum(sizes[0]) == plan.per_rank
    seen = Counter(i for steps in shares for step in steps for i in step)
    assert set(seen) == set(range(n))
    padding = plan.per_rank * world - n
    assert sum(seen.values()) == n + padding and padding < world
    assert all(count <= 1 + -(-padding // n) for count in seen.values())


def test_the_grouped_schedule_depends_on_the_global_batch_not_the_split_over_ranks():
    """One process with steps of 8 and two with steps of 4 take the same examples at each step (so DDP gives the
    single-process losses), and each rank's share spans the step's lengths (dealt round-robin)."""
    lengths = lengths_of(400)
    single = epoch_steps(400, dist(0, 1), 0, 0, 8, lengths)
    pair = [epoch_steps(400, d, 0, 0, 4, lengths) for d in ranks(2)]
    assert [sorted(step) for step in single] == [sorted(a + b) for a, b in zip(*pair, strict=True)]
    for step, a, b in zip(single, *pair, strict=True):
        assert a == step[0::2] and b == step[1::2]
        assert [lengths[i] for i in step] == sorted((lengths[i] for i in step), reverse=True)


def test_grouped_steps_are_shuffled_per_epoch_and_seed_longest_first_short_last():
    lengths = lengths_of(1003)
    steps = grouped_steps(lengths, world=1, seed=0, epoch=0, samples_per_step=8)
    assert max(lengths[i] for i in steps[0]) == max(lengths)  # an out-of-memory batch fails at the first step
    assert len(steps[-1]) == 1003 % 8 and all(len(s) == 8 for s in steps[:-1])
    again = grouped_steps(lengths, world=1, seed=0, epoch=0, samples_per_step=8)
    assert steps == again  # a pure function of (lengths, world, seed, epoch, samples per step)
    for other in (grouped_steps(lengths, 1, 0, 1, 8), grouped_steps(lengths, 1, 1, 0, 8)):
        assert other != steps and sorted(map(sorted, other)) != sorted(map(sorted, steps))
    # The steps are in random order, not sorted by length.
    widths = [max(lengths[i] for i in step) for step in steps[1:-1]]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_useful_token_share_on_alpaca_like_lengths():
    """The synthetic lengths reproduce the real Alpaca figures for random batches (62% at 4, 51% at 8, measured on
    the real file); grouped by length, >= 85% of the computed tokens are real at batch 8."""
    lengths = lengths_of(ALPACA_EXAMPLES)
    shares = {}
    for batch in (4, 8):
        grouped = epoch_steps(len(lengths), dist(0, 1), 0, 0, batch, lengths)
        shares[batch] = (
            useful_fraction(grouped, lengths, batch),
            useful_fraction(random_batches(len(lengths), batch, 0), lengths, batch),
        )
    assert shares[8][0] >= 0.85
    assert shares[4][1] == pytest.approx(0.62, abs=0.02) and shares[8][1] == pytest.approx(0.51, abs=0.02)
    # Micro-batches of 8 inside steps of 32 (gradient accumulation) are as well grouped.
    accumulated = epoch_steps(len(lengths), dist(0, 1), 0, 0, 32, lengths)
    assert useful_fraction(accumulated, lengths, 8) >= 0.85
    # A small training set (a few mega-batches) still groups well: 1,000 examples, two ranks.
    small = lengths[:1000]
    for d in ranks(2):
        assert useful_fraction(epoch_steps(1000, d, 0, 0, 8, small), small, 8) >= 0.85


class WordTokenizer:
    """One id per whitespace-separated word (enough for the collator's lengths)."""

    bos_id, eos_id, pad_id = 1, 2, None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [1] * bos + [3 + len(w) % 50 for w in text.split()] + [2] * eos


def word_examples(n: int) -> list[Example]:
    return [Example(prompt=" ".join(["word"] * (3 + (7 * i) % 23)), target="an answer" * (i % 3)) for i in range(n)]


def old_step_batches(indices, start, batch_size, grad_accum, collate):
    """The batching before grouping (commit 89ab7c1): chunks of batch_size from ``start``, grad_accum per step."""
    chunks = [indices[i : i + batch_size] for i in range(start, len(indices), batch_size)]
    micro = [collate(c) for c in chunks]
    return [micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)]


def indices_of(batches) -> list[list[list[int]]]:
    return [[indices for indices, _ in micro] for micro in batches]


@pytest.mark.parametrize("world", [1, 2])
def test_group_by_length_false_gives_the_old_random_batches(world):
    collate = IndexedCollate(word_examples(37), Collator(WordTokenizer(), max_len=64))
    for d in ranks(world):
        old_indices = list(DistributedSampler(range(37), num_replicas=world, rank=d.rank, shuffle=True, seed=5))
        steps = epoch_steps(37, d, seed=5, epoch=0, samples_per_step=3 * 2, lengths=None)
        for start in (0, 6, 12):
            new = list(step_batches(steps, start, 3, collate, num_workers=0))
            old = old_step_batches(old_indices, start, 3, 2, collate)
            assert indices_of(new) == indices_of(old)
            for a, b in zip(new, old, strict=True):
                assert all(torch.equal(x[1]["tokens"], y[1]["tokens"]) for x, y in zip(a, b, strict=True))


def test_resuming_mid_epoch_gives_the_remaining_batches_of_the_uninterrupted_epoch():
    examples = word_examples(61)
    collate = IndexedCollate(examples, Collator(WordTokenizer(), max_len=64))
    # The cached lengths are the collated rows' lengths.
    assert collate.lengths == [int(collate([i])[1]["lengths"][0]) for i in range(61)]
    for d in ranks(2):
        steps = epoch_steps(61, d, seed=0, epoch=2, samples_per_step=4, lengths=collate.lengths)
        whole = indices_of(step_batches(steps, 0, 2, collate, num_workers=0))
        for done in (1, 3, len(steps) - 1):
            assert indices_of(step_batches(steps, done * 4, 2, collate, num_workers=0)) == whole[done:]
        assert indices_of(step_batches(steps, 4, 2, collate, num_workers=1)) == whole[1:]  # a loader process
        # Half the micro-batch, twice the accumulation: the same examples in every step.
        halves = indices_of(step_batches(steps, 3 * 4, 1, collate, num_workers=0))
        assert [sum(micro, []) for micro in halves] == [sum(micro, []) for micro in whole[3:]]
        # Each micro-batch is padded only to its own longest row.
        _, batch = next(iter(step_batches(steps, 0, 2, collate, num_workers=0)))[0]
        assert batch["tokens"].shape[1] == int(batch["lengths"].max())
    with pytest.raises(TrainingError, match="not at a step boundary"):
        next(step_batches(steps, 3, 2, collate, num_workers=0))


# ---- train.py end to end --------------------------------------------------------------------------------------------
QUIET = ["--run.progress", "false", "--run.tensorboard", "false", "--run.log_every", "1", "--run.eval", "false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_alpaca(root / "alpaca.json", n=24)
    train_tokenizer(synthetic_corpus(seed=0, n=400), root / "tokenizer.model")
    return root


def run_args(data, out, *extra: str) -> list[str]:
    return [
        "--recipe", "alpaca", "--base", "tiny", "--tokenizer", str(data / "tokenizer.model"),
        "--data", str(data / "alpaca.json"), "--model.llama_adapter.n_layers", "2",
        "--model.llama_adapter.prompt_len", "3",
        "--optim.batch_size", "2", "--epochs", "2", "--optim.warmup_epochs", "1", "--run.device", "cpu",
        "--out", str(out), *QUIET, *extra,
    ]  # fmt: skip


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_with_grouped_batches_reports_useful_tokens_and_resumes_bit_identical(data, tmp_path, capsys):
    """2 epochs of 12 steps: a run stopped mid-epoch and resumed ends with the uninterrupted run's losses and adapter;
    every record has the window's useful-token share, the last of each epoch the epoch's, also printed."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert train.main(run_args(data, reference, "--data.group_by_length", "true")) == 0
    printed = capsys.readouterr().out
    assert train.main(run_args(data, resumed, "--data.group_by_length", "true", "--run.stop_after", "17")) == 0
    assert train.main(["--resume", str(resumed)]) == 0
    resumed_out = capsys.readouterr().out

    ref = records(reference)
    assert [r["step"] for r in ref] == list(range(1, 25))
    assert [(r["step"], r["loss"]) for r in records(resumed)] == [(r["step"], r["loss"]) for r in ref]
    a, b = load_file(reference / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert all(0 < r["useful_tokens"] <= 1 for r in ref)
    ends = [r for r in ref if "epoch_useful_tokens" in r]
    assert [r["step"] for r in ends] == [12, 24]
    for r in ends:
        assert f"done at step {r['step']}: {r['epoch_useful_tokens']:.1%} of the computed tokens were real" in printed
    assert "epoch 1/2 done at step 12" in printed and "(batches grouped by length)" in printed
    assert "epoch 2/2 done at step 24" in resumed_out and "steps 18-24 since the resume" in resumed_out

    # Random batches of the same examples pad more.
    random_run = tmp_path / "random"
    assert train.main(run_args(data, random_run, "--data.group_by_length", "false", "--epochs", "1")) == 0
    (end,) = [r for r in records(random_run) if "epoch_useful_tokens" in r]
    assert end["epoch_useful_tokens"] < ends[0]["epoch_useful_tokens"]
    assert "random batches; --data.group_by_length true pads less" in capsys.readouterr().out


def test_bench_train_lengths_runs_at_a_tiny_size(tmp_path, capsys):
    from bench.__main__ import main

    out = tmp_path / "lengths.json"
    args = ["train", "--lengths", "alpaca", "--shape", "tiny", "--device", "cpu", "--threads", "1", "--batch", "2"]
    assert main([*args, "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["lengths"] == "alpaca" and report["config"]["seq"] == 405
    ours, peft = report["ours"], report["peft"]
    assert ours["real_tokens"] == peft["real_tokens"]  # the same examples on both sides
    assert len(ours["step_s"]) == len(peft["step_s"]) == 2
    for r in (ours, peft):
        assert r["useful_fraction"] == pytest.approx(r["real_tokens"] / r["computed_tokens"])
        assert r["useful_tokens_per_s"] == pytest.approx(r["real_tokens"] / sum(r["step_s"]))
    assert report["speedup_useful_tokens_per_s"] == pytest.approx(
        ours["useful_tokens_per_s"] / peft["useful_tokens_per_s"]
    )
    assert report["first_loss_rel_diff"] < 1e-5  # the shared warmup batch: same weights, same loss
    lengths = report["lengths"]
    assert lengths["lengths_max"] == 405 and lengths["epoch_useful_grouped"] > 0.85 > lengths["epoch_useful_random"]
    assert "useful tokens/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--seq", "64"])
    assert "--seq does not apply with --lengths alpaca" in capsys.readouterr().err
