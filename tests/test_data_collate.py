"""data/collate.py: exact label mask, truncation that keeps the answer, padding, images."""

import io

import pytest
import torch
from PIL import Image

from data import DataError
from data.collate import (
    IGNORE_INDEX,
    Collator,
    Example,
    TargetTooLongError,
    drop_overlong,
)
from data.prompts import format_prompt
from data.scienceqa import load_problems, to_example
from data.synthetic import make_scienceqa, synthetic_corpus, train_tokenizer
from model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_tokenizer(synthetic_corpus(n=400), tmp_path_factory.mktemp("tok") / "t.model"))


@pytest.fixture(scope="module")
def sqa(tmp_path_factory):
    return make_scienceqa(tmp_path_factory.mktemp("sqa") / "scienceqa", n_train=24, n_val=4, n_test=4)


def mean_color(img) -> torch.Tensor:
    """A stand-in image transform: path / file object / PIL image -> (3, 2, 2) mean colour."""
    pil = img if isinstance(img, Image.Image) else Image.open(img)
    rgb = torch.tensor(list(pil.convert("RGB").resize((1, 1)).getpixel((0, 0))), dtype=torch.float32) / 255
    return rgb[:, None, None].expand(3, 2, 2).clone()


def test_labels_cover_exactly_the_answer_and_eos(tok, sqa):
    examples = [to_example(p) for p in load_problems(sqa, "train")[:8]]
    examples.append(Example(format_prompt("Name a color.", "red or car"), "Red is a color.", None, {"index": 0}))
    batch = Collator(tok, 256, image_transform=mean_color)(examples)
    tokens, labels = batch["tokens"], batch["labels"]
    assert tokens.shape == labels.shape and tokens.dtype == labels.dtype == torch.long
    for row, ex in enumerate(examples):
        n = int(batch["lengths"][row])
        supervised = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        prompt_ids = tok.encode(ex.prompt, bos=True)
        assert tokens[row, : len(prompt_ids)].tolist() == prompt_ids  # the prompt exactly as inference encodes it
        assert supervised == list(range(len(prompt_ids), n))  # contiguous: answer tokens then EOS, nothing else
        assert labels[row, supervised].tolist() == tokens[row, supervised].tolist()
        assert labels[row, n - 1] == tok.eos_id
        assert tok.decode(tokens[row, supervised[:-1]].tolist()) == ex.target
        assert tok.decode(tokens[row, :n].tolist()) == f"{ex.prompt} {ex.target}"  # the target's dummy-prefix space
    # the training loss shifts by one: the last prompt token predicts the first answer token
    shifted = labels[:, 1:]
    first = (shifted[0] != IGNORE_INDEX).nonzero()[0].item()
    assert first == len(tok.encode(examples[0].prompt, bos=True)) - 1


def test_padding_uses_pad_id_or_zero_and_ignore_index_in_labels(tok):
    examples = [Example("Question: short?\nAnswer:", "The answer is (A)"), Example("Q: " + "red " * 20, "blue")]
    batch = Collator(tok, 256)(examples)
    n0, n1 = batch["lengths"].tolist()
    assert n0 < n1 == batch["tokens"].shape[1]
    assert batch["tokens"][0, n0:].eq(0).all() and batch["labels"][0, n0:].eq(IGNORE_INDEX).all()
    assert not batch["labels"].eq(0).any()  # token 0 is never used as an ignore marker

    class WithPad:
        bos_id, eos_id, pad_id = tok.bos_id, tok.eos_id, 3
        encode = staticmethod(tok.encode)

    padded = Collator(WithPad(), 256)(examples)
    assert padded["tokens"][0, n0:].eq(3).all()
    assert padded["tokens"][:, :n0].equal(batch["tokens"][:, :n0])


@pytest.mark.parametrize("truncation", ["middle", "left"])
def test_truncation_keeps_bos_answer_and_eos(tok, truncation):
    ex = Example("Question: " + " ".join(f"word{i}" for i in range(40)) + "\nAnswer:", "The answer is (C)", None)
    prompt = tok.encode(ex.prompt, bos=True)
    target = tok.encode(ex.target, bos=False, eos=True)
    max_len = len(target) + 21
    collator = Collator(tok, max_len, truncation=truncation)
    enc = collator.encode(ex)
    assert len(enc.tokens) == max_len and enc.n_cut == len(prompt) - 21
    assert enc.tokens[0] == tok.bos_id and enc.tokens[enc.n_prompt :] == target
    body = prompt[1:]
    if truncation == "middle":  # the start of the question and the "Answer:" cue survive
        assert enc.tokens[1 : enc.n_prompt] == body[:10] + body[-10:]
    else:
        assert enc.tokens[1 : enc.n_prompt] == body[-20:]
    batch = collator([ex, Example("Question: hi\nAnswer:", "The answer is (A)")])
    assert collator.n_truncated == 1
    assert batch["labels"][0, -len(target) :].tolist() == target
    assert Collator(tok, len(target) + 1).encode(ex).tokens == [tok.bos_id, *target]  # only BOS left of the prompt


def test_target_that_cannot_fit_is_an_error_or_dropped_with_a_count(tok):
    long = Example("Question: why?\nAnswer:", "because " * 30, None, {"pid": "42"})
    ok = Example("Question: why?\nAnswer:", "The answer is (A)", None, {"pid": "43"})
    collator = Collator(tok, 16)
    message = r"example pid=42: the target and EOS alone take \d+ tokens \(\+ BOS\), more than max_len=16"
    with pytest.raises(TargetTooLongError, match=message):
        collator([ok, long])
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 examples .* max_len=16 \(first: example pid=42\)"):
        assert drop_overlong([ok, long], collator) == [ok]


def test_text_that_is_not_unicode_is_a_data_error_naming_the_example(tok):
    collator = Collator(tok, 64)
    with pytest.raises(DataError) as info:  # the tokenizer itself would raise a raw pybind11 RuntimeError
        collator(
            [Example("Question: why?\nAnswer:", "A", None, {"pid": "1"}), Example("Q \ud800?", "A", None, {"pid": "2"})]
        )
    assert str(info.value) == "example pid=2: the prompt holds a lone surrogate \\ud800, which is not text"
    with pytest.raises(DataError) as info:
        collator.encode(Example("Question?", "The answer \udfff", None, {"index": 7}))
    assert str(info.value) == "example index=7: the target holds a lone surrogate \\udfff, which is not text"


def test_images_transformed_and_text_only_rows_masked(tok, sqa, tmp_path):
    problems = load_problems(sqa, "train")
    with_image = next(p for p in problems if p.has_image)
    text_only = next(p for p in problems if not p.has_image)
    png = with_image.image_path.read_bytes()
    pil = Image.open(io.BytesIO(png))
    examples = [to_example(with_image), to_example(text_only), Example("a", "b", png), Example("a", "b", pil)]
    batch = Collator(tok, 128, image_transform=mean_color)(examples)
    assert batch["image_mask"].tolist() == [True, False, True, True]
    assert batch["images"].shape == (4, 3, 2, 2) and batch["images"].dtype == torch.float32
    expected = mean_color(with_image.image_path)
    for row in (0, 2, 3):  # path, encoded bytes and PIL image give the same pixels
        assert torch.equal(batch["images"][row], expected)
    assert batch["images"][1].eq(0).all()
    text = Collator(tok, 128, image_transform=mean_color)([to_example(text_only)])
    assert text["images"] is None and text["image_mask"].tolist() == [False]


def test_image_errors_name_the_example(tok, sqa, tmp_path):
    p = next(p for p in load_problems(sqa, "train") if p.has_image)
    with pytest.raises(DataError, match=f"example pid={p.pid} has an image but the Collator has no image_transform"):
        Collator(tok, 128)([to_example(p)])
    missing = tmp_path / "gone.png"
    with pytest.raises(DataError, match=f"example pid=9: image {missing}:"):
        Collator(tok, 128, image_transform=mean_color)([Example("a", "b", missing, {"pid": "9"})])


def test_real_visual_preprocess_is_a_valid_image_transform(tok, sqa):
    from model.config import VisualConfig
    from model.visual import build_visual

    visual = build_visual(VisualConfig(clip_model="tiny"), 64)
    problems = [p for p in load_problems(sqa, "train") if p.has_image][:2]
    examples = [to_example(problems[0]), Example("a", "b", problems[1].image_path.read_bytes())]
    batch = Collator(tok, 128, image_transform=visual.preprocess)(examples)
    assert torch.equal(batch["images"][0], visual.preprocess(problems[0].image_path))
    assert torch.equal(batch["images"][1], visual.preprocess(problems[1].image_path))
