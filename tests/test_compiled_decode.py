"""The fixed-shape decode step (``Transformer.decode_step``) and ``generate(..., compile=True)`` (model/generate.py).

Every method that keeps something per sequence in the cache (adaption prompts' K/V, V2's, prefixes, soft tokens,
LoRA's gated visual value) on a 2-layer tiny model with the tiny CLIP path and every trainable tensor moved off its
init: the static step (write at a slot tensor, attend over the whole preallocated cache under a mask) gives the
same greedy tokens as the growing-cache forward it replaced, and the ``torch.compile``d step the same as eager, at
batch 1 and for a left-padded batch of 8 with images on some rows, over 64 new tokens.
"""

import dataclasses
import shutil

import pytest
import torch

from model.config import VisualConfig, preset
from model.decode import generate_tokens
from model.llama import Transformer
from model.methods import LlamaAdapterConfig, MethodConfig
from model.methods.llama_adapter_v2 import AdapterV2Config
from model.methods.lora import LoraConfig
from model.methods.prefix import PrefixConfig
from model.methods.prompt import PromptConfig
from model.methods.ptuning import PTuningConfig
from model.visual import build_visual

SETTINGS: dict[str, MethodConfig] = {
    "llama_adapter": LlamaAdapterConfig(prompt_len=4, n_layers=1),  # the bottom layer has no prompts: None in the state
    "llama_adapter_v2": AdapterV2Config(prompt_len=4, n_layers=2, bias_targets=("wq", "wk", "wv", "wo", "w1")),
    "prefix": PrefixConfig(prefix_len=4, mlp_hidden=16),
    "prompt": PromptConfig(n_tokens=4, init="random"),
    "ptuning": PTuningConfig(n_tokens=4, encoder_hidden=16),
    "lora": LoraConfig(rank=4, alpha=8, visual_layers=1),
}
COMPILED = ["llama_adapter", "llama_adapter_v2", "prefix", "prompt", "lora"]
"""Compiled (about 2 compiles each): ptuning decodes exactly as prompt does (soft tokens made at the prefill)."""
NEW_TOKENS = 64
ONE = [[1, 17, 42, 99, 7, 250, 3]]
EIGHT = [[1] + [(13 * i + 7 * j) % 500 + 3 for j in range(n)] for i, n in enumerate([0, 3, 14, 6, 1, 9, 11, 4])]
IMAGE_ROWS = torch.tensor([True, False, True, True, False, False, True, False])

pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str) -> Transformer:
    """A 2-layer tiny model with the tiny CLIP path and ``name``'s adapter, every trainable tensor perturbed (gates
    open, biases non-zero: as after training, each of the method's per-sequence tensors changes the output)."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.llama = dataclasses.replace(cfg.llama, n_layers=2, max_seq_len=256)
    cfg.method = SETTINGS[name]
    cfg.visual = VisualConfig(clip_model="tiny")
    model = Transformer(cfg, visual=build_visual(cfg.visual, cfg.llama.dim)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # the tiny tower's input


def greedy(model: Transformer, prompts: list[list[int]], with_images: bool, **kwargs) -> list[list[int]]:
    pixels, mask = (images(len(prompts)), IMAGE_ROWS[: len(prompts)]) if with_images else (None, None)
    steps = generate_tokens(model, prompts, pixels, mask, max_new_tokens=NEW_TOKENS, temperature=0.0, **kwargs)
    return torch.stack(list(steps), 1).tolist()  # (B, NEW_TOKENS)


def greedy_growing_cache(model: Transformer, prompts: list[list[int]], with_images: bool) -> list[list[int]]:
    """The reference: what generate_tokens did before decode_step, one ``forward`` per token on a cache whose
    attended length grows with every step (left padding marked invalid, positions counted per row)."""
    batch, length = len(prompts), max(len(p) for p in prompts)
    tokens, positions = torch.zeros(batch, length, dtype=torch.long), torch.zeros(batch, length, dtype=torch.long)
    cache = model.new_cache(batch, length + NEW_TOKENS)
    for i, ids in enumerate(prompts):
        pad = length - len(ids)
        tokens[i, pad:], positions[i, pad:] = torch.tensor(ids), torch.arange(len(ids))
        cache.mark_padding(i, pad)
    pixels, mask = (images(batch), IMAGE_ROWS[:batch]) if with_images else (None, None)
    next_positions = torch.tensor([len(p) for p in prompts])[:, None]  # (B, 1)
    out = []
    with torch.no_grad():
        logits = model(tokens, pixels, image_mask=mask, cache=cache, positions=positions, last_only=True)
        for step in range(NEW_TOKENS):
            out.append(logits[:, -1].argmax(-1))
            logits = model(out[-1][:, None], cache=cache, positions=next_positions + step, last_only=True)
    return torch.stack(out, 1).tolist()


@pytest.fixture(scope="module", params=list(SETTINGS))
def method_model(request) -> tuple[str, Transformer]:
    return request.param, make(request.param)


@pytest.mark.parametrize(("prompts", "with_images"), [(ONE, False), (EIGHT, True)], ids=["batch1", "padded8"])
def test_the_static_step_equals_the_growing_cache(method_model, prompts, with_images):
    _, model = method_model
    assert greedy(model, prompts, with_images) == greedy_growing_cache(model, prompts, with_images)


def test_the_static_step_gives_the_forward_logits_over_a_padded_batch():
    """Logits, not only argmaxes: one step of decode_step against forward on a copy of the same prefilled cache."""
    model = make("prefix")  # joint K/V: the whole-cache mask is padded for the prefixes
    tokens = torch.tensor([[0, 0, 1, 5, 9], [1, 4, 4, 8, 2]])
    positions = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    caches = [model.new_cache(2, 16) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            cache.mark_padding(0, 2)
            model(tokens, images(2), image_mask=IMAGE_ROWS[:2], cache=cache, positions=positions)
        new, pos = torch.tensor([[11], [12]]), torch.tensor([[3], [5]])
        dynamic = model(new, cache=caches[0], positions=pos)
        static = model.decode_step(new, pos, torch.tensor([caches[1].length]), caches[1])
    torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].k[1][:, :, : caches[0].length], caches[0].k[1][:, :, : caches[0].length])


# ---- compiled ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_runs():
    """Per compiled method: the eager and compiled tokens at batch 1 and 8, and the graphs compiled by a repeat."""
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("cc")):
        pytest.skip("torch.compile on the CPU (inductor) needs a C++ compiler; none on PATH")
    from torch._dynamo.utils import counters

    runs = {}
    for name in COMPILED:
        torch._dynamo.reset()  # each method's graphs on their own, below the recompile limit
        model = make(name)
        result = {}
        for label, prompts, with_images in [("batch1", ONE, False), ("padded8", EIGHT, True)]:
            eager = greedy(model, prompts, with_images)
            before = counters["stats"]["unique_graphs"]
            compiled = greedy(model, prompts, with_images, compile=True)
            graphs = counters["stats"]["unique_graphs"] - before
            again = greedy(model, prompts[::-1], with_images, compile=True)  # other lengths, same bucket and batch
            repeat_graphs = counters["stats"]["unique_graphs"] - before - graphs
            result[label] = (eager, compiled, graphs, greedy(model, prompts[::-1], with_images), again, repeat_graphs)
        runs[name] = result
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
@pytest.mark.parametrize("label", ["batch1", "padded8"])
def test_compiled_decode_gives_the_eager_greedy_tokens(compiled_runs, name, label):
    eager, compiled, graphs, eager_again, compiled_again, repeat_graphs = compiled_runs[name][label]
    assert graphs >= 1, "the decode step was not compiled"
    assert compiled == eager
    assert compiled_again == eager_again
    assert repeat_graphs == 0, "a second request of the same batch size and cache bucket compiled again"
