"""bench/: both subcommands run end to end on the tiny shape; the counts and checks they report are right.

No timing assertions: speed depends on the machine. What is asserted: the JSON carries every field, both sides
computed the same thing (equal first loss, identical greedy tokens), and the formulas give hand-computed numbers.
"""

import json

import pytest
import torch

from bench.__main__ import main
from bench.config import BenchConfig
from bench.measure import (
    current_memory_bytes,
    decode_bytes_per_step,
    peak_memory_bytes,
    reset_peak_memory,
    train_step_flops,
)
from bench.methods import GATE_RANGE
from bench.run import compare_tokens
from bench.shapes import SHAPES, get_shape, parameter_count
from bench.sides import merge_rounds, write_shared_weights
from model import load_model
from model.config import LlamaConfig

TINY = ["--shape", "tiny", "--device", "cpu", "--threads", "1"]


def test_train_tiny_reports_both_sides(tmp_path, capsys):
    out = tmp_path / "train.json"
    args = ["train", *TINY, "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["bench"] == "train" and report["device"]["type"] == "cpu"
    assert report["config"]["shape"] == "tiny" and report["config"]["batches"] == [2]
    assert report["config"]["adapter_layers"] == 3 and report["config"]["adapter_len"] == 10
    assert {"date", "git_commit", "git_dirty", "loadavg_1m_at_start", "loadavg_1m_at_end"} <= report.keys()
    for side in ("ours", "peft"):
        r = report[side]
        assert r["side"] == side and r["threads"] == 1 and len(r["step_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["median_step_s"])
        assert r["best_tokens_per_s"] == pytest.approx(2 * 16 / min(r["step_s"])) and r["rounds"] == 1
        assert r["peak_memory_bytes"] > 0 and "clear_refs" in r["memory_method"]
        assert r["mfu"] is None  # no known peak FLOP/s for a CPU
    # tiny: 3 adapted layers x (10 x 64 prompt + one gate per head (4)) on ours; PEFT: one scalar gate per layer
    assert report["ours"]["trainable_values"] == 3 * (10 * 64 + 4)
    assert report["peft"]["trainable_values"] == 3 * (10 * 64 + 1)
    # same weights, same inputs, no update yet: the same loss (fp32, two implementations)
    assert report["first_loss_rel_diff"] < 1e-5
    ratio = report["ours"]["tokens_per_s"] / report["peft"]["tokens_per_s"]
    assert report["speedup_tokens_per_s"] == pytest.approx(ratio)
    assert report["flops_per_step"] == train_step_flops(get_shape("tiny").llama, 3, 10, 2, 16)
    assert "ours/PEFT" in capsys.readouterr().out


def test_generate_tiny_greedy_outputs_agree(tmp_path, capsys):
    out = tmp_path / "generate.json"
    args = ["generate", *TINY, "--batch", "1,3", "--seq", "12", "--new-tokens", "6", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["bench"] == "generate" and report["greedy_agree"] is True
    assert [row["batch"] for row in report["batches"]] == [1, 3]
    for row in report["batches"]:
        assert row["greedy_agree"] and row["matching_tokens"] == 1.0 and row["first_mismatch"] is None
        for side in ("ours", "peft"):
            r = row[side]
            assert r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
            assert r["decode_tokens_per_s"] == pytest.approx(row["batch"] * 5 / r["decode_s"])
            assert r["bandwidth_use"] is None  # CPU: no known peak bandwidth
            assert "token_ids" not in r
        assert row["decode_bytes_per_step"] == decode_bytes_per_step(
            get_shape("tiny").llama, 3, 10, row["batch"], 12 + 6 / 2, torch.float32
        )
    printed = capsys.readouterr()
    assert "greedy outputs agree" in printed.out
    progress = [line for line in printed.err.splitlines() if line.startswith("bench: ")]  # never silent for minutes
    assert progress[0].startswith("bench: writing the shared tiny weights and PEFT adapter to ")
    assert progress[1:] == [
        "bench: round 1/1: generate, ours side ...",
        progress[2],
        "bench: round 1/1: generate, peft side ...",
        progress[4],
    ] and progress[2].startswith("bench: round 1/1: ours side done in ")


def test_generate_lora_greedy_outputs_agree_and_the_report_names_the_method(tmp_path):
    out, workdir = tmp_path / "generate.json", tmp_path / "weights"
    args = ["generate", *TINY, "--method", "lora", "--batch", "2", "--seq", "12", "--new-tokens", "6"]
    assert main([*args, "--workdir", str(workdir), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["greedy_agree"] is True and report["batches"][0]["matching_tokens"] == 1.0
    config, tiny = report["config"], get_shape("tiny").llama
    assert config["method"] == "lora"
    # frozen-base accounting: no adaption prompts, every block counted
    assert (config["adapter_layers"], config["adapter_len"]) == (tiny.n_layers, 0)
    assert config["accounting"]["note"].startswith("frozen base, backward through every block")
    assert report["batches"][0]["decode_bytes_per_step"] == decode_bytes_per_step(
        tiny, tiny.n_layers, 0, 2, 12 + 6 / 2, torch.float32
    )
    # the agreement means something: PEFT's zero-init B was drawn away from zero, so LoRA changes the logits
    adapted, plain = load_model(workdir / "base", workdir / "adapter"), load_model(workdir / "base")
    assert adapted.method.name == "lora"
    tokens = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapted(tokens) - plain(tokens)).abs().max() > 1e-3


def test_shared_adapter_is_non_zero_and_changes_our_outputs(tmp_path):
    """The agreement check means something only if the adapter loaded on both sides changes the logits."""
    cfg = BenchConfig("generate", "tiny", "cpu", "float32", [1], seq=8, new_tokens=2, steps=1, warmup=1, threads=1)
    rng_state = torch.random.get_rng_state()
    base_dir, adapter_dir = write_shared_weights(get_shape("tiny"), cfg, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is left alone
    adapted, plain = load_model(base_dir, adapter_dir), load_model(base_dir)
    assert adapted.config.method.gate_fn == "raw"
    gates = [attention.adapter_gate for attention in adapted.method.adapted(adapted)]
    assert len(gates) == 3
    for gate in gates:  # PEFT's one scalar per layer, copied to every head
        assert GATE_RANGE[0] <= gate[0].item() <= GATE_RANGE[1] and torch.equal(gate, gate[:1].expand(4))
    tokens = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapted(tokens) - plain(tokens)).abs().max() > 1e-3


def test_compare_tokens_counts_and_locates_the_first_difference():
    assert compare_tokens([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == {
        "greedy_agree": True,
        "matching_tokens": 1.0,
        "first_mismatch": None,
    }
    # earliest step first, then lowest row
    result = compare_tokens([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 9, 6]])
    assert result == {"greedy_agree": False, "matching_tokens": 4 / 6, "first_mismatch": (1, 1)}


def test_rounds_pool_their_timed_steps():
    train = BenchConfig("train", "tiny", "cpu", "float32", [2], seq=10, new_tokens=1, steps=2, warmup=1, threads=1)
    rounds = [
        {"side": "ours", "load_s": 2.0, "step_s": [1.0, 4.0], "peak_memory_bytes": 5, "first_loss": 3.0},
        {"side": "ours", "load_s": 1.0, "step_s": [2.0, 0.5], "peak_memory_bytes": 7, "first_loss": 3.0},
    ]
    merged = merge_rounds(train, rounds)
    assert merged["step_s"] == [1.0, 4.0, 2.0, 0.5] and merged["median_step_s"] == 1.5
    assert merged["tokens_per_s"] == 20 / 1.5 and merged["best_tokens_per_s"] == 40.0
    assert (merged["rounds"], merged["load_s"], merged["peak_memory_bytes"]) == (2, 1.0, 7)

    gen = BenchConfig("generate", "tiny", "cpu", "float32", [3], seq=10, new_tokens=5, steps=1, warmup=1, threads=1)

    def entry(ttft: float, decode: float, ids: list[list[int]]) -> dict:
        run = {"ttft_s": ttft, "decode_s": decode, "total_s": ttft + decode}
        return {
            "side": "peft",
            "load_s": 1.0,
            "batches": [{"batch": 3, "runs": [run], "peak_memory_bytes": 1, "token_ids": ids}],
        }

    ids = [[1, 2, 3, 4, 5]] * 3
    merged = merge_rounds(gen, [entry(0.2, 2.0, ids), entry(0.1, 1.0, ids), entry(0.3, 3.0, ids)])
    (row,) = merged["batches"]
    assert (row["ttft_s"], row["best_ttft_s"], row["decode_s"]) == (0.2, 0.1, 2.0)
    assert row["decode_tokens_per_s"] == 3 * 4 / 2.0 and row["best_decode_tokens_per_s"] == 3 * 4 / 1.0
    with pytest.raises(RuntimeError, match="differ between rounds at batch 3"):
        merge_rounds(gen, [entry(0.2, 2.0, ids), entry(0.2, 2.0, [[1, 2, 3, 4, 6]] * 3)])


def test_flop_and_byte_counts_by_hand():
    llama = LlamaConfig(dim=8, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=10, ffn_dim=12)
    # per token per block: 2 * (8 * (2*8 + 2*4) + 3*8*12) = 2 * (192 + 288) = 960
    batch, seq, layers_adapted, k = 2, 5, 2, 3
    attn = batch * 2 * seq * seq * 8  # 800
    adapter_attn = batch * 4 * seq * k * 8  # 960
    prompt_kv = 4 * k * 8 * 4  # 384
    head = 2 * batch * seq * 8 * 10  # 1600
    forward = 3 * (batch * seq * 960 + attn) + layers_adapted * (adapter_attn + prompt_kv) + head
    backward = layers_adapted * (batch * seq * 960 + 2 * (attn + adapter_attn) + prompt_kv) + head
    assert train_step_flops(llama, layers_adapted, k, batch, seq) == forward + backward == 64_096
    # weights without the embedding table: 3 blocks x (8*(16+8) + 3*8*12 + 16) + final norm 8 + head 80
    weights = 3 * (192 + 288 + 16) + 8 + 80
    assert parameter_count(llama) == weights + 80
    kv_cache = batch * 3 * 2 * 4 * 6.5
    adapter_kv = layers_adapted * 2 * k * 4
    assert decode_bytes_per_step(llama, layers_adapted, k, batch, 6.5, torch.bfloat16) == 2 * (
        weights + kv_cache + adapter_kv
    )


def test_shapes_match_their_names():
    assert parameter_count(SHAPES["100m"].llama) == 101_924_480
    assert parameter_count(SHAPES["7b"].llama) == 6_738_415_616  # LLaMA-7B
    assert (SHAPES["7b"].adapter_layers, SHAPES["7b"].adapter_len) == (30, 10)


def test_cpu_peak_memory_window_resets():
    device, mib = torch.device("cpu"), 2**20
    assert "clear_refs" in reset_peak_memory(device)
    before = current_memory_bytes(device)
    block = torch.ones(64 * mib // 4)  # 64 MiB, written
    del block
    assert peak_memory_bytes(device) - before >= 48 * mib  # the window remembers the freed block (some pages of
    # it may have been resident already, freed earlier by this process)
    reset_peak_memory(device)
    assert peak_memory_bytes(device) - before < 16 * mib  # a new window starts from what is resident now


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", *TINY, "--batch", "1,2"], "train takes one --batch"),
        (["train", *TINY, "--batch", "two"], "--batch must be integers"),
        (["generate", *TINY, "--seq", "500", "--new-tokens", "20"], "exceed max_seq_len=512 of shape tiny"),
        (["train", *TINY, "--warmup", "0"], "--warmup must be >= 1"),
        (["train", *TINY, "--dtype", "int8"], "--dtype int8: choose one of"),
        (["train", "--device", "cuda:0"], "CUDA is not available"),
    ],
)
def test_bad_options_are_one_clear_error(args, message, capsys):
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
