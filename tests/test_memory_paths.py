"""The two memory options of training (model/loss.py and ``Transformer.activation_checkpointing``) change nothing
but memory: on the shipped tiny base in fp32, every PEFT method's loss and gradients with blocks recomputed and
with the loss in chunks equal the plain path's (logits of the whole batch, then one cross-entropy), and train.py
runs with both options, alone or under DDP, give the same losses as without."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from data.collate import IGNORE_INDEX as COLLATE_IGNORE_INDEX
from data.synthetic import make_scienceqa, synthetic_corpus, train_tokenizer
from model import load_model
from model.llama import Transformer, TransformerBlock
from model.loss import IGNORE_INDEX, next_token_loss
from model.methods import method_class
from tests.test_method_contract import METHODS, TINY_BASE, TINY_SETTINGS, images, perturb

pytestmark = pytest.mark.usefixtures("one_thread")

B, T = 3, 14
TOL = dict(rtol=1e-6, atol=1e-6)


def make_training_model(name: str) -> Transformer:
    """The tiny base with a moved ``name`` adapter in training mode (LoRA and DoRA with dropout, so the recomputed
    blocks must draw the same masks; AdaMix on the route of a fixed step, one pass: its two-pass consistency loss is
    checked under recompute in tests/test_method_adamix_release.py), with the image path where the method takes one."""
    extra = {"lora": {"dropout": 0.2}, "dora": {"dropout": 0.2}, "adamix": {"consistency_weight": 0.0}}.get(name, {})
    settings = {**TINY_SETTINGS[name], **extra}
    config = method_class(name).config_class(**settings)
    visual = "tiny" if method_class(name).takes_visual else None
    model = load_model(TINY_BASE, adapter_config=config, clip=visual)
    perturb(model)
    model.method.begin_step(5, 3)
    return model.train()


def batch(model: Transformer) -> dict[str, torch.Tensor | None]:
    """Random tokens; labels with a prompt (no target) of a different length per row and right padding on one row:
    27 targets, a count that 5 and 7 do not divide. Two of the three rows have an image."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.config.llama.vocab_size, (B, T), generator=g)  # (B, T)
    labels = tokens.clone()
    for row, (prompt, pad) in enumerate([(3, 0), (6, 0), (2, 4)]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, T - pad :] = IGNORE_INDEX
    assert int((labels[:, 1:] != IGNORE_INDEX).sum()) == 27
    if model.visual is None:
        return {"tokens": tokens, "labels": labels, "images": None, "image_mask": None}
    return {"tokens": tokens, "labels": labels, "images": images(B), "image_mask": torch.tensor([True, False, True])}


def plain_loss(model: Transformer, b: dict) -> torch.Tensor:
    """The loss as the trainer computed it before model/loss.py: the whole batch's logits, one cross-entropy."""
    logits = model(b["tokens"], b["images"], image_mask=b["image_mask"])  # (B, T, V)
    targets = b["labels"][:, 1:].flatten()
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def loss_and_grads(model: Transformer, b: dict, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token-mean loss and the gradients the trainer takes of it (the summed loss over the 27 targets)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks on every path
    loss = run() / 27
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.trainable_parameters() if p.grad is not None}
    return loss.detach(), grads


class Calls:
    """Counts the forward calls of every block (and those whose output takes a gradient) and the rows of every
    output projection of a model."""

    def __init__(self, model: Transformer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.blocks, self.graded, self.head_rows = 0, 0, []
        real_block = TransformerBlock.forward

        def block(block_self, x, ctx):
            self.blocks += 1  # counted on entry: a recomputation stops early, once it has what the backward needs
            out = real_block(block_self, x, ctx)
            self.graded += out.requires_grad
            return out

        monkeypatch.setattr(TransformerBlock, "forward", block)
        model.output.register_forward_hook(lambda _m, args, _out: self.head_rows.append(args[0].shape[:-1].numel()))


@pytest.mark.parametrize("name", METHODS)
def test_recomputed_blocks_and_chunked_loss_give_the_plain_loss_and_gradients(name, monkeypatch):
    model = make_training_model(name)
    b = batch(model)
    ref_loss, ref_grads = loss_and_grads(model, b, lambda: plain_loss(model, b))
    assert ref_grads.keys() == {n for n, _ in model.trainable_parameters()}  # every trainable tensor is compared
    assert all(g.abs().sum() > 0 for g in ref_grads.values())  # and each one takes part
    calls = Calls(model, monkeypatch)
    n_layers, on_grad_path = model.config.llama.n_layers, None
    for checkpointing, chunk in [(False, 0), (False, 5), (False, 7), (True, 0), (True, 7), (True, 100)]:
        model.activation_checkpointing = checkpointing
        calls.blocks, calls.graded, calls.head_rows = 0, 0, []
        loss, grads = loss_and_grads(model, b, lambda: model(**b, loss_chunk=chunk))  # noqa: B023
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref_loss, **TOL)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
        # The mechanism is engaged: the blocks on the gradient's path (from the lowest one with a trainable tensor
        # or input) run again in the backward pass, and the head sees one chunk at a time (again in the backward
        # pass, last chunk first) and only the 27 positions with a target.
        on_grad_path = on_grad_path or calls.graded
        assert calls.blocks == n_layers + (on_grad_path if checkpointing else 0) and on_grad_path > 0
        pieces = [27] if chunk in (0, 100) else [chunk] * (27 // chunk) + [27 % chunk]
        assert calls.head_rows == (pieces if chunk in (0, 100) else pieces + pieces[::-1])  # backward: last first


def test_the_options_leave_inference_as_it_was(monkeypatch):
    """Without gradients nothing is recomputed and the logits are unchanged; the loss without gradients is chunked
    all the same; labels need a whole sequence."""
    model = make_training_model("llama_adapter").eval()
    b = batch(model)
    with torch.no_grad():
        logits = model(b["tokens"], b["images"], image_mask=b["image_mask"])
        model.activation_checkpointing = True
        calls = Calls(model, monkeypatch)
        assert torch.equal(model(b["tokens"], b["images"], image_mask=b["image_mask"]), logits)
        assert calls.blocks == model.config.llama.n_layers
        reference = plain_loss(model, b)
        calls.head_rows = []
        torch.testing.assert_close(model(**b, loss_chunk=5), reference, **TOL)
        assert calls.head_rows == [5, 5, 5, 5, 5, 2]
        with pytest.raises(ValueError, match="labels"):
            model(b["tokens"], labels=b["labels"], cache=model.new_cache(B))
        with pytest.raises(ValueError, match="do not match"):
            model(b["tokens"], labels=b["labels"][:, :-1])
    assert IGNORE_INDEX == COLLATE_IGNORE_INDEX


def test_a_batch_without_targets_has_zero_loss_and_zero_gradients():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    labels = torch.full((2, 5), IGNORE_INDEX)
    for chunk in (0, 3):
        loss = next_token_loss(hidden, labels, head, chunk)
        loss.backward()
        assert loss.item() == 0 and hidden.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="loss_chunk"):
        next_token_loss(hidden, labels, head, -1)


# ---- train.py ---------------------------------------------------------------------------------------------------
REPO = Path(train.__file__).resolve().parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_scienceqa(root / "scienceqa", n_train=12, n_val=2, n_test=2)
    train_tokenizer(synthetic_corpus(seed=0, n=400), root / "tokenizer.model")
    return root


def train_args(data, out, batch_size: int, *options: str) -> list[str]:
    """3 steps of AdaMix (a route per step, drawn by the trainer) with the image path."""
    return [
        "--recipe", "scienceqa", "--base", "tiny", "--tokenizer", str(data / "tokenizer.model"),
        "--data", str(data / "scienceqa"), "--clip", "tiny", "--method", "adamix", "--model.adamix.n_experts", "3",
        "--model.adamix.bottleneck", "8", "--optim.batch_size", str(batch_size),
        "--optim.max_steps", "3", "--run.device", "cpu", "--out", str(out), "--run.progress", "false",
        "--run.tensorboard", "false", "--run.log_every", "1", "--run.eval", "false", *options,
    ]  # fmt: skip


def losses(run_dir: Path) -> torch.Tensor:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    return torch.tensor([r["loss"] for r in records], dtype=torch.float64)


MEMORY_OPTIONS = ("--train.activation_checkpointing", "true", "--train.loss_chunk", "7")


@pytest.fixture(scope="module")
def plain_run(data, tmp_path_factory) -> Path:
    """The run without either option (the loss in one piece), batch 4."""
    out = tmp_path_factory.mktemp("plain") / "run"
    assert train.main(train_args(data, out, 4, "--train.loss_chunk", "0")) == 0
    return out


def test_train_py_with_both_options_gives_the_same_losses(data, plain_run, tmp_path):
    out = tmp_path / "run"
    assert train.main(train_args(data, out, 4, *MEMORY_OPTIONS)) == 0
    torch.testing.assert_close(losses(out), losses(plain_run), rtol=1e-6, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["train"] == {"activation_checkpointing": True, "loss_chunk": 7, "compile": False}


def test_two_ddp_processes_with_both_options_match_one_plain_process(data, plain_run, tmp_path):
    """DDP over the trainable tensors with recomputed blocks (each gradient reduced once) and AdaMix's per-step
    routes: two processes of batch 2 give the losses of one plain process of batch 4."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, str(REPO / "train.py"), *train_args(data, out, 2, *MEMORY_OPTIONS)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2" in done.stdout
    torch.testing.assert_close(losses(out), losses(plain_run), rtol=1e-5, atol=0)
