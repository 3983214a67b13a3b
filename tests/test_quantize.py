"""model/quantize.py: the frozen base's block linears as NF4 / int8 (torchao) on the shipped tiny base
(assets/tiny-base, a trained 4-layer LLaMA). Logits stay within a measured bound of the unquantized base; every
method trains on an nf4 base (gradients reach its tensors, never the base); merges into a quantized base are refused;
train.py runs with --model.quantize nf4 and its adapter loads.

Bounds, measured on this base (2-core CPU VM, 2026-12-02) over three prompts: relative error of the logits
(||quantized - base|| / ||base||, all positions) 0.059-0.133 per prompt for nf4, 0.004-0.011 for int8; asserted on
the three together at 0.2 (nf4) and 0.02 (int8). Cosine of the trainable tensors' gradient on an nf4 base to the one
on the unquantized base: 0.963-0.995 over the methods; asserted at 0.9.

int8: the weights are ``FrozenInt8Tensor`` (torchao's ``Int8Tensor`` whose ``F.linear`` is an autograd function): its
logits and the trainable tensors' gradients equal those through torchao's own ``Int8Tensor`` linear (the same int8
data), and its backward graph holds the int8 data, never a float copy of a block weight (torchao's does).
"""

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
import training.run
from data.synthetic import make_scienceqa, synthetic_corpus, train_tokenizer
from model import load_model, load_run
from model.llama import Transformer, is_trainable
from model.methods import method_class
from model.quantize import base_linears, quantize_base, quantized_kind, stored_bytes
from tests.test_method_contract import METHODS, TINY_SETTINGS

TINY_BASE = Path(__file__).resolve().parents[1] / "assets" / "tiny-base"
PROMPTS = ["Question: What color is the ball?\nAnswer: red", "Tell me a story about a cat and a dog.", "Which is big?"]
LOGITS_BOUND = {"nf4": 0.2, "int8": 0.02}
"""Relative error of the logits to the unquantized base's (measured 0.059-0.133 nf4, 0.004-0.011 int8)."""
MERGE_REFUSED = {"lora": "LoRA", "dora": "DoRA", "ia3": r"\(IA\)\^3", "llama_adapter_v2": "LLaMA-Adapter V2 scales"}
"""Methods whose merge folds into the base linears, and how their refusal names them."""

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens_of(model: Transformer, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(text, bos=True)])  # (1, T)


def make(name: str, quantize: str | None) -> Transformer:
    """The tiny base with a ``name`` adapter moved off its init (so every tensor gets a gradient), the tiny CLIP
    path (every method here takes the image), in training mode."""
    cls = method_class(name)
    model = load_model(
        TINY_BASE, adapter_config=cls.config_class(**TINY_SETTINGS[name]), clip="tiny", quantize=quantize
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.train()


def loss_of(model: Transformer) -> torch.Tensor:
    """Next-token loss of two copies of one prompt with images; per-step randomness fixed (AdaMix, dropout)."""
    torch.manual_seed(0)
    model.method.begin_step(0, 0)
    tokens = tokens_of(model, PROMPTS[0]).expand(2, -1)  # (2, T)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    logits = model(tokens, images, image_mask=torch.tensor([True, True]))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_logits_stay_within_the_measured_bound(kind):
    base, quantized = load_model(TINY_BASE), load_model(TINY_BASE, quantize=kind)
    linears = dict(base_linears(quantized))
    assert len(linears) == 4 * 7 and all(quantized_kind(lin.weight) == kind for lin in linears.values())
    # Embeddings, norms and the output projection stay plain tensors, under unchanged names.
    kept = [p for n, p in quantized.named_parameters() if n.removesuffix(".weight") not in linears]
    assert kept and all(quantized_kind(p) is None and type(p) is torch.nn.Parameter for p in kept)
    assert quantized.state_dict().keys() == base.state_dict().keys()
    # What the weights hold (a property of the format, not a memory measurement): 4.2 / 8.5 bits per fp32 value here.
    held = sum(stored_bytes(lin.weight) for lin in linears.values())
    assert held <= {"nf4": 0.14, "int8": 0.27}[kind] * sum(stored_bytes(lin.weight) for _, lin in base_linears(base))
    with torch.no_grad():
        a = torch.cat([base(tokens_of(base, t)).flatten() for t in PROMPTS])
        b = torch.cat([quantized(tokens_of(base, t)).flatten() for t in PROMPTS])
    error = ((b - a).norm() / a.norm()).item()
    assert 1e-4 < error <= LOGITS_BOUND[kind], error  # quantized for real, and close


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_on_an_nf4_base_and_the_base_gets_no_gradient(name):
    model, reference = make(name, "nf4"), make(name, None)
    frozen = {n: lin.weight.to(torch.float32) for n, lin in base_linears(model)}  # dequantized copies
    loss_of(model).backward()
    loss_of(reference).backward()

    grads = {n: p.grad for n, p in model.trainable_parameters()}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.any() for g in grads.values()), name
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if not is_trainable(n))
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_reference = torch.cat([p.grad.flatten() for _, p in reference.trainable_parameters()])
    assert F.cosine_similarity(flat, flat_reference, 0).item() >= 0.9  # measured 0.963-0.995

    before = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2).step()
    assert all(not torch.equal(p, before[n]) for n, p in model.trainable_parameters())
    assert all(p.dtype == torch.float32 for _, p in model.trainable_parameters())
    for n, lin in base_linears(model):
        assert quantized_kind(lin.weight) == "nf4" and torch.equal(lin.weight.to(torch.float32), frozen[n])


def with_torchaos_int8_linear(model: Transformer) -> Transformer:
    """``model`` (an int8 base) with each block weight as torchao's plain ``Int8Tensor`` over the same int8 data and
    scales: the linear quantize_base used before (``quantize_(.., Int8WeightOnlyConfig())``), whose F.linear runs
    above autograd."""
    from torchao.quantization import Int8Tensor

    for _, lin in base_linears(model):
        w = lin.weight
        plain = Int8Tensor(w.qdata, w.scale, w.block_size, w.dtype, zero_point=w.zero_point)
        lin.weight = torch.nn.Parameter(plain, requires_grad=False)
    return model


@pytest.mark.parametrize("name", ["llama_adapter", "lora", "llama_adapter_v2"])  # the backbone, both wrappers
def test_int8_base_gives_torchaos_logits_and_gradients(name):
    from torchao.quantization import Int8Tensor

    model, torchao_path = make(name, "int8"), with_torchaos_int8_linear(make(name, "int8"))
    weights = [lin.weight for _, lin in base_linears(model)]
    assert all(type(w).__name__ == "FrozenInt8Tensor" and isinstance(w, Int8Tensor) for w in weights)
    assert all(type(lin.weight) is Int8Tensor for _, lin in base_linears(torchao_path))
    with torch.no_grad():
        tokens = tokens_of(model, PROMPTS[1])
        assert torch.equal(model(tokens), torchao_path(tokens))
    loss_of(model).backward()
    loss_of(torchao_path).backward()
    reference = dict(torchao_path.trainable_parameters())
    for n, p in model.trainable_parameters():
        torch.testing.assert_close(p.grad, reference[n].grad, rtol=1e-6, atol=1e-6, msg=n)
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if not is_trainable(n))
    # The state dict keeps Meta's names and round-trips through torch.save / torch.load(weights_only=True).
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert loaded.keys() == model.state_dict().keys()
    for n, lin in base_linears(model):
        assert type(loaded[f"{n}.weight"]) is type(lin.weight)
        assert torch.equal(loaded[f"{n}.weight"].qdata, lin.weight.qdata)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_backward_keeps_the_int8_data_not_a_float_copy_of_the_weights(dtype):
    """What autograd saves in the forward pass (LoRA: every layer is in the graph), on this int8 base and through
    torchao's own Int8Tensor linear, which saves the weight cast to the matmul's dtype (the memory finding)."""

    def saved_by(model: Transformer) -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss_of(model)
        return saved

    model = make("lora", "int8")
    shapes = {tuple(lin.weight.shape) for _, lin in base_linears(model)}
    shapes |= {s[::-1] for s in shapes}  # a transposed copy counts too

    def weight_copies(saved: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t for t in saved if t.is_floating_point() and tuple(t.shape) in shapes]

    saved = saved_by(model)
    assert weight_copies(saved) == []
    assert not any(hasattr(t, "__tensor_flatten__") for t in saved)  # nor a quantized weight (a float to autograd)
    # Instead the int8 data of each block linear in the graph (all but layer 0's that see no trainable tensor).
    int8 = [t.data_ptr() for t in saved if t.dtype == torch.int8]  # one per matmul
    assert set(int8) <= {lin.weight.qdata.data_ptr() for _, lin in base_linears(model)}
    copies = weight_copies(saved_by(with_torchaos_int8_linear(make("lora", "int8"))))
    assert len(copies) == len(int8) > 20 and {t.dtype for t in copies} == {dtype}  # what torchao's linear saves


@pytest.mark.parametrize("name", METHODS)
def test_merge_into_a_quantized_base_is_refused_where_it_would_change_the_weights(name):
    model = make(name, "nf4").eval()
    tokens = tokens_of(model, PROMPTS[1])
    with torch.no_grad():
        before = model(tokens)
    state = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    if name in MERGE_REFUSED:
        message = f"cannot merge {MERGE_REFUSED[name]} into an nf4-quantized base; load the base unquantized to merge"
        with pytest.raises(ValueError, match=message):
            model.method.merge(model)
        assert all(torch.equal(p, state[n]) for n, p in model.trainable_parameters())  # nothing changed
    else:  # folds into its own tensors only: works as on an unquantized base
        model.method.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, atol=1e-4, rtol=1e-4)


def test_lora_merge_refuses_an_int8_base_and_quantize_names_bad_values():
    model = make("lora", "int8")
    with pytest.raises(ValueError, match="cannot merge LoRA into an int8-quantized base"):
        model.method.merge(model)
    with pytest.raises(ValueError, match="already int8-quantized"):
        quantize_base(model, "nf4")
    with pytest.raises(ValueError, match=r"quantize='int4' is not supported; choose one of nf4, int8"):
        load_model(TINY_BASE, quantize="int4")
    with pytest.raises(ValueError, match=r"quantize='int4' is not supported; choose one of nf4, int8"):
        quantize_base(load_model(TINY_BASE), "int4")  # type: ignore[arg-type]


def test_train_py_trains_on_an_nf4_base_and_its_adapter_loads(tmp_path, monkeypatch):
    built: list[Transformer] = []
    build_model = training.run.build_model
    monkeypatch.setattr(training.run, "build_model", lambda *args: built.append(build_model(*args)) or built[-1])
    make_scienceqa(tmp_path / "sqa", n_train=16, n_val=2, n_test=4)
    tokenizer = train_tokenizer(synthetic_corpus(seed=0, n=200), tmp_path / "tokenizer.model")
    out = tmp_path / "run"
    argv = [
        "--recipe", "scienceqa", "--base", "tiny", "--tokenizer", str(tokenizer), "--data", str(tmp_path / "sqa"),
        "--clip", "tiny", "--method", "lora", "--model.quantize", "nf4", "--optim.batch_size", "4",
        "--optim.max_steps", "3", "--run.device", "cpu", "--run.out", str(out), "--run.eval_limit", "2",
        "--run.eval_max_new_tokens", "2", "--run.progress", "false", "--run.tensorboard", "false",
    ]  # fmt: skip
    assert train.main(argv) == 0
    assert [quantized_kind(lin.weight) for _, lin in base_linears(built[0])] == ["nf4"] * 4 * 7
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)

    plain = load_run(out)  # the adapter holds only adapter_* tensors: it loads on the unquantized base
    on_nf4 = load_model("tiny", out, quantize="nf4")
    trained = dict(plain.trainable_parameters())
    assert any(n.endswith("adapter_lora_b") and p.any() for n, p in trained.items())  # B left zero: it trained
    assert all(torch.equal(p, trained[n]) for n, p in on_nf4.trainable_parameters())
    tokens = tokens_of(plain, PROMPTS[0])
    with torch.no_grad():
        a, b = plain(tokens), on_nf4(tokens)
    assert ((b - a).norm() / a.norm()).item() <= LOGITS_BOUND["nf4"]
