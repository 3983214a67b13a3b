"""``Transformer.compile_blocks`` (--train.compile): each block of a training step through torch.compile changes
nothing but speed. On the shipped tiny base in fp32, the compiled blocks give the eager loss and gradients for the
PEFT methods, with activation checkpointing too (the checkpoint recomputes the compiled block); new batch shapes
reuse the graphs; AdaMix's blocks stay eager and follow every route; inference stays eager; train.py trains and
saves an adapter with it, with the eager run's losses; fsdp refuses it by name; ``bench train --compile`` trains
ours with it.

Compiling costs seconds per block on a CPU (from the inductor cache after the first run): one model per method,
shared by the tests of this module.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import model.llama as llama
import train
from bench.__main__ import main as bench_main
from data.synthetic import make_scienceqa, synthetic_corpus, train_tokenizer
from model import load_model
from model.llama import Transformer
from model.loss import IGNORE_INDEX
from model.methods import method_class
from tests.test_memory_paths import batch
from tests.test_method_contract import TINY_BASE, TINY_SETTINGS, perturb
from training import TrainingError
from training.dist import Dist, shard_frozen_base

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-5, atol=1e-5)
COMPILED = ("llama_adapter", "lora", "prefix")
"""Methods whose blocks compile: adaption prompts (a separate softmax), wrapped linears, joined keys."""


def training_model(name: str, **settings) -> Transformer:
    """The tiny base with a moved ``name`` adapter in training mode, the image path where the method takes one."""
    config = method_class(name).config_class(**{**TINY_SETTINGS[name], **settings})
    visual = "tiny" if method_class(name).takes_visual else None
    model = load_model(TINY_BASE, adapter_config=config, clip=visual)
    perturb(model)
    return model.train()


def loss_and_grads(model: Transformer, b: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token-mean loss and its gradients, as the trainer takes them."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks on every path
    loss = model(**b) / (b["labels"][:, 1:] != IGNORE_INDEX).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}


def assert_same(got: tuple, expected: tuple) -> None:
    torch.testing.assert_close(got[0], expected[0], **TOL)
    assert got[1].keys() == expected[1].keys()
    for name, grad in got[1].items():
        torch.testing.assert_close(grad, expected[1][name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


class CompiledCalls:
    """Counts the blocks run through the compiled function (a checkpointed block: again in the backward pass)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = llama.compiled_block

        def counted(layer, x, ctx):
            self.n += 1
            return real(layer, x, ctx)

        monkeypatch.setattr(llama, "compiled_block", counted)


def graphs() -> int:
    """Graphs torch.compile has made in this process."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_blocks_give_the_eager_loss_and_gradients(name, monkeypatch):
    model = training_model(name)
    b = batch(model)
    eager = loss_and_grads(model, b)
    assert all(g.abs().sum() > 0 for g in eager[1].values())  # every trainable tensor takes part
    model.compile_blocks = True
    calls, n_layers = CompiledCalls(monkeypatch), model.config.llama.n_layers
    assert_same(loss_and_grads(model, b), eager)
    assert calls.n == n_layers  # every block ran compiled
    model.activation_checkpointing, calls.n = True, 0
    assert_same(loss_and_grads(model, b), eager)
    assert calls.n > n_layers  # the checkpoint ran compiled blocks again in the backward pass
    # Other batch and sequence lengths (dynamic shapes) reuse the graphs: no compile after the first step.
    compiled = graphs()
    short = {key: None if t is None else t[:2, :9] if t.dim() == 2 else t[:2] for key, t in b.items()}
    model.compile_blocks = model.activation_checkpointing = False
    eager_short = loss_and_grads(model, short)
    model.compile_blocks = True
    assert_same(loss_and_grads(model, short), eager_short)
    assert graphs() == compiled


def test_compiled_dropout_is_recomputed_with_the_same_masks():
    """LoRA's dropout inside a compiled block draws from torch's generator, whose state the checkpoint restores for
    the recomputation: the checkpointed step's loss and gradients are those of the plain compiled step."""
    model = training_model("lora", dropout=0.3)
    model.compile_blocks = True
    b = batch(model)
    plain = loss_and_grads(model, b)
    model.activation_checkpointing = True
    assert_same(loss_and_grads(model, b), plain)
    model.zero_grad(set_to_none=True)  # the masks really were drawn: another seed gives another loss
    torch.manual_seed(8)
    assert not torch.allclose(model(**b).detach(), plain[0])


def test_adamix_blocks_stay_eager_and_take_each_steps_route(monkeypatch):
    """AdaMix draws a route per step (begin_step); a graph would specialise on it, so its blocks run eager."""
    model = training_model("adamix")
    b = batch(model)
    calls, before, losses = CompiledCalls(monkeypatch), graphs(), []
    for step in range(3):
        model.method.begin_step(step, 0)
        model.compile_blocks = False
        eager = loss_and_grads(model, b)
        model.compile_blocks = True
        compiled = loss_and_grads(model, b)
        assert torch.equal(compiled[0], eager[0])
        assert all(torch.equal(g, eager[1][n]) for n, g in compiled[1].items())
        losses.append(compiled[0])
    assert len(set(torch.stack(losses).tolist())) == 3  # three routes, three losses
    assert calls.n == 0 and graphs() == before


def test_inference_stays_eager(monkeypatch):
    """Forwards without gradients and cached decoding run the eager blocks: the same logits, nothing compiled."""
    model = training_model("llama_adapter").eval()
    b = batch(model)
    tokens, images = b["tokens"], b["images"]

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            cache = model.new_cache(tokens.shape[0])
            prefill = model(tokens[:, :-1], images, image_mask=b["image_mask"], cache=cache)
            step = model(tokens[:, -1:], cache=cache)
            return [model(tokens, images, image_mask=b["image_mask"]), prefill, step]

    eager = outputs()
    model.compile_blocks = True
    calls, before = CompiledCalls(monkeypatch), graphs()
    assert all(torch.equal(a, e) for a, e in zip(outputs(), eager, strict=True))
    assert calls.n == 0 and graphs() == before


# ---- train.py ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_scienceqa(root / "scienceqa", n_train=8, n_val=2, n_test=2)
    train_tokenizer(synthetic_corpus(seed=0, n=400), root / "tokenizer.model")
    return root


def train_args(data: Path, out: Path, *options: str) -> list[str]:
    """3 steps of the adaption prompt (the unit tests' settings) with the image path."""
    return [
        "--recipe", "scienceqa", "--base", "tiny", "--tokenizer", str(data / "tokenizer.model"),
        "--data", str(data / "scienceqa"), "--clip", "tiny", "--method", "llama_adapter",
        "--model.llama_adapter.prompt_len", "4", "--model.llama_adapter.n_layers", "2", "--optim.batch_size", "2",
        "--optim.max_steps", "3", "--run.device", "cpu", "--out", str(out), "--run.progress", "false",
        "--run.tensorboard", "false", "--run.log_every", "1", "--run.eval", "false", *options,
    ]  # fmt: skip


def losses(run_dir: Path) -> torch.Tensor:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    return torch.tensor([r["loss"] for r in records], dtype=torch.float64)


def test_train_py_with_compiled_blocks_trains_and_saves_the_eager_runs_adapter(data, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.main(train_args(data, eager)) == 0
    assert train.main(train_args(data, compiled, "--train.compile", "true")) == 0
    assert json.loads((compiled / "config.json").read_text())["train"]["compile"] is True
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=1e-5, atol=0)
    assert losses(compiled)[-1] != losses(compiled)[0]  # it trained
    saved = load_model("tiny", compiled, clip="tiny").adapter_state_dict()
    reference = load_model("tiny", eager, clip="tiny").adapter_state_dict()
    assert saved.keys() == reference.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_refuses_compiled_blocks_by_name(tmp_path):
    """FSDP's hooks inside a block would break the block's graph: the sharded run stops before it starts."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = training_model("llama_adapter")
        model.compile_blocks = True
        group = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
        with pytest.raises(TrainingError, match=r"--train\.compile does not work with --dist\.strategy fsdp"):
            shard_frozen_base(model, group)
    finally:
        dist.destroy_process_group()


# ---- bench ------------------------------------------------------------------------------------------------------
def test_bench_train_compile_trains_ours_with_compiled_blocks(tmp_path, capsys):
    """``python -m bench train --compile``: ours steps through the compiled blocks, from PEFT's first loss."""
    out = tmp_path / "train.json"
    tiny = ["--shape", "tiny", "--device", "cpu", "--threads", "1", "--batch", "2", "--seq", "16"]
    assert bench_main(["train", *tiny, "--steps", "2", "--warmup", "1", "--compile", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["compile"] is True
    assert report["first_loss_rel_diff"] < 1e-5 and report["ours"]["tokens_per_s"] > 0
    assert "ours compiled" in capsys.readouterr().out
