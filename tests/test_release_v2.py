"""model/checkpoint/release_v2.py + the query visual path: the four official LLaMA-Adapter V2 multimodal release
files load and compute what the official code computes, and our V2 adapters export back to that format.

The reference below is written here from the step-by-step account of the official forward in
shared/reference/v2_multimodal_release.md (section 3; confirmed there by running the official code at tiny dims):
OpenAI's CLIP on every token, the query blocks, then LLaMA with per-head tanh gates, new gates, biases, replaced
norms and unscaled LoRA, the prompts through the plain wk / wv. It shares no code with the model package. The files
are written in the release's own key layout, gates / new gates / LoRA in fp16 as the real files hold them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from model import CheckpointError, load_model
from model.checkpoint.release_v2 import write_release_v2
from model.decode import generate_tokens
from tests.test_method_contract import TINY_BASE

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, LAYERS, HEADS, VOCAB, FFN = 64, 3, 4, 512, 176  # MHA, as the official ModelArgs (no n_kv_heads)
CLIP_WIDTH, CLIP_LAYERS, PATCH, GRID, CLIP_OUT = 128, 2, 8, 4, 48  # 32 px images; heads = width / 64 = 2
Q, WIDTH, BLOCKS, RANK = 4, 32, 2, 4  # queries = prompts per layer; query blocks of 16 heads (hd 2)
EOS = 2
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VARIANTS = ("BIAS-7B", "LORA-BIAS-7B", "CAPTION-7B", "LORA-BIAS-7B-v21")


def rand(gen: torch.Generator, *shape: int, std: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


# ---- the files -------------------------------------------------------------------------------------------------
def write_base(folder: Path) -> Path:
    """A tiny LLaMA-1 style Meta directory: root/tokenizer.model beside root/7B/{params.json, consolidated.00.pth}."""
    gen = torch.Generator().manual_seed(0)
    shutil.copy(Path(TINY_BASE) / "tokenizer.model", folder / "tokenizer.model")
    base = folder / "7B"
    base.mkdir()
    params = {"dim": DIM, "multiple_of": 16, "n_heads": HEADS, "n_layers": LAYERS, "norm_eps": 1e-6, "vocab_size": -1}
    (base / "params.json").write_text(json.dumps(params))
    state = {"tok_embeddings.weight": rand(gen, VOCAB, DIM, std=1.0), "norm.weight": 1 + rand(gen, DIM, std=0.1)}
    state["output.weight"] = rand(gen, VOCAB, DIM, std=0.1)
    for i in range(LAYERS):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            state[f"{p}attention.{name}.weight"] = rand(gen, DIM, DIM, std=0.15)
        state[f"{p}feed_forward.w1.weight"] = rand(gen, FFN, DIM, std=0.15)
        state[f"{p}feed_forward.w3.weight"] = rand(gen, FFN, DIM, std=0.15)
        state[f"{p}feed_forward.w2.weight"] = rand(gen, DIM, FFN, std=0.1)
        state[f"{p}attention_norm.weight"] = 1 + rand(gen, DIM, std=0.1)
        state[f"{p}ffn_norm.weight"] = 1 + rand(gen, DIM, std=0.1)
    torch.save({k: v.half() for k, v in state.items()}, base / "consolidated.00.pth")  # fp16, as Meta's files
    return base


def write_clip(path: Path) -> Path:
    """An OpenAI-layout CLIP state dict (fp16): the visual tower, a text tower and the three scalar entries."""
    gen = torch.Generator().manual_seed(1)
    W = CLIP_WIDTH
    state = {
        "visual.conv1.weight": rand(gen, W, 3, PATCH, PATCH, std=0.05),
        "visual.class_embedding": rand(gen, W),
        "visual.positional_embedding": rand(gen, GRID * GRID + 1, W),
        "visual.proj": rand(gen, W, CLIP_OUT, std=0.1),
    }
    for ln in ("ln_pre", "ln_post"):
        state[f"visual.{ln}.weight"], state[f"visual.{ln}.bias"] = 1 + rand(gen, W, std=0.1), rand(gen, W, std=0.1)
    for b in range(CLIP_LAYERS):
        p = f"visual.transformer.resblocks.{b}."
        state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"] = (
            rand(gen, 3 * W, W, std=0.1),
            rand(gen, 3 * W),
        )
        state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"] = rand(gen, W, W, std=0.1), rand(gen, W)
        state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"] = rand(gen, 4 * W, W, std=0.1), rand(gen, 4 * W)
        state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"] = rand(gen, W, 4 * W, std=0.05), rand(gen, W)
        for ln in ("ln_1", "ln_2"):
            state[p + f"{ln}.weight"], state[p + f"{ln}.bias"] = 1 + rand(gen, W, std=0.1), rand(gen, W, std=0.1)
    state |= {"token_embedding.weight": rand(gen, 100, 64), "text_projection": rand(gen, 64, CLIP_OUT)}
    state |= {"logit_scale": torch.tensor(4.6), "ln_final.weight": torch.ones(64)}
    state = {k: v.half() for k, v in state.items()}
    state |= {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77), "vocab_size": torch.tensor(100)}
    torch.save(state, path)
    return path


def release_tensors(variant: str, seed: int = 2) -> dict:
    """The release container of ``variant`` at tiny dims, in the official key layout."""
    gen = torch.Generator().manual_seed(seed)
    lora = variant.startswith("LORA")
    m = {
        "clip_proj.weight": rand(gen, WIDTH, CLIP_OUT), "clip_proj.bias": rand(gen, WIDTH),
        "clip_proj_norm.weight": 1 + rand(gen, WIDTH), "clip_proj_norm.bias": rand(gen, WIDTH),
        "visual_query.weight": rand(gen, Q, WIDTH, std=1.0),
        "visual_proj.weight": rand(gen, DIM, WIDTH), "visual_proj.bias": rand(gen, DIM),
        "visual_proj_norm.weight": 1 + rand(gen, DIM), "visual_proj_norm.bias": rand(gen, DIM),
        "adapter_query.weight": rand(gen, (LAYERS - 1) * Q, DIM, std=1.0),
    }  # fmt: skip
    for b in range(BLOCKS):
        p = f"visual_blocks.{b}."
        m |= {p + "norm1.weight": 1 + rand(gen, WIDTH), p + "norm1.bias": rand(gen, WIDTH)}
        m |= {p + "norm2.weight": 1 + rand(gen, WIDTH), p + "norm2.bias": rand(gen, WIDTH)}
        m |= {p + "attn.qkv.weight": rand(gen, 3 * WIDTH, WIDTH), p + "attn.qkv.bias": rand(gen, 3 * WIDTH)}
        m |= {p + "attn.proj.weight": rand(gen, WIDTH, WIDTH), p + "attn.proj.bias": rand(gen, WIDTH)}
        m |= {p + "mlp.fc1.weight": rand(gen, 4 * WIDTH, WIDTH), p + "mlp.fc1.bias": rand(gen, 4 * WIDTH)}
        m |= {p + "mlp.fc2.weight": rand(gen, WIDTH, 4 * WIDTH), p + "mlp.fc2.bias": rand(gen, WIDTH)}
    for i in range(LAYERS):
        p = f"llama.layers.{i}."
        m[p + "attention.gate"] = rand(gen, 1, HEADS, 1, 1, std=0.8).half()
        if variant == "CAPTION-7B":
            continue  # the caption phase trains no biases, norms or LoRA
        m |= {p + "attention.wq.bias": rand(gen, DIM, std=0.05), p + "attention.wo.bias": rand(gen, DIM, std=0.05)}
        m |= {
            p + "feed_forward.w1.bias": rand(gen, FFN, std=0.05),
            p + "feed_forward.w3.bias": rand(gen, FFN, std=0.05),
        }
        m[p + "feed_forward.w2.bias"] = rand(gen, DIM, std=0.05)
        m |= {p + "attention_norm.weight": 1 + rand(gen, DIM, std=0.1), p + "ffn_norm.weight": 1 + rand(gen, DIM)}
        if lora:
            m[p + "attention.new_gate"] = (1 + rand(gen, 1, 1, 1, 1)).half()
            for t in ("q", "k", "v", "o"):
                m[p + f"attention.lora_w{t}_l1.weight"] = rand(gen, RANK, DIM, std=0.1).half()
                m[p + f"attention.lora_w{t}_l2.weight"] = rand(gen, DIM, RANK, std=0.1).half()
            for t, (n_in, n_out) in {"1": (DIM, FFN), "3": (DIM, FFN), "2": (FFN, DIM)}.items():
                m[p + f"feed_forward.lora_w{t}_l1.weight"] = rand(gen, RANK, n_in, std=0.1).half()
                m[p + f"feed_forward.lora_w{t}_l2.weight"] = rand(gen, n_out, RANK, std=0.1).half()
    if variant != "CAPTION-7B":
        m["llama.norm.weight"] = 1 + rand(gen, DIM, std=0.1)
    config = {"w_bias": True, "w_lora": lora, "lora_rank": RANK}
    return {"model": m} if variant == "CAPTION-7B" else {"model": m, "config": config}


# ---- the reference -----------------------------------------------------------------------------------------------
def ref_clip_tokens(clip: dict, images: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's ViT on (B, 3, 32, 32): every token through ln_post and proj, (B, 17, CLIP_OUT)."""
    s = {k[len("visual.") :]: v.float() for k, v in clip.items() if k.startswith("visual.")}
    x = F.conv2d(images, s["conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (B, 16, W)
    x = torch.cat([s["class_embedding"].expand(x.shape[0], 1, -1), x], 1) + s["positional_embedding"]

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], 1e-5)

    x = ln(x, "ln_pre")
    heads = CLIP_WIDTH // 64
    for b in range(CLIP_LAYERS):
        p = f"transformer.resblocks.{b}."
        h = ln(x, p + "ln_1")
        q, k, v = (h @ s[p + "attn.in_proj_weight"].T + s[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, N, 64)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
        x = x + att.transpose(1, 2).flatten(2) @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        h = ln(x, p + "ln_2") @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"]
        x = x + (h * torch.sigmoid(1.702 * h)) @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]
    return ln(x, "ln_post") @ s["proj"]


def ref_visual(m: dict, clip_tokens: torch.Tensor) -> torch.Tensor:
    """clip_proj + norm, queries, the timm blocks, visual_proj + norm: (B, Q, DIM)."""

    def lin(x, name):
        return x @ m[f"{name}.weight"].T + m[f"{name}.bias"]

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], m[f"{name}.weight"], m[f"{name}.bias"], 1e-5)

    x = ln(lin(clip_tokens, "clip_proj"), "clip_proj_norm")
    x = torch.cat([m["visual_query.weight"].expand(x.shape[0], -1, -1), x], 1)
    B, N, C = x.shape
    for b in range(BLOCKS):
        p = f"visual_blocks.{b}."
        qkv = lin(ln(x, p + "norm1"), p + "attn.qkv").reshape(B, N, 3, 16, C // 16).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (C // 16) ** -0.5, -1) @ qkv[2]
        x = x + lin(att.transpose(1, 2).reshape(B, N, C), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    return ln(lin(x[:, :Q], "visual_proj"), "visual_proj_norm")


def ref_logits(base: dict, release: dict, clip: dict, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The official LLaMA_adapter forward (all positions), as section 3 of the reference describes it."""
    m = {k: v.float() for k, v in release["model"].items()}
    w = {k: v.float() for k, v in base.items()}
    cfg = release.get("config", {})
    w_lora = cfg.get("w_lora", False)
    V = ref_visual(m, ref_clip_tokens(clip, images))  # (B, Q, DIM)
    B, Tn = tokens.shape
    hd = DIM // HEADS
    freqs = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.polar(torch.ones(Tn, hd // 2), torch.outer(torch.arange(Tn).float(), freqs))  # (T, hd/2)

    def rope(x):  # (B, T, H, hd), adjacent pairs as complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * angles[None, :, None]).flatten(3)

    def norm(x, key):
        weight = m.get(f"llama.{key}", w[key])  # absent from the file: the base's
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def linear(x, layer, owner, name):
        y = x @ w[f"layers.{layer}.{owner}.{name}.weight"].T
        y = y + m.get(f"llama.layers.{layer}.{owner}.{name}.bias", 0.0)
        if w_lora:
            lo = f"llama.layers.{layer}.{owner}.lora_{name}_l"
            y = y + (x @ m[lo + "1.weight"].T) @ m[lo + "2.weight"].T  # unscaled
        return y

    mask = torch.full((Tn, Tn), float("-inf")).triu(1)
    prompts = m["adapter_query.weight"].view(LAYERS - 1, Q, DIM)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(LAYERS):
        x = norm(h, f"layers.{i}.attention_norm.weight")
        q = rope(linear(x, i, "attention", "wq").view(B, Tn, HEADS, hd)).transpose(1, 2)
        k = rope(linear(x, i, "attention", "wk").view(B, Tn, HEADS, hd)).transpose(1, 2)
        v = linear(x, i, "attention", "wv").view(B, Tn, HEADS, hd).transpose(1, 2)
        out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v  # (B, H, T, hd)
        if i >= 1:  # layers 1.. carry prompts (query_layer = n_layers - 1)
            P = prompts[i - 1][None] + V  # (B, Q, DIM), token i to prompt i; not normalised
            ak = (P @ w[f"layers.{i}.attention.wk.weight"].T).view(B, Q, HEADS, hd).transpose(1, 2)
            av = (P @ w[f"layers.{i}.attention.wv.weight"].T).view(B, Q, HEADS, hd).transpose(1, 2)
            s = torch.softmax(q @ ak.transpose(-1, -2) / math.sqrt(hd), -1)
            s = s * m[f"llama.layers.{i}.attention.gate"].tanh()
            if w_lora:
                s = s * m.get(f"llama.layers.{i}.attention.new_gate", torch.ones(1))
            out = out + s @ av
        h = h + linear(out.transpose(1, 2).reshape(B, Tn, DIM), i, "attention", "wo")
        x = norm(h, f"layers.{i}.ffn_norm.weight")
        gate = F.silu(linear(x, i, "feed_forward", "w1")) * linear(x, i, "feed_forward", "w3")
        h = h + linear(gate, i, "feed_forward", "w2")
    return norm(h, "norm.weight") @ w["output.weight"].T


def ref_greedy(base, release, clip, ids: list[int], images, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        nxt = int(ref_logits(base, release, clip, torch.tensor([ids + out]), images)[0, -1].argmax())
        if nxt == EOS:
            break
        out.append(nxt)
    return out


# ---- the tests ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("v2_release")
    base = write_base(root)
    clip = write_clip(root / "clip_state_dict.pt")
    return {"root": root, "base": base, "clip": clip}


def bgr_pixels(path: Path) -> torch.Tensor:
    """The release's preprocessing: cv2.imread's BGR array wrapped by Image.fromarray, then CLIP's transform."""
    bgr = Image.fromarray(np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1].copy())
    transform = T.Compose(
        [
            T.Resize(32, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    return transform(bgr)


def picture(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_release_file_loads_and_equals_the_official_forward(world, variant):
    release = release_tensors(variant, seed=2 + VARIANTS.index(variant))
    path = world["root"] / f"{variant}.pth"
    torch.save(release, path)
    model = load_model(world["base"], adapter=path, clip_weights=world["clip"], dtype=torch.float32)
    assert model.config.visual.kind == "query" and model.config.visual.channel_order == "bgr"
    method = model.config.method
    assert (method.lora_rank, method.new_gate) == ((RANK, True) if variant.startswith("LORA") else (0, False))
    assert method.norm_tuning == ("none" if variant == "CAPTION-7B" else "weight") and not method.input_scales
    base = torch.load(world["base"] / "consolidated.00.pth", weights_only=True)
    clip = torch.load(world["clip"], weights_only=True)
    image_files = [picture(world["root"] / f"{variant}-{n}.png", n) for n in range(2)]
    pixels = torch.stack([model.visual.preprocess(p) for p in image_files])
    assert torch.allclose(pixels, torch.stack([bgr_pixels(p) for p in image_files]), atol=1e-6)  # BGR, as cv2
    tokens = torch.tensor([model.tokenizer.encode("Please introduce this painting.", bos=True)] * 2)
    with torch.no_grad():
        ours = model(tokens, pixels)
        theirs = ref_logits(base, release, clip, tokens, pixels)
    assert (ours - theirs).abs().max().item() <= 2e-4
    assert (theirs[0] - theirs[1]).abs().max().item() > 1e-2  # the two images really differ in the output
    ids = tokens[0].tolist()
    steps = 8
    ours_ids = []
    for step in generate_tokens(model, [ids], pixels[:1], max_new_tokens=steps, temperature=0.0, eos_id=EOS):
        if int(step[0]) == EOS:
            break
        ours_ids.append(int(step[0]))
    assert ours_ids == ref_greedy(base, release, clip, ids, pixels[:1], steps) and ours_ids


def test_our_v2_adapter_exports_to_the_release_format_the_official_loader_reads(world, tmp_path):
    release = release_tensors("LORA-BIAS-7B", seed=9)
    path = tmp_path / "in.pth"
    torch.save(release, path)
    model = load_model(world["base"], adapter=path, clip_weights=world["clip"], dtype=torch.float32)
    with torch.no_grad():  # as after training: values the file never held
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    out = write_release_v2(model, tmp_path / "exported.pth")
    # The release loader: torch.load, then the model's own keys must cover the file (strict=False + an assert that
    # nothing is unexpected); its config picks w_lora / lora_rank.
    ckpt = torch.load(out, map_location="cpu")
    assert set(ckpt) == {"model", "config"} and ckpt["config"] == {"w_bias": True, "w_lora": True, "lora_rank": RANK}
    assert set(ckpt["model"]) == set(release["model"])  # every key the release model has, no other
    tokens = torch.tensor([model.tokenizer.encode("Describe the picture.", bos=True)])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    base = torch.load(world["base"] / "consolidated.00.pth", weights_only=True)
    clip = torch.load(world["clip"], weights_only=True)
    with torch.no_grad():
        ours = model(tokens, pixels)
        assert (ours - ref_logits(base, ckpt, clip, tokens, pixels)).abs().max().item() <= 2e-4
        again = load_model(world["base"], adapter=out, clip_weights=world["clip"], dtype=torch.float32)
        assert torch.equal(again(tokens, pixels), ours)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: r["model"].pop("llama.layers.1.ffn_norm.weight"), r"norms present for some layers only"),
        (lambda r: r["model"].update({"llama.layers.0.attention.lora_wq_l1.weight": torch.zeros(RANK, DIM)}),
         r"unexpected keys .*lora_wq_l1\.weight"),
        (lambda r: r["config"].update(lora_rank="16"), r"config lora_rank must be an integer"),
        (lambda r: r["config"].update(w_lora=True, lora_rank=10_000), r"lora_wq_l1\.weight is \(4, 64\); rank 10000"),
        (lambda r: r["model"].update({"visual_query.weight": torch.zeros(Q, WIDTH, dtype=torch.int64)}),
         r"'visual_query\.weight' is not a floating-point tensor"),
        (lambda r: r["model"].pop("llama.layers.2.attention.gate"), r"layers\.2\.attention\.gate is None"),
        (lambda r: r["model"].update({"adapter_query.weight": torch.zeros(7, DIM)}),
         r"adapter_query\.weight has shape"),
    ],
)  # fmt: skip
def test_a_damaged_release_file_names_what_is_wrong(world, tmp_path, damage, message):
    release = release_tensors("LORA-BIAS-7B" if "rank 10000" in message else "BIAS-7B")
    damage(release)
    torch.save(release, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message):
        load_model(world["base"], adapter=tmp_path / "bad.pth", clip_weights=world["clip"])


def test_the_release_needs_its_clip_weights_and_names_the_file(world, tmp_path):
    torch.save(release_tensors("BIAS-7B"), tmp_path / "BIAS-7B.pth")
    with pytest.raises(CheckpointError, match=r"BIAS-7B\.pth: visual path: .*pass clip_weights="):
        load_model(world["base"], adapter=tmp_path / "BIAS-7B.pth")
    text_only = {k: v for k, v in torch.load(world["clip"], weights_only=True).items() if not k.startswith("visual.")}
    torch.save(text_only, tmp_path / "text_tower.pt")
    with pytest.raises(CheckpointError, match=r"text_tower\.pt: not an OpenAI-layout ViT state dict"):
        load_model(world["base"], adapter=tmp_path / "BIAS-7B.pth", clip_weights=tmp_path / "text_tower.pt")


def test_the_demo_and_the_evaluations_take_the_release_file(world, tmp_path):
    from app.__main__ import build_parser, load_engine
    from eval.common import load_run_for_eval

    path = tmp_path / "BIAS-7B.pth"
    torch.save(release_tensors("BIAS-7B"), path)
    argv = ["--checkpoint", str(path), "--base", str(world["base"]), "--clip-weights", str(world["clip"])]
    engine = load_engine(build_parser().parse_args([*argv, "--device", "cpu"]))
    assert "BIAS-7B.pth" in engine.describe() and engine.has_vision
    image = Image.open(picture(tmp_path / "p.png", 3))
    reply = engine.chat([], "Please introduce this painting.", image, temperature=0.0, max_new_tokens=6)
    assert reply.prompt == alpaca_no_input("Please introduce this painting.")
    # The release's single-turn Alpaca prompt, its BGR preprocessing, greedy: the official decode of the same ids.
    model = engine.model
    ids = model.tokenizer.encode(alpaca_no_input("Please introduce this painting."), bos=True)
    base = torch.load(world["base"] / "consolidated.00.pth", weights_only=True)
    clip = torch.load(world["clip"], weights_only=True)
    expected = ref_greedy(base, release_tensors("BIAS-7B"), clip, ids, bgr_pixels(tmp_path / "p.png")[None], 6)
    assert "".join(reply.pieces).strip() == model.tokenizer.decode(expected).strip() and expected
    run = load_run_for_eval(path, base=str(world["base"]), clip_weights=str(world["clip"]), device="cpu")
    assert run.sidecar == {} and len(run.adapter_sha256) == 64 and run.model.config.visual.kind == "query"
    with pytest.raises(ValueError, match=r"BIAS-7B\.pth: not a run directory .* needs --base"):
        load_run_for_eval(path)


def alpaca_no_input(instruction: str) -> str:
    """llama.format_prompt(instruction) of the release, byte for byte."""
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.\n\n### Instruction:\n{instruction}\n\n### Response:"
    )


def test_the_export_command_writes_the_release_file_and_refuses_what_it_cannot_express(world, tmp_path, capsys):
    from model import export

    source = tmp_path / "LORA-BIAS-7B.pth"
    torch.save(release_tensors("LORA-BIAS-7B"), source)
    common = ["--base", str(world["base"]), "--clip-weights", str(world["clip"])]
    assert export.main([str(source), "--to", "release", str(tmp_path / "out.pth"), *common]) == 0
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    unused = {"llama.layers.0.attention.gate", "llama.layers.0.attention.new_gate"}  # layer 0 has no prompts
    for key, value in release_tensors("LORA-BIAS-7B")["model"].items():  # every tensor back under its own name
        assert key in unused or torch.equal(written["model"][key], value.float()), key
    assert not written["model"]["llama.layers.0.attention.gate"].any()
    assert not (set(written["model"]) - set(release_tensors("LORA-BIAS-7B")["model"]))
    v1 = tmp_path / "v1.pth"
    torch.save(
        {"adapter_query.weight": torch.zeros(20, DIM)} | {f"layers.{i}.attention.gate": torch.zeros(1) for i in (1, 2)},
        v1,
    )
    assert export.main([str(v1), "--to", "release", str(tmp_path / "no.pth"), "--base", str(world["base"])]) == 2
    assert "only llama_adapter_v2 adapters have the release format" in capsys.readouterr().err
    assert not (tmp_path / "no.pth").exists()


def test_training_continues_from_a_release_file(world, tmp_path):
    """train.py --model.init_from BIAS-7B.pth: the run starts from the release's tensors (here only the biases
    train, so every other tensor is still the file's at the end)."""
    from safetensors.torch import load_file

    import train
    from data.synthetic_mix import ensure_mix

    release = release_tensors("BIAS-7B")
    torch.save(release, tmp_path / "BIAS-7B.pth")
    v2 = "--model.llama_adapter_v2."
    argv = [
        "--recipe", "demo", "--method", "llama_adapter_v2", "--base", str(world["base"]),
        "--clip-weights", str(world["clip"]), "--data", str(ensure_mix(tmp_path / "mix")),
        f"{v2}prompt_len", str(Q), f"{v2}n_layers", str(LAYERS - 1), f"{v2}input_scales", "false",
        f"{v2}norm_tuning", "weight", "--model.visual.clip_model", "openai", "--model.visual.kind", "query",
        "--model.visual.query_len", str(Q), "--model.visual.query_width", str(WIDTH),
        "--model.visual.query_blocks", str(BLOCKS), "--model.visual.query_heads", "16",
        "--model.visual.channel_order", "bgr",
        "--model.init_from", str(tmp_path / "BIAS-7B.pth"), "--optim.trainable", "adapter_bias",
        "--optim.max_steps", "2", "--optim.batch_size", "2", "--data.max_len", "96", "--run.eval", "false",
        "--run.progress", "false", "--run.out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert train.main(argv) == 0
    saved = load_file(tmp_path / "run" / "adapter.safetensors")
    m = release["model"]
    assert torch.equal(saved["visual.adapter_query.visual_query.weight"], m["visual_query.weight"])
    assert torch.equal(saved["layers.2.attention.adapter_gate"], m["llama.layers.2.attention.gate"].float().flatten())
    assert torch.equal(saved["norm.adapter_norm_weight"], m["llama.norm.weight"])
    assert not torch.equal(saved["layers.1.attention.wq.adapter_bias"], m["llama.layers.1.attention.wq.bias"])


def test_openais_torchscript_clip_is_refused_with_the_one_line_conversion(world, tmp_path):
    import zipfile

    torch.save(release_tensors("BIAS-7B"), tmp_path / "BIAS-7B.pth")
    with zipfile.ZipFile(tmp_path / "ViT-L-14.pt", "w") as archive:  # the layout of a TorchScript archive
        archive.writestr("ViT-L-14/constants.pkl", b"")
        archive.writestr("ViT-L-14/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match=r"TorchScript archive .*torch\.save\(torch\.jit\.load\(PATH"):
        load_model(world["base"], adapter=tmp_path / "BIAS-7B.pth", clip_weights=tmp_path / "ViT-L-14.pt")


def test_the_evaluations_score_a_release_file(world, tmp_path):
    from data.synthetic import make_coco
    from eval import coco, scienceqa
    from tests.test_eval_scienceqa import write_scienceqa

    torch.save(release_tensors("BIAS-7B"), tmp_path / "BIAS-7B.pth")
    model_args = ["--checkpoint", str(tmp_path / "BIAS-7B.pth"), "--base", str(world["base"]),
                  "--clip-weights", str(world["clip"]), "--device", "cpu", "--max-new-tokens", "4"]  # fmt: skip
    sqa = write_scienceqa(tmp_path / "scienceqa")
    assert scienceqa.main([*model_args, "--data", str(sqa), "--output", str(tmp_path / "sqa")]) == 0
    metrics = json.loads((tmp_path / "sqa" / "metrics.json").read_text())
    assert metrics["counts"]["Avg"]["total"] == 8  # the crafted test split, scored (a random model: any accuracy)
    root = make_coco(tmp_path / "coco", n_train=1, n_restval=1, n_val=1, n_test=2, image_size=32)
    argv = [*model_args, "--annotations", str(root / "dataset_coco.json"), "--output", str(tmp_path / "cap")]
    assert coco.main(argv) == 0
    assert len(json.loads((tmp_path / "cap" / "predictions.json").read_text())) == 2
