"""--dist.strategy fsdp: the frozen base sharded by torch FSDP2 (training.dist.shard_frozen_base).

In-process, on a one-process gloo group (sharding there still turns every frozen weight into a DTensor and gathers
it around each use): every registered PEFT method gives the unsharded model's loss and gradients, and what cannot
shard is refused with one clear error. Under torchrun, two CPU processes give the loss curve and the adapter of one
process with the same global batch, and a stopped run resumes into the same curve and evaluates.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import train
from data.synthetic import make_scienceqa, synthetic_corpus, train_tokenizer
from model import load_model
from model.methods import method_class, method_names
from training import TrainingError
from training.dist import Dist, average_gradients, is_sharded, shard_frozen_base, sharding_error

REPO = Path(train.__file__).resolve().parent
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this test process alone, for one test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    dist.destroy_process_group()


def tiny_model(method: str, **kwargs) -> torch.nn.Module:
    """The tiny base with ``method`` on its top 2 layers (3 soft tokens / prompts where it has them), CLIP where the
    method takes the visual vector."""
    config = method_class(method).config_class()
    sizes = {"n_layers": 2, "prompt_len": 3, "prefix_len": 3, "n_tokens": 3}
    config = dataclasses.replace(config, **{k: v for k, v in sizes.items() if hasattr(config, k)})
    clip = "tiny" if method_class(method).takes_visual else None
    return load_model("tiny", adapter_config=config, clip=clip, seed=0, **kwargs).train()


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.llama.vocab_size, (3, 10), generator=gen)  # (B, T)
    kwargs = {}
    if model.visual is not None:  # one row without an image: the masked path too
        kwargs = {"images": torch.randn(3, 3, 32, 32, generator=gen), "image_mask": torch.tensor([True, False, True])}
    model.method.begin_step(0, 0)
    loss = model(tokens, **kwargs).float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.trainable_parameters()}


@pytest.mark.parametrize("method", method_names())
def test_every_method_shards_to_the_unsharded_loss_and_gradients(one_process_group, method):
    whole_loss, whole_grads = loss_and_grads(tiny_model(method))
    model = tiny_model(method)
    net = shard_frozen_base(model, one_process_group)
    assert is_sharded(net)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(isinstance(p, DTensor) for p in frozen)  # the whole base is FSDP's
    assert not any(isinstance(p, DTensor) for _, p in model.trainable_parameters())  # replicated, whole
    loss, grads = loss_and_grads(net)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    assert grads.keys() == whole_grads.keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    average_gradients([p for _, p in model.trainable_parameters()], one_process_group)  # one process: unchanged
    for name, p in model.trainable_parameters():
        assert torch.equal(p.grad, grads[name])


def test_a_training_loss_of_two_passes_shards_to_the_unsharded_loss_and_gradients(one_process_group):
    """AdaMix's consistency loss runs the blocks twice inside one call (Method.training_loss): FSDP gathers each
    block's weights for both passes and both backward passes."""
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))  # (B, T)

    def run(net, model):
        model.method.begin_step(1, 0)
        loss = net(tokens, labels=tokens)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.trainable_parameters()}

    whole = tiny_model("adamix")
    whole_loss, whole_grads = run(whole, whole)
    model = tiny_model("adamix")
    loss, grads = run(shard_frozen_base(model, one_process_group), model)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["llama_adapter", "lora"])
def test_the_chunked_loss_and_activation_checkpointing_recompute_through_the_sharded_base(one_process_group, method):
    """The chunked loss recomputes the final norm and output projection in the backward pass, outside the root's
    forward, and checkpointed blocks recompute theirs: the sharded model still gives the whole model's loss and
    gradients."""
    gen = torch.Generator().manual_seed(2)
    results = []
    for shard in (False, True):
        model = tiny_model(method)
        model.activation_checkpointing = True
        net = shard_frozen_base(model, one_process_group) if shard else model
        tokens = torch.randint(0, model.config.llama.vocab_size, (3, 10), generator=gen.manual_seed(2))
        labels = tokens.clone()
        labels[:, :3] = -100  # the prompt: no targets
        model.method.begin_step(0, 0)
        loss = net(tokens, labels=labels, loss_chunk=4)  # 18 targets in 5 chunks
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.trainable_parameters()}))
    (whole_loss, whole_grads), (loss, grads) = results
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_method_reading_a_frozen_weight_outside_its_unit_is_refused_by_name(one_process_group, monkeypatch):
    """The backbone's blocks and their wk / wv are the sharding units; a method that reads another block weight
    at the top of the forward meets a sharded DTensor. The run stops with one error naming the method."""
    model = tiny_model("llama_adapter")
    shard_frozen_base(model, one_process_group)
    original = model.method.sequence_state

    def reads_w1(model_, visual):
        torch.ones(1, model_.config.llama.dim) @ model_.layers[0].feed_forward.w1.weight.T  # outside the block
        return original(model_, visual)

    monkeypatch.setattr(model.method, "sequence_state", reads_w1)
    with pytest.raises(RuntimeError, match="DTensor") as caught:
        model(torch.zeros(1, 4, dtype=torch.long))
    error = sharding_error(caught.value, "llama_adapter")
    assert isinstance(error, TrainingError)
    assert "--dist.strategy fsdp: the PEFT method 'llama_adapter' reads a frozen base weight" in str(error)
    assert str(error).endswith("train it with --dist.strategy ddp")
    assert sharding_error(RuntimeError("something else"), "llama_adapter") is None


def test_a_quantized_base_is_refused_by_name(one_process_group):
    model = tiny_model("lora", quantize="int8")
    with pytest.raises(TrainingError, match=r"--dist.strategy fsdp cannot shard a quantized base \(layers\.0\."):
        shard_frozen_base(model, one_process_group)


# ---- torchrun: two CPU processes --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_scienceqa(root / "scienceqa", n_train=16, n_val=4, n_test=4)
    train_tokenizer(synthetic_corpus(seed=0, n=400), root / "tokenizer.model")
    return root


def args(data, out, batch_size: int, grad_accum: int = 1) -> list[str]:
    """scienceqa with images (the CLIP path), 2 epochs of 4 steps, gradient clipping on."""
    return [
        "--recipe", "scienceqa", "--base", "tiny", "--tokenizer", str(data / "tokenizer.model"),
        "--data", str(data / "scienceqa"), "--clip", "tiny", "--model.llama_adapter.n_layers", "2",
        "--model.llama_adapter.prompt_len", "3", "--optim.batch_size", str(batch_size), "--optim.grad_accum",
        str(grad_accum), "--epochs", "2", "--optim.warmup_epochs", "1", "--optim.grad_clip", "0.05",
        "--run.device", "cpu", "--out", str(out), "--run.progress", "false", "--run.tensorboard", "false",
        "--run.log_every", "1", "--run.eval", "false", "--dist.strategy", "fsdp",
    ]  # fmt: skip


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*LAUNCH, str(REPO / "train.py"), *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run_dir: Path) -> torch.Tensor:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return torch.tensor([r["loss"] for r in records])


@dataclasses.dataclass
class ShardedRun:
    out: Path
    stopped: subprocess.CompletedProcess
    steps_at_stop: int
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def sharded(data, tmp_path_factory):
    """One run on two processes, fsdp, 1 example x 2 accumulated micro-batches each (global batch 4): stopped after
    step 3 (run.stop_after), then resumed to its end (8 steps) and evaluated."""
    out = tmp_path_factory.mktemp("runs") / "sharded"
    eval_args = ["--run.eval", "true", "--run.eval_limit", "2", "--run.eval_max_new_tokens", "2"]
    stopped = torchrun([*args(data, out, batch_size=1, grad_accum=2), "--run.stop_after", "3", *eval_args])
    steps_at_stop = len(losses(out))
    return ShardedRun(out, stopped, steps_at_stop, torchrun(["--resume", str(out)]))


def test_two_sharded_processes_match_one_process_with_the_same_global_batch(data, sharded, tmp_path, capsys):
    """The sharded run, stopped and resumed on the way, gives the curve and adapter of one uninterrupted process."""
    single = tmp_path / "single"
    assert train.main(args(data, single, batch_size=4)) == 0
    assert "--dist.strategy fsdp on one process: nothing to shard" in capsys.readouterr().out

    assert len(losses(single)) == 8
    torch.testing.assert_close(losses(sharded.out), losses(single), rtol=1e-5, atol=0)
    a, b = load_file(single / "adapter.safetensors"), load_file(sharded.out / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("visual.adapter_proj") for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    model = load_model("tiny", sharded.out, seed=0)  # the adapter file of the sharded run loads as any other
    loaded = dict(model.trainable_parameters())
    for name in a:
        torch.testing.assert_close(loaded[name], b[name], rtol=0, atol=0)
    state = torch.load(sharded.out / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 8


def test_a_stopped_sharded_run_resumes_and_evaluates(sharded, capsys):
    assert "on cpu x 2 (fsdp)" in sharded.stopped.stdout  # the run header
    assert "run.stop_after reached at step 3/8" in sharded.stopped.stdout and sharded.steps_at_stop == 3
    assert f"resuming {sharded.out} at step 3/8" in sharded.resumed.stdout
    assert "trained 8 steps" in sharded.resumed.stdout
    # The evaluation after training ran on rank 0, with the base rebuilt whole and the trained tensors copied in.
    metrics = json.loads((sharded.out / "metrics.json").read_text())
    assert metrics["counts"]["Avg"]["total"] == 2, metrics
    # Each process's data order depends on the number of processes: another number is refused by name.
    assert train.main(["--resume", str(sharded.out)]) == 1
    assert "the run used 2 process(es), this one 1; resume with the same number" in capsys.readouterr().err


def worker_pids(launcher_pid: int) -> list[int]:
    """The processes torchrun started: the children of its launcher process."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == launcher_pid:
                pids.append(int(entry.name))
    return pids


def test_kill_9_of_one_sharded_rank_then_resume_continues_the_same_run(data, tmp_path):
    """SIGKILL of one process of a running fsdp job (torchrun then stops the other): ``--resume`` continues from the
    last saved state into the curve and adapter of one uninterrupted process."""
    long = ["--epochs", "10", "--run.save_every", "2"]  # 40 steps: the kill lands mid-run
    out = tmp_path / "killed"
    launcher = subprocess.Popen(
        [*LAUNCH, str(REPO / "train.py"), *args(data, out, batch_size=1, grad_accum=2), *long],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (out / "state.pt").exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = worker_pids(launcher.pid)
    assert launcher.poll() is None and len(workers) == 2, "the job ended before the kill"
    os.kill(workers[-1], signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    saved = torch.load(out / "state.pt", weights_only=True)["step"]
    assert 2 <= saved < 40

    torchrun(["--resume", str(out)])
    single = tmp_path / "single"
    assert train.main([*args(data, single, batch_size=4), *long]) == 0
    torch.testing.assert_close(losses(out), losses(single), rtol=1e-5, atol=0)
    a, b = load_file(single / "adapter.safetensors"), load_file(out / "adapter.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
