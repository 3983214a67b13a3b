"""The contract every PEFT method of model/methods passes, parametrised over the registry, on the shipped tiny base
(assets/tiny-base: a trained 4-layer LLaMA, dim 64, 4 heads, 2 KV heads, with its tokenizer) and the seeded tiny
CLIP tower: identity at init where the method defines it, save / load bit-exact, merge() keeps the logits, cached
decoding equals recompute, a left-padded batch equals each prompt alone, only the method's tensors train, and the
image changes the output after a few training steps."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, VisualConfig, load_model, save_adapter
from model.checkpoint import open_base
from model.llama import Transformer, is_trainable
from model.methods import Method, method_class, method_names

TINY_BASE = Path(__file__).resolve().parents[1] / "assets" / "tiny-base"

TINY_SETTINGS: dict[str, dict] = {
    "llama_adapter": dict(prompt_len=4, n_layers=2),
    "llama_adapter_v2": dict(prompt_len=4, n_layers=2, bias_targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")),
    "lora": dict(rank=4, alpha=8),
    "dora": dict(rank=4, alpha=8),
    "ia3": dict(),
    "houlsby": dict(bottleneck=8),
    "adamix": dict(n_experts=3, bottleneck=8),
    "prefix": dict(prefix_len=4, mlp_hidden=16),
    "ptuning_v2": dict(prefix_len=4),
    "prompt": dict(n_tokens=4),
    "ptuning": dict(n_tokens=4, encoder_hidden=16),
}
"""Each method's settings on the tiny base (small sizes, every layer count within its 4 layers)."""

VARIANTS: dict[str, tuple[str, dict]] = {
    "houlsby-pfeiffer": ("houlsby", dict(bottleneck=8, sublayers=("feed_forward",), activation="relu")),
    "houlsby-parallel": ("houlsby", dict(bottleneck=8, placement="parallel")),
    "houlsby-norms": ("houlsby", dict(bottleneck=8, train_norms=True)),
    "adamix-unshared": ("adamix", dict(n_experts=3, bottleneck=8, shared="none", freeze_unrouted=True)),
    "ptuning_v2-mlp": ("ptuning_v2", dict(prefix_len=4, reparameterize=True, mlp_hidden=16)),
}
"""Settings of a method that change its computation, run through the contract's identity, save / load, cache and
gradient checks: case name -> (method, settings)."""

IDENTITY_AT_INIT = {
    "llama_adapter",
    "llama_adapter_v2",
    "lora",
    "dora",
    "ia3",
    "houlsby",
    *(v for v in VARIANTS if "houlsby" in v),
}
"""Methods whose fresh adapter is exactly the base model (the others' init is asserted in their own tests)."""

METHODS = sorted(n for n in method_names() if method_class(n).__module__.startswith("model.methods."))
CASES = METHODS + sorted(VARIANTS)
PROMPTS = ["Question: What color is the ball?\nAnswer:", "Tell me", "Question: Which is bigger?\nContext: N/A\nAnswer:"]

pytestmark = pytest.mark.usefixtures("one_thread")


QUERY_PATH = VisualConfig(clip_model="tiny", kind="query", query_len=4, query_width=32, query_blocks=1, query_heads=4)
"""The V2 release's visual path at tiny size: 4 visual tokens, one per prompt / prefix / soft token of TINY_SETTINGS."""


def method_of_case(case: str) -> type[Method]:
    """The method class a case (a method name, or a key of VARIANTS) runs."""
    return method_class(VARIANTS[case][0] if case in VARIANTS else case)


def make(name: str, *, images: bool = False, seed: int = 0, visual: VisualConfig | None = None) -> Transformer:
    """The tiny base with a fresh adapter of case ``name`` (a method with TINY_SETTINGS, or a VARIANTS key) (and
    the tiny CLIP path when ``images``: V1's global one, or ``visual``), in eval mode."""
    settings = VARIANTS[name][1] if name in VARIANTS else TINY_SETTINGS[name]
    config = method_of_case(name).config_class(**settings)
    clip = (visual or "tiny") if images else None
    return load_model(TINY_BASE, adapter_config=config, clip=clip, seed=seed).eval()


def perturb(model: Transformer, seed: int = 1) -> None:
    """Move every trainable tensor away from its init (as training would): a merge, a cache or a save then has
    something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def tokens_of(model: Transformer, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(text, bos=True)])  # (1, T)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # the tiny tower's input


def test_the_registry_holds_every_method_of_the_survey():
    assert "llama_adapter" in METHODS
    assert set(METHODS) <= set(TINY_SETTINGS), "every registered method needs its tiny settings here"


@pytest.mark.parametrize("name", sorted(IDENTITY_AT_INIT & set(CASES)))
def test_a_fresh_adapter_is_exactly_the_base_model(name):
    model = make(name)
    base = Transformer(ModelConfig(llama=model.config.llama, method=None)).eval()
    open_base(TINY_BASE).load_into(base, dtype=None, device=torch.device("cpu"))
    tokens = tokens_of(model, PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))


@pytest.mark.parametrize("name", CASES)
def test_save_and_load_are_bit_exact_and_save_only_the_methods_tensors(name, tmp_path):
    """What is saved is the method's exported form (its trainable tensors, or for a reparameterised method the
    tensors it computes): loaded back, the same tensors and the same logits (exactly when nothing was computed)."""
    model = make(name, images=method_of_case(name).takes_visual)
    perturb(model)
    save_adapter(model, tmp_path, base=TINY_BASE)
    loaded = load_model(TINY_BASE, tmp_path).eval()
    with torch.no_grad():
        config, exported = model.method.exported(model)
    assert exported.keys() == dict(loaded.adapter_state_dict()).keys() and loaded.config.method == config
    assert all(torch.equal(exported[n], t) for n, t in loaded.adapter_state_dict().items())
    assert all(is_trainable(n) for n in exported)
    tokens, pixels = tokens_of(model, PROMPTS[0]), images(1) if model.visual is not None else None
    with torch.no_grad():
        before, after = model(tokens, pixels), loaded(tokens, pixels)
    if config == model.method.config:
        assert torch.equal(before, after)
    else:
        assert (before - after).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", [n for n in METHODS if method_class(n).merge is not Method.merge])
def test_merge_keeps_the_logits(name):
    model = make(name)
    perturb(model)
    tokens = tokens_of(model, PROMPTS[0])
    with torch.no_grad():
        before = model(tokens)
        model.method.merge(model)
        after = model(tokens)
    assert (before - after).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_cached_decoding_equals_recompute(name):
    model = make(name, images=method_of_case(name).takes_visual)
    perturb(model)
    tokens, pixels = tokens_of(model, PROMPTS[2]), images(1) if model.visual is not None else None
    T = tokens.shape[1]
    with torch.no_grad():
        full = model(tokens, pixels)  # (1, T, vocab)
        cache = model.new_cache(1, T + 4)
        steps = [model(tokens[:, : T - 3], pixels, cache=cache)]
        steps += [model(tokens[:, t : t + 1], cache=cache) for t in range(T - 3, T)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", METHODS)
def test_a_left_padded_batch_equals_each_prompt_alone(name):
    model = make(name)
    perturb(model)
    batch = model.generate(PROMPTS, max_new_tokens=8, temperature=0)
    assert batch == [model.generate(p, max_new_tokens=8, temperature=0) for p in PROMPTS]


@pytest.mark.parametrize("name", CASES)
def test_only_the_methods_tensors_receive_gradients(name):
    model = make(name, images=method_of_case(name).takes_visual).train()
    perturb(model)
    tokens = tokens_of(model, PROMPTS[0])
    pixels = images(1) if model.visual is not None else None
    logits = model(tokens[:, :-1], pixels)
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    frozen_with_grad = [n for n, p in model.named_parameters() if not is_trainable(n) and p.grad is not None]
    assert frozen_with_grad == []
    trained = [n for n, p in model.trainable_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(not n.startswith("visual.") for n in trained), "the method's own tensors get no gradient"
    assert all(p.requires_grad == is_trainable(n) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", [n for n in METHODS if method_class(n).takes_visual])
def test_the_image_changes_the_output_after_a_few_steps(name):
    """A toy batch whose target token depends on the image: after a few Adam steps the visual path is wired in,
    receives gradients, and two images give different logits."""
    model = make(name, images=True).train()
    torch.manual_seed(0)
    tokens = tokens_of(model, PROMPTS[0]).repeat(2, 1)  # (2, T)
    pixels = images(2, seed=3)
    targets = torch.tensor([11, 29])  # a different next token for each image
    optimizer = torch.optim.Adam([p for _, p in model.trainable_parameters()], lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        logits = model(tokens, pixels)[:, -1]  # (2, vocab)
        F.cross_entropy(logits, targets).backward()
        optimizer.step()
    assert any(p.grad.abs().sum() > 0 for n, p in model.trainable_parameters() if n.startswith("visual."))
    model.eval()
    with torch.no_grad():
        logits = model(tokens, pixels)[:, -1]
    assert (logits[0] - logits[1]).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", [n for n in METHODS if method_class(n).takes_visual])
def test_the_query_paths_visual_tokens_enter_every_method(name):
    """Q = 4 visual tokens (the release's query path): identity at init where defined, the image counts once the
    method trained, a text-only row of a mixed batch is the text-only model's, and the cache equals recompute."""
    model = make(name, images=True, visual=QUERY_PATH)
    tokens = tokens_of(model, PROMPTS[0]).expand(2, -1)
    pixels = images(2)
    with torch.no_grad():
        if name in IDENTITY_AT_INIT:
            assert torch.equal(model(tokens, pixels), model(tokens))
    check_a_moved_image_path(model, tokens, pixels)


def check_a_moved_image_path(model: Transformer, tokens: torch.Tensor, pixels: torch.Tensor) -> None:
    """Once the adapter moved (``perturb``): the image counts, a text-only row of a mixed batch (2 rows) is the
    text-only model's, and the cache equals recompute."""
    with torch.no_grad():
        perturb(model)
        mixed = model(tokens, pixels, image_mask=torch.tensor([True, False]))
        assert (mixed[0] - model(tokens)[0]).abs().max().item() > 1e-3
        assert (mixed[1] - model(tokens)[1]).abs().max().item() <= 1e-5
        cache = model.new_cache(2)
        head = model(tokens[:, :-1], pixels, cache=cache)
        last = model(tokens[:, -1:], cache=cache)
        assert (torch.cat([head, last], 1) - model(tokens, pixels)).abs().max().item() <= 1e-4


def test_visual_tokens_that_fit_no_prompt_count_name_both_fields():
    with pytest.raises(ValueError, match=r"LlamaAdapterConfig\.prompt_len=4 does not fit 3 visual tokens .*query_len"):
        load_model(
            TINY_BASE,
            adapter_config=method_class("llama_adapter").config_class(prompt_len=4, n_layers=2),
            clip=VisualConfig(clip_model="tiny", kind="query", query_len=3, query_width=32, query_heads=4),
        )


SHARED_ENTRY = VisualConfig(clip_model="tiny", entry="shared")
"""Every method text-only, the image through the gated visual prompt in the top 2 layers."""


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("query", [False, True], ids=["global", "query"])
def test_the_shared_visual_entry_gives_every_method_the_same_image_path(name, query):
    """VisualConfig.entry='shared': the method's own tensors are its text-only ones under the same names, plus one
    gate per head in the top 2 layers; at init the image adds exactly nothing (any method); once trained it counts,
    a text-only row is the text-only model's and the cache equals recompute; a save keeps the entry. Any number
    of visual tokens fits (Q = 3 fits no prompt count)."""
    entry = SHARED_ENTRY
    if query:
        entry = VisualConfig(clip_model="tiny", entry="shared", kind="query", query_len=3, query_width=32,
                             query_blocks=1, query_heads=4)  # fmt: skip
    model = make(name, images=True, visual=entry)
    own = {n for n, _ in make(name).trainable_parameters()}
    names = {n for n, _ in model.trainable_parameters() if not n.startswith("visual.")}
    assert names - own == {f"layers.{i}.attention.adapter_visual_gate" for i in (2, 3)}
    assert own <= names
    tokens, pixels = tokens_of(model, PROMPTS[0]).expand(2, -1), images(2)
    with torch.no_grad():
        assert torch.equal(model(tokens, pixels), model(tokens))
    check_a_moved_image_path(model, tokens, pixels)


@pytest.mark.parametrize("name", METHODS)
def test_a_shared_entry_adapter_saves_and_loads_with_its_entry(name, tmp_path):
    model = make(name, images=True, visual=SHARED_ENTRY)
    perturb(model)
    save_adapter(model, tmp_path, base=TINY_BASE)
    loaded = load_model(TINY_BASE, tmp_path).eval()
    assert loaded.config.visual.entry == "shared"
    tokens, pixels = tokens_of(model, PROMPTS[0]), images(1)
    with torch.no_grad():
        assert (model(tokens, pixels) - loaded(tokens, pixels)).abs().max().item() <= 1e-5


def test_a_gated_prompt_method_is_its_own_shared_entry_in_the_same_layers():
    """LoRA's own image path is the gated visual prompt: shared and native are the same model, bit for bit; in
    other layers than the shared ones it is refused, naming both fields."""
    shared, native = make("lora", images=True, visual=SHARED_ENTRY), make("lora", images=True)
    tokens, pixels = tokens_of(shared, PROMPTS[0]), images(1)
    perturb(shared), perturb(native)
    with torch.no_grad():
        assert torch.equal(shared(tokens, pixels), native(tokens, pixels))
    config = method_class("lora").config_class(**TINY_SETTINGS["lora"], visual_layers=3)
    with pytest.raises(ValueError, match=r"LoraConfig\.visual_layers=3 differs from VisualConfig\.shared_layers=2"):
        load_model(TINY_BASE, adapter_config=config, clip=SHARED_ENTRY)
