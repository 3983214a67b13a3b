"""Fixtures and builders shared by several test modules."""

from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from PIL import Image

from data.synthetic import synthetic_corpus, train_tokenizer
from model import load_model, save_adapter


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked ``early`` (minutes of training in a fixture) run first: `make test` runs the suite on two
    workers, one module at a time each, in this order, and the longest module must not start last."""
    items.sort(key=lambda item: item.get_closest_marker("early") is None)


@pytest.fixture(scope="module")
def one_thread():
    """Decoding a tiny model is hundreds of microsecond-sized ops; with other processes on the 2 cores, OpenMP's
    spinning threads make each op many times slower, one thread keeps it steady. Modules that decode use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_spm(lines: list[str], prefix: Path, vocab_size: int, *, byte_fallback: bool = True) -> Path:
    """A BPE sentencepiece model with LLaMA's special ids (unk 0, bos 1, eos 2, no pad) trained on ``lines``;
    returns ``prefix``.model."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=byte_fallback, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    return Path(f"{prefix}.model")


def make_tiny_run(folder: Path, *, visual: bool = True) -> Path:
    """A run directory as train.py leaves it: tiny preset base (seed 0), random adapter tensors (gates open, so the
    prompts and images change the output), the synthetic-data tokenizer recorded in adapter.json."""
    tokenizer = train_tokenizer(synthetic_corpus(n=200), folder.parent / f"{folder.name}-tokenizer.model")
    model = load_model("tiny", clip="tiny" if visual else None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    save_adapter(model, folder, base="tiny", tokenizer=tokenizer, prompt_format="llama_adapter", extra={"seed": 0})
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny run directory (make_tiny_run), shared by the tests of one module."""
    return make_tiny_run(tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Hugging Face LlamaForCausalLM folder (tests.test_checkpoint.make_hf_model), shared by the tests of one
    module."""
    from tests.test_checkpoint import make_hf_model  # imports transformers: only for the modules that use it

    folder = tmp_path_factory.mktemp("hf")
    make_hf_model().save_pretrained(folder)
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A real image file outside every dataset folder of a test: what a hostile image path points at."""
    outside = tmp_path / "outside" / "secret.png"
    outside.parent.mkdir()
    Image.new("RGB", (4, 4)).save(outside)
    return outside
