"""model/visual.py: the frozen CLIP tower, the trainable projection, preprocessing and image loading."""

import struct
import zlib

import numpy as np
import open_clip
import open_clip.factory
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from model.config import ModelConfig, VisualConfig, preset
from model.llama import Transformer, count_trainable, is_trainable
from model.visual import (
    MAX_IMAGE_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageLoadError,
    build_visual,
    default_feature_layers,
    load_image,
)


def tiny_mm(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny")
    cfg.visual = VisualConfig(clip_model="tiny")
    return Transformer(cfg, visual=build_visual(cfg.visual, cfg.llama.dim)).eval()


def randomize_gates(model: Transformer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter_gate"):
                p.copy_(torch.randn(p.shape, generator=g))


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- the tower and the projection -----------------------------------------------------------------------------
def test_tiny_tower_is_the_same_on_every_build():
    torch.manual_seed(1)
    a = build_visual(VisualConfig(clip_model="tiny"), 64)
    torch.manual_seed(2)
    b = build_visual(VisualConfig(clip_model="tiny"), 64)
    sa, sb = a.clip.state_dict(), b.clip.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the trainable projection is initialised from the caller's RNG, like the adaption prompts
    assert not torch.equal(a.adapter_proj[0].weight, b.adapter_proj[0].weight)
    assert a.image_size == 32 and a.feature_layers == (0, 1) and a.feature_dim == 64 + 2 * 64


def test_clip_is_frozen_and_train_mode_does_not_reach_it():
    model = tiny_mm()
    model.train()
    assert model.visual.training and model.visual.adapter_proj.training
    assert not any(m.training for m in model.visual.clip.modules())
    assert not any(p.requires_grad for p in model.visual.clip.parameters())
    visual_trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("visual.")}
    assert visual_trainable == {f"visual.adapter_proj.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert all(is_trainable(n) for n in visual_trainable)
    images = random_images(2)
    train_out = model.visual(images)
    model.eval()
    assert torch.equal(train_out, model.visual(images))


def test_features_are_pooled_output_and_normalised_class_tokens():
    visual = build_visual(VisualConfig(clip_model="tiny"), 64)
    images = random_images(3)
    feats = visual.clip_features(images)
    assert feats.shape == (3, 192) and not feats.requires_grad
    clip = visual.clip
    with torch.no_grad():
        torch.testing.assert_close(feats[:, :64], clip(images), rtol=0, atol=0)
        x = clip._embeds(images)  # (B, 1 + 16, 64): class token first
        for i, block in enumerate(clip.transformer.resblocks[:2]):
            x = block(x)
            torch.testing.assert_close(feats[:, 64 * (i + 1) : 64 * (i + 2)], F.layer_norm(x[:, 0], (64,)))
    assert visual(images).shape == (3, 1, 64)  # one visual token per image (kind global)


def test_default_feature_layers():
    assert default_feature_layers(24) == (7, 15)  # ViT-L/14
    assert default_feature_layers(12) == (3, 7)
    assert default_feature_layers(3) == (0, 1)  # tiny
    assert default_feature_layers(2) == (0,)
    assert default_feature_layers(1) == ()


def test_seven_b_with_vit_l14_trainable_count_on_meta_device():
    cfg = preset("7B")
    cfg.visual = VisualConfig()  # ViT-L-14-quickgelu, feature layers (7, 15), hidden 80
    with torch.device("meta"):
        model = Transformer(cfg, visual=build_visual(cfg.visual, cfg.llama.dim))
    assert model.visual.feature_layers == (7, 15) and model.visual.image_size == 224
    feature_dim = 768 + 2 * 1024  # pooled (projected) output + two class tokens of width 1024
    proj = (feature_dim * 80 + 80) + (80 * 4096 + 4096)
    prompts, gates = 30 * 10 * 4096, 30 * 32
    assert (feature_dim, proj, prompts, gates) == (2816, 557_136, 1_228_800, 960)
    # paper V1: 1.79M trainable (Table 4, L=30), of which ~0.6M is the projection
    assert count_trainable(model) == prompts + gates + proj == 1_786_896


def test_non_vit_tower_uses_pooled_output_only():
    with torch.device("meta"):
        visual = build_visual(VisualConfig(clip_model="RN50"), 4096)
        assert visual.feature_layers == () and visual.feature_dim == 1024
        with pytest.raises(ValueError, match="needs a ViT tower"):
            build_visual(VisualConfig(clip_model="RN50", feature_layers=(1,)), 4096)


# ---- towers from open_clip with local weights -----------------------------------------------------------------
TEST_CLIP = "test-tiny-clip"
TEST_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def test_clip(monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TEST_CLIP, TEST_CLIP_CFG)
    torch.manual_seed(5)
    return open_clip.create_model(TEST_CLIP)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_tower_loads_local_weights(test_clip, tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in test_clip.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    visual = build_visual(VisualConfig(clip_model=TEST_CLIP, feature_layers=(0,)), 48, clip_weights=path)
    loaded = visual.clip.state_dict()
    assert loaded.keys() == {k.removeprefix("visual.") for k in state if k.startswith("visual.")}
    assert all(torch.equal(loaded[k], state[f"visual.{k}"]) for k in loaded)
    assert visual.feature_dim == 32 + 64 and visual(random_images(2)).shape == (2, 1, 48)


def test_open_clip_tower_errors(test_clip, tmp_path):
    cfg = VisualConfig(clip_model=TEST_CLIP)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_visual(cfg, 48, clip_weights=tmp_path / "missing.safetensors")
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="do not fit open_clip model test-tiny-clip"):
        build_visual(cfg, 48, clip_weights=wrong)
    scripted = tmp_path / "ViT-L-14.pt"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated, but OpenAI's release is such an archive
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(ValueError, match="TorchScript archive"):
        build_visual(cfg, 48, clip_weights=scripted)
    with pytest.raises(ValueError, match="out of range: test-tiny-clip has 2 blocks"):
        build_visual(VisualConfig(clip_model=TEST_CLIP, feature_layers=(0, 5)), 48, random_clip=True)
    with pytest.raises(ValueError, match="unknown CLIP model 'hf-hub:someone/clip'"):
        build_visual(VisualConfig(clip_model="hf-hub:someone/clip"), 48)
    with pytest.raises(ValueError, match="takes no clip_weights"):
        build_visual(VisualConfig(clip_model="tiny"), 48, clip_weights=wrong)


def test_clip_tower_without_weights_is_refused_unless_random_is_asked_for(test_clip):
    cfg = VisualConfig(clip_model=TEST_CLIP, feature_layers=(0,))
    with pytest.raises(ValueError) as e:
        build_visual(cfg, 48)
    assert str(e.value) == (
        "CLIP model 'test-tiny-clip' needs its weights: pass a local weights file (clip_weights=, --clip-weights); "
        "random_clip=True builds a randomly initialised tower instead, which only benchmarks want"
    )
    assert build_visual(cfg, 48, random_clip=True)(random_images(2)).shape == (2, 1, 48)
    with torch.device("meta"):  # shapes only: allowed without weights, nothing is allocated
        assert build_visual(cfg, 48).feature_dim == 32 + 64


class Opaque:
    """A class that weights-only loading does not allow."""


def test_clip_weights_holding_other_objects_are_refused_without_the_unsafe_hint(test_clip, tmp_path):
    torch.save({"visual.proj": Opaque()}, tmp_path / "clip.pt")
    with pytest.raises(ValueError) as e:
        build_visual(VisualConfig(clip_model=TEST_CLIP), 48, clip_weights=tmp_path / "clip.pt")
    assert str(e.value) == (
        f"CLIP weights {tmp_path / 'clip.pt'}: refused: the file holds Python objects other than tensors, which are "
        "never unpickled here (Unsupported global: GLOBAL tests.test_visual.Opaque was not an allowed global by "
        "default.)"
    )


def test_visual_config_validation():
    with pytest.raises(ValueError, match="feature_layers must be block indices"):
        VisualConfig(feature_layers=(-1,))
    with pytest.raises(ValueError, match="repeated"):
        VisualConfig(feature_layers=[3, 3])
    with pytest.raises(ValueError, match="proj_hidden"):
        VisualConfig(proj_hidden=0)
    assert VisualConfig(feature_layers=[1, 2]).feature_layers == (1, 2)  # from JSON


# ---- the model with a visual prompt ---------------------------------------------------------------------------
def test_zero_init_multimodal_model_is_exactly_the_text_model():
    model = tiny_mm()
    base = Transformer(ModelConfig(llama=model.config.llama)).eval()  # no method: the plain base model
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not is_trainable(k) and "visual." not in k})
    tokens = torch.randint(0, 512, (3, 11))
    images = random_images(3)
    with torch.no_grad():
        reference = base(tokens)
        assert torch.equal(model(tokens), reference)
        assert torch.equal(model(tokens, images), reference)
        assert torch.equal(model(tokens, images, image_mask=torch.tensor([True, False, True])), reference)


def test_rows_without_image_take_the_text_path_in_a_mixed_batch():
    model = tiny_mm()
    randomize_gates(model)
    tokens = torch.randint(0, 512, (2, 9))
    images = random_images(2)
    with torch.no_grad():
        text_only = model(tokens)
        mixed = model(tokens, images, image_mask=torch.tensor([True, False]))
    # same values as the text path (not bitwise: the prompt projection runs as a (B, K, dim) batch here)
    torch.testing.assert_close(mixed[1], text_only[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(mixed[0], text_only[0], atol=1e-3)


def test_training_makes_the_image_matter():
    model = tiny_mm()
    model.train()
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.Adam(params, lr=5e-2)  # high enough for the zero-init gates to open in a few steps
    tokens = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(3))
    images = random_images(2, seed=4)
    targets = torch.tensor([7, 99])  # the next token depends only on the image
    proj_grads = []
    for _ in range(6):
        optimizer.zero_grad()
        logits = model(tokens, images)[:, -1]
        F.cross_entropy(logits, targets).backward()
        proj_grads.append(model.visual.adapter_proj[0].weight.grad.abs().sum().item())
        optimizer.step()
    # step 0: gates are exactly zero so nothing reaches the visual path; once they open, it learns
    assert proj_grads[0] == 0 and all(g > 0 for g in proj_grads[1:])
    assert all(not p.requires_grad and p.grad is None for p in model.visual.clip.parameters())
    model.eval()
    same_text = tokens[:1].expand(2, -1)
    with torch.no_grad():
        logits = model(same_text, images)[:, -1]
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)
    assert logits[0, 7] - logits[1, 7] > 0 and logits[1, 99] - logits[0, 99] > 0


# ---- preprocessing --------------------------------------------------------------------------------------------
def test_preprocess_matches_open_clip_inference_transform(tmp_path):
    visual = build_visual(VisualConfig(clip_model="tiny"), 64)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8))
    reference = open_clip.image_transform(32, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)(rgb)
    assert torch.equal(visual.preprocess(rgb), reference)
    rgb.save(tmp_path / "x.png")
    assert torch.equal(visual.preprocess(tmp_path / "x.png"), reference)
    assert reference.shape == (3, 32, 32)


def save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0)),
        (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),  # half black on white
        (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        (lambda: Image.new("RGB", (4, 4), (10, 200, 30)).quantize(4), (10, 200, 30)),  # palette
        (lambda: Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)), (128, 128, 128)),  # 16-bit, not 255
        (lambda: Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), (255, 255, 255)),
    ],
)
def test_image_modes_load_as_rgb(tmp_path, make, expected):
    path = save(make(), tmp_path / "img.png")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (4, 4) and img.getpixel((1, 1)) == expected


def test_palette_with_transparency_and_cmyk(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255])
    assert load_image(save(pal, tmp_path / "p.png", transparency=1)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(save(pal, tmp_path / "p_opaque.png")).getpixel((0, 0)) == (0, 0, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # full magenta + yellow = red
    assert load_image(save(cmyk, tmp_path / "c.tif")).getpixel((0, 0)) == (255, 0, 0)
    jpeg = load_image(save(cmyk, tmp_path / "c.jpg", quality=100)).getpixel((0, 0))
    assert jpeg[0] > 240 and jpeg[1] < 15 and jpeg[2] < 15


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = save(img, tmp_path / "phone.jpg", exif=exif)
    assert Image.open(path).size == (6, 2) and load_image(path).size == (2, 6)


# ---- broken files -----------------------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_broken_image_files_give_clear_errors(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for name in ("photo.jpg", "photo.png"):
        data = save(rgb, tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageLoadError, match=f"image file .*cut_{name} is truncated or corrupt"):
            load_image(tmp_path / f"cut_{name}")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty.png is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("this is text, not an image\n")
    with pytest.raises(ImageLoadError, match="notes.png is not an image file"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")
    with pytest.raises(ImageLoadError, match="is not a file"):
        load_image(tmp_path)
    save(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), tmp_path / "float.tif")
    with pytest.raises(ImageLoadError, match="float.tif: floating-point images"):
        load_image(tmp_path / "float.tif")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    side = 10_000  # 100M pixels: over our limit, under twice Pillow's (where Pillow raises by itself)
    assert MAX_IMAGE_PIXELS < side * side < 2 * Image.MAX_IMAGE_PIXELS
    (tmp_path / "bomb.png").write_bytes(png_header_only(side, side))
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageLoadError, match="bomb.png is 10000x10000"):
        load_image(tmp_path / "bomb.png")
    (tmp_path / "huge.png").write_bytes(png_header_only(40_000, 40_000))
    with pytest.raises(ImageLoadError, match="huge.png is too large to decode safely"):
        load_image(tmp_path / "huge.png")
    (tmp_path / "small.png").write_bytes(png_header_only(64, 64))
    with pytest.raises(ImageLoadError, match="small.png is 64x64 = 4,096 pixels, over the limit of 1,000"):
        load_image(tmp_path / "small.png", max_pixels=1000)


def test_file_objects_are_accepted(tmp_path):
    path = save(Image.new("L", (3, 5), 9), tmp_path / "g.png")
    with open(path, "rb") as f:
        assert load_image(f).getpixel((0, 0)) == (9, 9, 9)
    with open(tmp_path / "g.png", "rb") as f, pytest.raises(ImageLoadError, match="g.png"):
        load_image(f, max_pixels=10)
