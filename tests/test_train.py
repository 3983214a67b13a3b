"""train.py end to end on generated data (tiny random base, CPU): each task, the run directory, gradient
accumulation, and the clear stops on a non-finite loss and out of memory."""

import json
import math
import signal
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import train
import training.run
from data.synthetic import make_alpaca, make_coco, make_scienceqa, synthetic_corpus, train_tokenizer
from eval.scienceqa import main as eval_scienceqa
from model import load_run
from model.methods import Method, MethodConfig, register_method
from training.cli import parse_args
from training.config import config_to_dict
from training.trainer import Trainer

QUIET = ["--run.progress", "false", "--run.tensorboard", "false", "--run.log_every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small real-format datasets and a 512-piece tokenizer (the tiny preset's vocabulary)."""
    root = tmp_path_factory.mktemp("data")
    make_scienceqa(root / "scienceqa", n_train=32, n_val=4, n_test=8)
    make_coco(root / "coco", n_train=6, n_restval=2, n_val=2, n_test=2, captions_per_image=2)
    make_alpaca(root / "alpaca.json", n=24)
    train_tokenizer(synthetic_corpus(seed=0, n=400), root / "tokenizer.model")
    return root


def base_args(data, task: str, out) -> list[str]:
    path = {"scienceqa": data / "scienceqa", "coco": data / "coco", "alpaca": data / "alpaca.json"}[task]
    return [
        "--recipe", task, "--base", "tiny", "--tokenizer", str(data / "tokenizer.model"), "--data", str(path),
        "--clip", "tiny", "--model.llama_adapter.n_layers", "2", "--model.llama_adapter.prompt_len", "3",
        "--optim.batch_size", "4", "--epochs", "5", "--run.device", "cpu", "--out", str(out), *QUIET,
    ]  # fmt: skip


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["scienceqa", "coco", "alpaca"])
def test_each_task_trains_and_writes_a_complete_run_directory(data, tmp_path, task, capsys):
    out = tmp_path / "run"
    argv = [*base_args(data, task, out), "--optim.max_steps", "3", "--run.eval_limit", "4",
            "--run.eval_max_new_tokens", "4"]  # fmt: skip
    assert train.main(argv) == 0

    cfg = parse_args(argv).config
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(config_to_dict(cfg)))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["max_memory_mib"] > 0 for r in records)
    # warmup over 2 of 5 epochs, kept as a share of the 3-step schedule: round(3 * 2 / 5) = 1 step
    peak = 9e-3 * 4 / 256
    assert records[0]["lr"] == pytest.approx(peak)
    assert records[2]["lr"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 1 / 2)))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sidecar = json.loads((out / "adapter.json").read_text())
    assert sidecar["base"] == "tiny" and sidecar["tokenizer"] == str((data / "tokenizer.model").resolve())
    assert sidecar["prompt_format"] == {"scienceqa": "llama_adapter", "coco": "coco_caption", "alpaca": "alpaca"}[task]
    assert sidecar["extra"] == {"recipe": task, "task": task, "step": 3, "seed": 0}
    has_images = task != "alpaca"
    assert (sidecar["model_config"]["visual"] is not None) == has_images

    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["step"], state["world_size"]) == (3, 1)
    tensors = load_file(out / "adapter.safetensors")
    assert tensors.keys() == state["adapter"].keys()
    assert all(torch.equal(tensors[k], state["adapter"][k]) for k in tensors)
    expected = {f"layers.{i}.attention.adapter_{kind}" for i in (2, 3) for kind in ("prompt", "gate")}
    visual = {k for k in tensors if k.startswith("visual.adapter_proj.")}
    assert tensors.keys() - visual == expected and bool(visual) == has_images
    assert all(tensors[f"layers.{i}.attention.adapter_gate"].abs().sum() > 0 for i in (2, 3))  # it trained

    model = load_run(out)  # the run directory is what model.load_run reads
    assert all(torch.equal(p, tensors[n]) for n, p in model.trainable_parameters())
    scored = {
        "scienceqa": "\nrun (test) (n=4)  ",  # the category table's row: the run directory, the split, the count
        "coco": "coco is scored outside train.py: BLEU, METEOR, ROUGE-L and CIDEr of greedy captions on the Karpathy "
        "test split: python -m eval.coco --checkpoint RUN_DIR",
        "alpaca": "alpaca is scored outside train.py: no automatic score (open-ended instructions): try the adapter "
        "with python -m app --checkpoint RUN_DIR",
    }[task]
    printed = capsys.readouterr().out
    assert scored in printed
    assert f"next:\n  try it in the demo:   .venv/bin/python -m app --checkpoint {out}\n" in printed
    if task == "scienceqa":
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["split"] == "test" and metrics["counts"]["Avg"]["total"] == 4
        assert len(json.loads((out / "predictions.json").read_text())["results"]) == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sixteen_bit_base_trains_fp32_adapter_tensors(data, tmp_path, dtype, monkeypatch):
    """The GPU recipe's precision on CPU: frozen base and CLIP tower in 16 bits under autocast, the trainable
    tensors and their optimizer in fp32, loss scaling with float16 only."""
    seen = {}
    real_build = training.run.build_model

    def build_and_record(cfg, device, torch_dtype):
        model = real_build(cfg, device, torch_dtype)
        seen["base"] = model.layers[0].attention.wq.weight.dtype
        seen["clip"] = next(model.visual.clip.parameters()).dtype
        seen["trainable"] = {p.dtype for _, p in model.trainable_parameters()}
        return model

    monkeypatch.setattr(training.run, "build_model", build_and_record)
    out = tmp_path / "run"
    argv = [*base_args(data, "scienceqa", out), "--model.dtype", dtype, "--optim.max_steps", "4", "--run.eval", "false"]
    assert train.main(argv) == 0
    half = getattr(torch, dtype)
    assert seen == {"base": half, "clip": half, "trainable": {torch.float32}}
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out))
    tensors = load_file(out / "adapter.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert all(tensors[f"layers.{i}.attention.adapter_gate"].abs().sum() > 0 for i in (2, 3))  # it trained
    state = torch.load(out / "state.pt", weights_only=True)
    assert bool(state["scaler"]) == (dtype == "float16")  # GradScaler state only when it scales
    assert {v.dtype for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"} == {
        torch.float32
    }
    model = load_run(out, dtype=half)
    assert model.layers[0].attention.wq.weight.dtype == half
    assert all(torch.equal(p, tensors[n]) for n, p in model.trainable_parameters())


def test_tensorboard_events_are_written(data, tmp_path):
    out = tmp_path / "run"
    argv = [*base_args(data, "alpaca", out), "--optim.max_steps", "2", "--run.tensorboard", "true"]
    assert train.main(argv) == 0
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1


def test_gradient_accumulation_gives_the_same_run(data, tmp_path):
    """The loss of a step is the token mean over the whole step, so 4 x 1 and 2 x 2 make the same updates."""
    one = [*base_args(data, "scienceqa", tmp_path / "a"), "--optim.max_steps", "4", "--run.eval", "false"]
    two = [*base_args(data, "scienceqa", tmp_path / "b"), "--optim.max_steps", "4", "--run.eval", "false",
           "--optim.batch_size", "2", "--optim.grad_accum", "2"]  # fmt: skip
    assert train.main(one) == 0 and train.main(two) == 0
    losses = [[r["loss"] for r in read_metrics(tmp_path / d)] for d in "ab"]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    a, b = load_file(tmp_path / "a" / "adapter.safetensors"), load_file(tmp_path / "b" / "adapter.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_a_non_finite_loss_stops_with_the_step_and_examples(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*base_args(data, "scienceqa", out), "--optim.max_steps", "6", "--optim.lr", "1e30"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert (
        "error: the loss is nan at optimizer step 2 (epoch 1), micro-batch 1 of 1; examples (index in the train " in err
    )
    assert "The learning rate was 1e+30: lower it (--optim.blr / --optim.lr)" in err
    assert "Traceback" not in err
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert not (out / "state.pt").exists()  # nothing poisoned was saved


def test_out_of_memory_saves_the_last_step_and_says_what_to_try(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = [*base_args(data, "scienceqa", out), "--optim.max_steps", "4", "--run.eval", "false"]
    forward = Trainer._forward_loss
    calls = []

    def forward_that_runs_out(self, batch, denom):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, batch, denom)

    monkeypatch.setattr(Trainer, "_forward_loss", forward_that_runs_out)
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: out of memory on cpu at optimizer step 3, micro-batch of shape (4, " in err
    assert "Next thing to try: --optim.batch_size 2 --optim.grad_accum 2 (the same effective batch" in err
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2

    # Resuming with the advice finishes the run, and it is the run that never ran out of memory.
    monkeypatch.setattr(Trainer, "_forward_loss", forward)
    assert train.main(["--resume", str(out), "--optim.batch_size", "2", "--optim.grad_accum", "2", *QUIET]) == 0
    assert train.main([*base_args(data, "scienceqa", tmp_path / "ref"), "--optim.max_steps", "4",
                       "--run.eval", "false"]) == 0  # fmt: skip
    resumed, ref = load_file(out / "adapter.safetensors"), load_file(tmp_path / "ref" / "adapter.safetensors")
    for name in ref:
        torch.testing.assert_close(resumed[name], ref[name], rtol=1e-4, atol=1e-5)


def test_a_fresh_run_refuses_to_overwrite_another(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*base_args(data, "alpaca", out), "--optim.max_steps", "1"]
    assert train.main(argv) == 0
    assert train.main(argv) == 1
    assert f"error: {out} already holds a run; continue it with --resume {out} or pick --out" in capsys.readouterr().err


def test_training_evaluates_like_the_eval_command_line(data, tmp_path):
    """The evaluation after training is eval.scienceqa's: the same predictions and metrics as the command line on
    the saved run."""
    out = tmp_path / "run"
    argv = [*base_args(data, "scienceqa", out), "--optim.max_steps", "2", "--run.eval_max_new_tokens", "4"]
    assert train.main(argv) == 0
    again = tmp_path / "eval"
    assert eval_scienceqa([
        "--checkpoint", str(out), "--data", str(data / "scienceqa"), "--split", "test", "--output", str(again),
        "--device", "cpu", "--batch-size", "32", "--max-new-tokens", "4",
    ]) == 0  # fmt: skip
    for name in ("metrics.json", "predictions.json"):
        assert json.loads((out / name).read_text()) == json.loads((again / name).read_text()), name
    assert json.loads((out / "metrics.json").read_text())["counts"]["Avg"]["total"] == 8


def test_a_run_inside_a_process_leaves_its_signal_handlers_alone(data, tmp_path, monkeypatch):
    """Only train.py run as a program handles SIGINT / SIGTERM (tests/test_train_resume.py sends them); train.main
    called from Python, as here, keeps the caller's handlers for the whole run."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen = []
    step = Trainer.step

    def step_and_look(self, micro, pos, stop):
        seen.append({sig: signal.getsignal(sig) for sig in before})
        return step(self, micro, pos, stop)

    monkeypatch.setattr(Trainer, "step", step_and_look)
    argv = [*base_args(data, "alpaca", tmp_path / "run"), "--optim.max_steps", "2"]
    assert train.main(argv) == 0
    assert seen == [before, before]
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ---- the method plug-in point, through train.py --------------------------------------------------------------------
@dataclass
class OutputBiasConfig(MethodConfig):
    """A toy PEFT method: a learned bias on the final hidden state, zero at start (hook: after_sublayer)."""


@register_method("toy_final_bias")
class OutputBias(Method):
    config_class = OutputBiasConfig

    def attach(self, model):
        self.adapter_bias = nn.Parameter(torch.empty(self.llama.dim))  # (dim,)

    def reset_parameters(self, model, generator):
        with torch.no_grad():
            self.adapter_bias.zero_()

    def after_sublayer(self, block, sublayer, x, out, ctx):
        last = block.attention.layer_idx == self.llama.n_layers - 1
        return out + self.adapter_bias.to(out.dtype) if last and sublayer == "feed_forward" else out


def test_a_method_registered_outside_the_model_trains_through_train_py(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*base_args(data, "scienceqa", out), "--model.method", "toy_final_bias", "--no-images",
            "--optim.max_steps", "4", "--run.eval_limit", "2", "--run.eval_max_new_tokens", "2"]  # fmt: skip
    assert train.main(argv) == 0
    assert "| 64 trainable values (bias 64) |" in capsys.readouterr().out
    tensors = load_file(out / "adapter.safetensors")
    assert list(tensors) == ["method.adapter_bias"] and tensors["method.adapter_bias"].abs().sum() > 0  # it trained
    sidecar = json.loads((out / "adapter.json").read_text())
    assert sidecar["model_config"]["method"] == "toy_final_bias"
    model = load_run(out)
    assert isinstance(model.method, OutputBias) and torch.equal(
        model.method.adapter_bias, tensors["method.adapter_bias"]
    )
    assert read_metrics(out)[-1]["step"] == 4

    other = [*base_args(data, "scienceqa", tmp_path / "other"), "--model.method", "toy_missing", "--no-images"]
    assert train.main(other) == 1  # a method nobody registered: one error naming the flag and the known ones
    assert "error: --model.method: unknown PEFT method 'toy_missing'; registered: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "flags", "recorded"),
    [
        ("houlsby", ["--model.houlsby.placement", "parallel", "--model.houlsby.sublayers", "[feed_forward]",
                     "--model.houlsby.train_norms", "true"],
         {"placement": "parallel", "sublayers": ["feed_forward"], "train_norms": True}),
        ("adamix", ["--model.adamix.n_experts", "3", "--model.adamix.freeze_unrouted", "true"],
         {"shared": "up", "consistency_weight": 100.0, "freeze_unrouted": True}),
        ("ptuning_v2", ["--model.ptuning_v2.prefix_len", "3"], {"prefix_len": 3, "reparameterize": False}),
    ],
)  # fmt: skip
def test_the_bottleneck_options_adamix_and_ptuning_v2_train_through_train_py(data, tmp_path, method, flags, recorded):
    out = tmp_path / "run"
    argv = [*base_args(data, "scienceqa", out), "--model.method", method, *flags, "--optim.max_steps", "3",
            "--run.eval", "false"]  # fmt: skip
    assert train.main(argv) == 0
    settings = json.loads((out / "adapter.json").read_text())["model_config"]["method_config"]
    assert {k: settings[k] for k in recorded} == recorded
    assert load_run(out).config.method == getattr(parse_args(argv).config.model, method)  # as set, reloaded
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out)) and read_metrics(out)[-1]["step"] == 3
