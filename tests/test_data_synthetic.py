"""data/synthetic/: deterministic real-format datasets whose image answers live in the image, and the tokenizer."""

import collections
import filecmp
import os

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from data import DataError
from data.scienceqa import build_prompt, load_problems
from data.synthetic import (
    COLORS,
    Drawing,
    ensure_scienceqa,
    make_coco,
    make_scienceqa,
    scienceqa_drafts,
    synthetic_corpus,
    train_tokenizer,
)
from model.tokenizer import load_tokenizer

GROUPS = {
    "NAT": lambda p: p.subject == "natural science",
    "SOC": lambda p: p.subject == "social science",
    "LAN": lambda p: p.subject == "language science",
    "TXT": lambda p: bool(p.hint),
    "IMG": lambda p: p.has_image,
    "NO": lambda p: not p.hint and not p.has_image,
    "G1-6": lambda p: int(p.grade[5:]) <= 6,
    "G7-12": lambda p: int(p.grade[5:]) >= 7,
}


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    """The dataset the embedded training run uses (default sizes)."""
    return ensure_scienceqa(tmp_path_factory.mktemp("default") / "scienceqa", seed=0)


def test_default_dataset_populates_every_scienceqa_group(default):
    sizes = {"train": 1600, "val": 300, "test": 300}
    for split, size in sizes.items():
        problems = load_problems(default, split)
        assert len(problems) == size
        assert 0.4 < sum(p.has_image for p in problems) / size < 0.6
        counts = {g: sum(map(test, problems)) for g, test in GROUPS.items()}
        assert min(counts.values()) >= 0.05 * size, (split, counts)
        assert any(p.lecture for p in problems) and all(p.solution for p in problems)
        assert any(p.hint and p.has_image for p in problems)  # TXT and IMG overlap, as in ScienceQA


def test_image_answers_are_not_in_the_text_and_letters_are_balanced():
    drafts = [d.record for d in scienceqa_drafts(seed=0, n=20000) if d.drawing is not None]
    # The options are the only text that could carry the answer (question wording never depends on it): the best a
    # text-only reader can do is the majority answer for each option list, which must stay at chance level.
    by_options = collections.defaultdict(list)
    for rec in drafts:
        by_options[tuple(rec["choices"])].append(rec["answer"])
    text_only_best = sum(max(collections.Counter(a).values()) for a in by_options.values()) / len(drafts)
    chance = np.mean([1 / len(rec["choices"]) for rec in drafts])
    assert text_only_best < chance + 0.02, (text_only_best, chance)
    assert {len(rec["choices"]) for rec in drafts} == {2, 4}
    for n_choices in (2, 4):
        letters = collections.Counter(rec["answer"] for rec in drafts if len(rec["choices"]) == n_choices)
        expected = sum(letters.values()) / n_choices
        assert len(letters) == n_choices and min(letters.values()) > 0.9 * expected, (n_choices, letters)


def test_images_show_the_answer(default):
    """Colour questions: the shape's pixels are nearest to the answer colour. Size questions: a big shape covers
    over 30% of the image, a small one under a tenth."""
    checked = collections.Counter()
    for p in load_problems(default, "val"):
        if not p.has_image:
            continue
        pixels = np.asarray(Image.open(p.image_path).convert("RGB")).astype(int)  # (H, W, 3)
        assert pixels.shape == (64, 64, 3)
        answer = p.choices[p.answer]
        shape = pixels.min(axis=2) < 200  # the background is light grey / white
        if answer in COLORS:
            dist = {c: np.abs(pixels[shape] - np.array(rgb)).sum(axis=1).mean() for c, rgb in COLORS.items()}
            assert min(dist, key=dist.get) == answer and shape.mean() > 0.2, p.pid
            checked["color"] += 1
        else:
            assert shape.mean() > 0.3 if answer in ("big", "large") else shape.mean() < 0.1, (p.pid, shape.mean())
            checked["size"] += 1
    assert checked["color"] > 60 and checked["size"] > 40, checked


def test_prompts_are_short_with_the_512_piece_tokenizer(default, tmp_path):
    tok = load_tokenizer(train_tokenizer(synthetic_corpus(seed=0), tmp_path / "tokenizer.model", vocab_size=512))
    lengths = [len(tok.encode(build_prompt(p))) for p in load_problems(default, "train")]
    assert max(lengths) < 100 and np.mean(lengths) < 60


def test_generation_is_deterministic_and_atomic(tmp_path):
    a = make_scienceqa(tmp_path / "a", seed=5, n_train=20, n_val=5, n_test=5)
    b = make_scienceqa(tmp_path / "b", seed=5, n_train=20, n_val=5, n_test=5)
    c = make_scienceqa(tmp_path / "c", seed=6, n_train=20, n_val=5, n_test=5)
    files = sorted(str(f.relative_to(a)) for f in a.rglob("*") if f.is_file())
    assert files == sorted(str(f.relative_to(b)) for f in b.rglob("*") if f.is_file())
    assert filecmp.cmpfiles(a, b, files, shallow=False)[0] == files
    assert (a / "problems.json").read_bytes() != (c / "problems.json").read_bytes()
    coco1, coco2 = make_coco(tmp_path / "coco1", seed=1), make_coco(tmp_path / "coco2", seed=1)
    assert (coco1 / "dataset_coco.json").read_bytes() == (coco2 / "dataset_coco.json").read_bytes()

    with pytest.raises(DataError, match=f"{a}: already exists and is not an empty folder"):
        make_scienceqa(a, n_train=2, n_val=1, n_test=1)

    def broken(self, image_size):
        raise RuntimeError("disk full")

    original = Drawing.render
    Drawing.render = broken
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            make_scienceqa(tmp_path / "d", n_train=4, n_val=1, n_test=1)
    finally:
        Drawing.render = original
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "coco1", "coco2"]  # nothing half-written left behind


def test_ensure_generates_only_when_absent(tmp_path):
    root = ensure_scienceqa(tmp_path / "sqa", seed=0, n_train=6, n_val=2, n_test=2)
    stamp = (root / "problems.json").stat().st_mtime_ns
    assert ensure_scienceqa(root, seed=0, n_train=6, n_val=2, n_test=2) == root
    assert (root / "problems.json").stat().st_mtime_ns == stamp
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists and is not an empty folder"):
        ensure_scienceqa(tmp_path / "other", n_train=6, n_val=2, n_test=2)


def test_scienceqa_drafts_match_the_written_problems(tmp_path):
    root = make_scienceqa(tmp_path / "s", seed=2, n_train=8, n_val=2, n_test=2)
    drafts = scienceqa_drafts(2, 12)
    by_pid = {p.pid: p for s in ("train", "val", "test") for p in load_problems(root, s)}
    for pid, draft in enumerate(drafts, start=1):
        assert by_pid[str(pid)].question == draft.record["question"]
        assert by_pid[str(pid)].has_image == (draft.drawing is not None)


def test_train_tokenizer_exact_size_special_ids_and_determinism(tmp_path):
    corpus = synthetic_corpus(seed=0, n=500)
    first = train_tokenizer(corpus, tmp_path / "a.model", vocab_size=512)
    second = train_tokenizer(corpus, tmp_path / "b.model", vocab_size=512)
    assert first.read_bytes() == second.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(first))
    assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (512, 0, 1, 2, -1)
    assert sp.decode(sp.encode("line one\n  line two")) == "line one\n  line two"  # identity normalization
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(corpus))
    (tmp_path / "dir").mkdir()
    assert train_tokenizer(corpus_file, tmp_path / "dir", vocab_size=400) == tmp_path / "dir" / "tokenizer.model"
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "dir" / "tokenizer.model")).vocab_size() == 400


def test_train_tokenizer_fails_clearly_on_a_small_corpus(tmp_path):
    texts = ["a tiny corpus", "of two lines"]
    with pytest.raises(
        DataError,
        match=r"cannot train a 512-piece tokenizer on the given texts \(2 sentences\): the "
        r"text supports at most \d+ pieces; give more",
    ):
        train_tokenizer(texts, tmp_path / "t.model", vocab_size=512)
    with pytest.raises(DataError, match=r"vocab_size must be at least 275 for this text \(256 byte-fallback pieces"):
        train_tokenizer(texts, tmp_path / "t.model", vocab_size=100)
    with pytest.raises(DataError, match="no text to train a tokenizer on"):
        train_tokenizer(["", "  "], tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()
