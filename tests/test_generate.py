"""model/generate.py: KV-cache decoding (greedy / top-p), left-padded batches, stop strings, streaming."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import VisualConfig, preset
from model.decode import generate_tokens, top_p_filter
from model.generate import generate, stream
from model.llama import Transformer
from model.methods import LlamaAdapter, MethodConfig
from model.methods.prompt import PromptConfig
from model.tokenizer import load_tokenizer
from model.visual import build_visual
from tests.conftest import train_spm

WORDS = "the cat sat on a mat while dogs ran fast over green hills and blue water answer question caption red".split()
WORDS += ["café", "naïve", "東京", "😀"]  # multi-byte pieces for the streaming decoder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    return load_tokenizer(train_spm(lines, tmp_path_factory.mktemp("spm") / "tokenizer", 300))


def make_model(
    tokenizer, *, visual: bool = True, seed: int = 0, max_seq_len: int = 512, method: MethodConfig | None = None
) -> Transformer:
    """The tiny preset with random weights and ``method`` (default: the preset's adaption prompts, gates open)."""
    torch.manual_seed(seed)
    cfg = preset("tiny")
    cfg.method = method or cfg.method
    cfg.llama.vocab_size, cfg.llama.max_seq_len = tokenizer.vocab_size, max_seq_len
    cfg.visual = VisualConfig(clip_model="tiny") if visual else None
    model = Transformer(cfg, visual=build_visual(cfg.visual, cfg.llama.dim) if visual else None).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # open the gates and scale up the visual vector: as after training, both matter
        for name, p in model.named_parameters():
            if name.endswith("adapter_gate"):
                p.copy_(torch.randn(p.shape, generator=g))
        if visual:
            model.visual.adapter_proj[2].weight.mul_(10)
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (36, 40, 3), dtype=np.uint8))


def greedy_without_cache(model, ids, images, steps):
    """Reference: recompute the whole sequence for every new token."""
    seq = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(seq, images)[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[out[-1]]])], 1)
    return out


def run_tokens(model, prompt_ids, images=None, image_mask=None, **kwargs):
    steps = list(generate_tokens(model, prompt_ids, images, image_mask, **kwargs))
    return torch.stack(steps, 1).tolist()  # (B, steps)


# ---- exactness of cached decoding -----------------------------------------------------------------------------
def test_greedy_with_cache_equals_full_recompute(model, tokenizer):
    ids = tokenizer.encode("the cat sat on a mat", bos=True)
    pixels = model.visual.preprocess(image(1))[None]
    for images in (None, pixels):
        cached = run_tokens(model, [ids], images, max_new_tokens=24, temperature=0)[0]
        assert cached == greedy_without_cache(model, ids, images, 24)
        assert len(set(cached)) > 3  # a real continuation, not one repeated token


def test_batch_of_different_lengths_equals_each_prompt_alone(model, tokenizer):
    prompts = ["the cat", "blue water over green hills and the dogs ran fast", "answer question", "red"]
    images = [image(1), None, image(2), None]  # text-only rows take the text path in the same batch
    alone = [generate(model, p, img, max_new_tokens=16, temperature=0) for p, img in zip(prompts, images)]
    assert generate(model, prompts, images, max_new_tokens=16, temperature=0) == alone
    assert len(set(alone)) == 4 and all(alone)
    # the same at token level, where every row runs all 16 steps (no EOS)
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    pixels = torch.stack([model.visual.preprocess(img) if img else torch.zeros(3, 32, 32) for img in images])
    mask = torch.tensor([img is not None for img in images])
    batch = run_tokens(model, ids, pixels, mask, max_new_tokens=16, temperature=0)
    for i in range(4):
        single = run_tokens(model, [ids[i]], pixels[i : i + 1] if mask[i] else None, max_new_tokens=16, temperature=0)
        assert batch[i] == single[0]


def test_soft_tokens_sit_before_the_left_padding_so_a_batch_equals_each_prompt_alone(tokenizer):
    """Prompt tuning's soft tokens take cache slots 0..P-1 of every row, the padding comes after them (PEFT's
    layout), and each row's positions run 0..P-1 then P.. from its first real token: the same as alone."""
    model = make_model(tokenizer, method=PromptConfig(n_tokens=3))
    prompts = ["the cat", "blue water over green hills and the dogs ran fast", "red"]
    images = [image(1), None, image(2)]
    alone = [generate(model, p, img, max_new_tokens=12, temperature=0) for p, img in zip(prompts, images)]
    assert generate(model, prompts, images, max_new_tokens=12, temperature=0) == alone
    assert len(set(alone)) == 3
    ids = tokenizer.encode(prompts[0], bos=True)
    assert run_tokens(model, [ids], max_new_tokens=12, temperature=0)[0] == greedy_without_cache(model, ids, None, 12)


def test_the_image_changes_the_output(model):
    prompts = ["the cat", "red", "dogs ran over"]  # several prompts: one greedy output may ignore the image by chance
    outs = {
        tuple(generate(model, prompts, [img] * 3, max_new_tokens=12, temperature=0))
        for img in (None, image(1), image(2))
    }
    assert len(outs) == 3


def test_image_encoded_once_per_request_and_adapter_kv_once_per_sequence(model, monkeypatch):
    calls = {"visual": 0, "prompt_kv": 0}
    handle = model.visual.register_forward_hook(lambda *_: calls.__setitem__("visual", calls["visual"] + 1))
    original = LlamaAdapter.prompt_kv

    def counting(self, attention, visual):
        calls["prompt_kv"] += 1
        return original(self, attention, visual)

    monkeypatch.setattr(LlamaAdapter, "prompt_kv", counting)
    try:
        generate(model, ["the cat", "red"], [image(1), image(2)], max_new_tokens=10, temperature=0)
    finally:
        handle.remove()
    assert calls == {"visual": 1, "prompt_kv": 3}  # 3 adapted layers, each once for the whole batch


# ---- sampling -------------------------------------------------------------------------------------------------
def test_top_p_filter_keeps_tokens_whose_preceding_mass_is_within_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    # sorted: 0.5 (before: 0), 0.3 (before: 0.5), 0.15 (before: 0.8 > 0.75: dropped), 0.05 (dropped)
    torch.testing.assert_close(top_p_filter(probs, 0.75), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs, 1e-9), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(model):
    state = torch.get_rng_state()
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_p=0.9)
    a = generate(model, ["the cat", "red"], [image(1), None], seed=7, **kwargs)
    assert generate(model, ["the cat", "red"], [image(1), None], seed=7, **kwargs) == a
    assert generate(model, ["the cat", "red"], [image(1), None], seed=8, **kwargs) != a
    assert torch.equal(torch.get_rng_state(), state)


def test_tiny_top_p_equals_greedy(model):
    greedy = generate(model, "green hills", image(3), max_new_tokens=20, temperature=0)
    assert generate(model, "green hills", image(3), max_new_tokens=20, temperature=0.8, top_p=1e-9, seed=1) == greedy


# ---- stopping -------------------------------------------------------------------------------------------------
def test_eos_stops_a_row_and_the_batch(model, tokenizer):
    ids, other = tokenizer.encode("the cat", bos=True), tokenizer.encode("red", bos=True)
    free = run_tokens(model, [ids], max_new_tokens=20, temperature=0)[0]
    k = next(i for i in range(3, 20) if free[i] not in free[:i])
    eos = free[k]
    # both rows end at step k, and so does the loop
    assert run_tokens(model, [ids, ids], max_new_tokens=20, temperature=0, eos_id=eos) == [free[: k + 1]] * 2
    # a finished row only repeats eos while the other one goes on
    mixed = run_tokens(model, [ids, other], max_new_tokens=20, temperature=0, eos_id=eos)
    assert mixed[0] == free[:k] + [eos] * (20 - k) and eos not in mixed[1]


def test_stop_strings_cut_the_output(model):
    full = generate(model, "the cat", image(1), max_new_tokens=30, temperature=0)
    stop = full[6:9]
    assert len(full) > 12 and stop.strip()
    expected = full[: full.find(stop)]
    assert generate(model, "the cat", image(1), max_new_tokens=30, temperature=0, stop=stop) == expected
    assert generate(model, "the cat", image(1), max_new_tokens=30, temperature=0, stop=["zzz", stop]) == expected
    # streaming never emits the start of a stop string that then completes
    assert "".join(stream(model, "the cat", image(1), max_new_tokens=30, temperature=0, stop=stop)) == expected
    assert generate(model, "the cat", image(1), max_new_tokens=30, temperature=0, stop="zzz") == full


# ---- streaming ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0),
        dict(temperature=1.0, top_p=0.95, seed=3),
        dict(temperature=1.0, top_p=0.95, seed=4, stop=["e", "zz"]),
    ],
)
def test_stream_pieces_concatenate_to_generate_output(model, kwargs):
    for img in (None, image(2)):
        expected = generate(model, "blue water", img, max_new_tokens=40, **kwargs)
        pieces = list(stream(model, "blue water", img, max_new_tokens=40, **kwargs))
        assert "".join(pieces) == expected and len(pieces) > 1


def test_stream_flushes_held_back_text_and_does_not_leak_inference_mode(model):
    full = generate(model, "the cat", None, max_new_tokens=30, temperature=0)
    stop = full[10:14] + "\u2603"  # starts like the output, never completes
    pieces = stream(model, "the cat", max_new_tokens=30, temperature=0, stop=stop)
    first = next(pieces)
    assert not torch.is_inference_mode_enabled()
    rest = list(pieces)
    assert first + "".join(rest) == full


def test_multimodal_one_call_api(model):
    single = model.generate("the cat", image(1), max_new_tokens=8, temperature=0)
    assert isinstance(single, str)
    assert model.generate(["the cat"], [image(1)], max_new_tokens=8, temperature=0) == [single]
    assert "".join(model.stream("the cat", image(1), max_new_tokens=8, temperature=0)) == single
    assert model.generate([], max_new_tokens=8) == []


# ---- lengths --------------------------------------------------------------------------------------------------
def test_max_new_tokens_is_capped_by_max_seq_len(tokenizer):
    small = make_model(tokenizer, visual=False, max_seq_len=24)
    ids = list(range(3, 23))  # 20 tokens: room for 4
    assert len(run_tokens(small, [ids, ids[:5]], max_new_tokens=100, temperature=0)[0]) == 4
    with pytest.raises(ValueError, match="prompt 1 has 24 tokens; need 1 to max_seq_len - 1 = 23"):
        next(generate_tokens(small, [ids, list(range(3, 27))]))


def test_overlong_prompts_are_truncated_from_the_left_keeping_bos(tokenizer):
    small = make_model(tokenizer, visual=False, max_seq_len=24)
    prompt = " ".join(WORDS[:20])
    ids = tokenizer.encode(prompt, bos=True)
    assert len(ids) > 23
    with pytest.warns(UserWarning, match=f"prompt 0 has {len(ids)} tokens.*keeping BOS and the last 22"):
        text = generate(small, prompt, max_new_tokens=5, temperature=0)
    expected = run_tokens(small, [ids[:1] + ids[-22:]], max_new_tokens=5, temperature=0)[0]
    assert text == tokenizer.decode([t for t in expected if t != tokenizer.eos_id])


# ---- bad calls ------------------------------------------------------------------------------------------------
def test_bad_calls_give_clear_errors(tokenizer, model, tmp_path):
    text_only = make_model(tokenizer, visual=False)
    with pytest.raises(ValueError, match="no visual path"):
        generate(text_only, "the cat", image(1))
    with pytest.raises(ValueError, match="2 prompts, got 1 images"):
        generate(model, ["a", "b"], [image(1)])
    with pytest.raises(ValueError, match="2 prompts, got Image"):
        generate(model, ["a", "b"], image(1))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, "a", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, "a", top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream(model, "a", max_new_tokens=0)
    with pytest.raises(ValueError, match="stop strings"):
        generate(model, "a", stop=[""])
    with pytest.raises(TypeError, match="use generate for a batch"):
        stream(model, ["a", "b"])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png is empty"):
        stream(model, "a", tmp_path / "empty.png")  # checked at the call, before iteration
    model_without_tokenizer = make_model(tokenizer, visual=False)
    model_without_tokenizer.tokenizer = None
    with pytest.raises(ValueError, match="model.tokenizer is None"):
        generate(model_without_tokenizer, "a")
