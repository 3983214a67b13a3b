"""bench/memory*.py: the arithmetic of the memory prediction, checked against the model's own counts, torchao's
storage and the tensors autograd really saves; and the command's output. (How close the prediction comes to a
measured peak is a benchmark: BENCHMARKS.md.)"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from bench.__main__ import main as bench_main
from bench.memory import GIB
from bench.memory_measure import measure_step
from bench.memory_predict import activation_bytes, logits_bytes, parameter_counts, predict, quantized_bytes
from bench.memory_setup import LLAMA_SHAPES, Setup, build_model
from bench.shapes import parameter_count
from model.llama import count_trainable
from model.methods import Method
from tests.test_method_contract import METHODS  # method_names() of model/methods: each describes its memory


def gib(setup: Setup, part: str) -> float:
    return predict(setup)["bytes"][part] / GIB


@pytest.mark.parametrize("shape", ["7b", "13b", "33b", "70b"])
def test_counts_come_from_the_meta_model(shape):
    model = build_model(Setup(shape=shape))
    counts = parameter_counts(model)
    assert all(p.is_meta for p in model.parameters())
    assert counts["trainable"] == count_trainable(model)
    assert counts["block_linears"] + counts["other_frozen"] == parameter_count(LLAMA_SHAPES[shape])


def test_known_sizes():
    # LLaMA-7B: 6,738,415,616 values, 12.55 GiB in bf16; Llama-2-70B: 68,976,648,192; the paper's 1.2M prompts and
    # gates on 7B (K=10 on 30 layers, one gate per head).
    assert gib(Setup(shape="7b"), "weights") == pytest.approx(12.55, abs=0.01)
    for shape, values in (("7b", 6_738_415_616), ("70b", 68_976_648_192)):
        counts = parameter_counts(build_model(Setup(shape=shape)))
        assert counts["block_linears"] + counts["other_frozen"] == values
    assert parameter_counts(build_model(Setup(shape="7b")))["trainable"] == 30 * (10 * 4096 + 32)


def test_quantized_weights_are_ordered_and_images_add_the_tower():
    weights = {q: gib(Setup(shape="7b", quantize=q), "weights") for q in ("none", "int8", "nf4")}
    assert weights["nf4"] < weights["int8"] < weights["none"]
    assert 3.3 < weights["nf4"] < 4.0  # ~4.13 bits per block value; embeddings and head stay bf16
    with_images = predict(Setup(shape="7b", images=True))
    assert with_images["counts"]["visual_tower"] > 300e6  # ViT-L/14
    assert with_images["bytes"]["weights"] > predict(Setup(shape="7b"))["bytes"]["weights"] + 0.5 * GIB


def test_a_quantized_base_saves_the_same_activations_so_it_lowers_the_total():
    # int8's and NF4's linears keep the quantized weight for the backward pass, no dequantized copy
    # (test_activation_formula_matches_what_autograd_saves checks the int8 and nf4 cases against autograd).
    parts = {q: predict(Setup(shape="7b", dtype="bfloat16", quantize=q))["bytes"] for q in ("none", "int8", "nf4")}
    assert parts["int8"]["activations"] == parts["nf4"]["activations"] == parts["none"]["activations"]
    assert parts["nf4"]["total"] < parts["int8"]["total"] < parts["none"]["total"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_bytes_match_torchao(dtype):
    from model.quantize import _to_int8, _to_nf4

    def stored(t: torch.Tensor) -> int:
        return sum(getattr(t, name).nbytes for name in t.__tensor_flatten__()[0])

    e = torch.empty((), dtype=dtype).element_size()
    for shape in [(512, 1024), (176, 64)]:
        weight = torch.randn(shape, dtype=dtype)
        assert stored(_to_nf4("w", weight)) == quantized_bytes("nf4", shape, e)
        assert stored(_to_int8(weight)) == quantized_bytes("int8", shape, e)


def test_fsdp_shards_weights_and_optimizer_state():
    one, eight = predict(Setup(shape="70b")), predict(Setup(shape="70b", gpus=8, strategy="fsdp"))
    whole, per_device = one["bytes"]["weights"], eight["bytes"]["weights"]
    unsharded = eight["detail_bytes"]["fsdp_unsharded"]
    assert per_device == whole // 8 + unsharded
    assert 0 < unsharded < 0.05 * whole  # root (embeddings, head) and two blocks
    assert eight["bytes"]["trainable_optimizer"] == one["bytes"]["trainable_optimizer"] // 8
    assert eight["bytes"]["activations"] == one["bytes"]["activations"]  # batch is per device
    ddp = predict(Setup(shape="7b", gpus=2))
    assert ddp["bytes"]["weights"] == predict(Setup(shape="7b"))["bytes"]["weights"]
    assert ddp["bytes"]["trainable_optimizer"] == ddp["counts"]["trainable"] * 20  # + gradient buckets


def test_checkpointing_and_loss_chunks_lower_their_parts():
    base = Setup(shape="7b", batch=8, seq=1024, loss_chunk=0)
    plain, ac = predict(base), predict(dataclasses.replace(base, activation_checkpointing=True))
    assert ac["bytes"]["activations"] < 0.25 * plain["bytes"]["activations"]
    chunked = predict(dataclasses.replace(base, loss_chunk=1024))
    assert chunked["bytes"]["logits"] < 0.2 * plain["bytes"]["logits"]
    assert plain["bytes"]["logits"] == 8 * 1023 * 32000 * 12  # 12 bytes per target per vocabulary entry
    assert logits_bytes(dataclasses.replace(base, loss_chunk=10**6)) == plain["bytes"]["logits"]  # one piece
    # Activations grow linearly in the batch (no T^2 term: the fused attention keeps a log-sum-exp per query).
    double = predict(dataclasses.replace(base, batch=16))["bytes"]["activations"]
    assert double == pytest.approx(2 * plain["bytes"]["activations"], rel=1e-3)


def saved_bytes(model: nn.Module, tokens: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages autograd saves in a forward pass, parameters (quantized ones and their inner
    tensors, which int8's linear saves, too) excluded."""
    plain = [p for p in model.parameters() if type(p.data) is torch.Tensor]
    inner = [
        getattr(p, n) for p in model.parameters() if type(p.data) is not torch.Tensor for n in p.__tensor_flatten__()[0]
    ]
    params = {t.untyped_storage().data_ptr() for t in plain + inner}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if hasattr(t, "__tensor_flatten__"):  # a quantized frozen weight itself (NF4's linear saves it)
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(tokens)
    return sum(seen.values())


@pytest.mark.parametrize(
    "method, quantize",
    [*((m, "none") for m in METHODS), ("llama_adapter", "nf4"), ("llama_adapter", "int8"), ("lora", "int8")],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_formula_matches_what_autograd_saves(method, quantize, dtype):
    setup = Setup(shape="tiny", method=method, dtype=dtype, quantize=quantize, batch=2, seq=64, loss_chunk=0)
    model = build_model(setup, "cpu").train()
    tokens = torch.randint(0, 512, (setup.batch, setup.seq), generator=torch.Generator().manual_seed(0))
    real = saved_bytes(model, tokens, getattr(torch, dtype))
    acts = activation_bytes(model, setup)
    # The logits path (no labels) keeps the final norm for all T positions; the formula counts T - 1 targets.
    formula = acts["blocks"] + acts["rope_and_final_norm"] + setup.batch * (4 * 64 + 4)
    assert formula == pytest.approx(real, rel=0.04), (formula, real)


def test_command_prints_every_column_and_writes_json(tmp_path, capsys):
    out = tmp_path / "memory.json"
    argv = ["memory", "--shape", "13b", "--quantize", "nf4", "--batch", "2", "--seq", "256", "--json", str(out)]
    assert bench_main(argv) == 0
    text = capsys.readouterr().out
    for label in ("weights (frozen base)", "trainable + grads + AdamW", "activations (saved)", "logits / loss"):
        assert label in text
    report = json.loads(out.read_text())
    total = report["bytes"]["total"]
    assert total == sum(v for k, v in report["bytes"].items() if k != "total")
    assert f"{total / GIB:.2f}" in text.splitlines()[-1]
    assert report["setup"]["quantize"] == "nf4" and report["setup"]["shape"] == "13b"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shape", "65b"], "--shape"),
        (["--quantize", "int4"], "--quantize"),
        (["--batch", "0"], "--batch"),
        (["--method", "nope"], "unknown PEFT method"),
        (["--strategy", "zero3"], "--strategy"),
        (["--shape", "tiny", "--seq", "4096"], "--seq"),
    ],
)
def test_bad_flags_name_themselves(flags, message, capsys):
    assert bench_main(["memory", *flags]) == 2
    assert message in capsys.readouterr().err


def test_measure_step_runs_a_training_step():
    setup = Setup(shape="tiny", dtype="float32", batch=2, seq=32)
    result = measure_step(setup, torch.device("cpu"))
    # Between steps: the weights and the trainable values with AdamW's two moments (gradients are set to None).
    predicted = predict(setup)
    held = predicted["bytes"]["weights"] + predicted["counts"]["trainable"] * 12
    assert result["held_between_steps_bytes"] == pytest.approx(held, rel=0.01)
    assert result["peak_bytes"] >= result["held_between_steps_bytes"]
    assert torch.isfinite(torch.tensor(result["loss"]))


def test_a_method_that_does_not_describe_its_memory_is_refused():
    setup = Setup(shape="tiny", batch=2, seq=32)
    model = build_model(setup)
    model.method = Method(None, model.config.llama)  # the base class: no memory_terms of its own
    with pytest.raises(NotImplementedError, match="does not describe its training memory"):
        activation_bytes(model, setup)
