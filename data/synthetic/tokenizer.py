"""A tiny sentencepiece tokenizer for the synthetic datasets.

- ``train_tokenizer``: a sentencepiece BPE model like Meta's (unk 0, bos 1, eos 2, no pad, byte fallback, identity
  normalization so newlines and runs of spaces survive) with exactly ``vocab_size`` pieces.
- ``synthetic_corpus``: text covering everything the generators write.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterable
from pathlib import Path

from data import DataError
from data.coco import CAPTION_INSTRUCTION, caption_prompt
from data.prompts import format_prompt
from data.synthetic.alpaca import alpaca_records
from data.synthetic.coco import caption_variants
from data.synthetic.scienceqa import scienceqa_drafts


def synthetic_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Text covering everything the generators write: ScienceQA prompts and targets in every format, lectures,
    solutions, captions, the COCO caption prompt and Alpaca prompts / outputs."""
    from data.scienceqa import FORMATS, Problem, build_prompt, build_target

    texts: list[str] = []
    for i, draft in enumerate(scienceqa_drafts(seed, n)):
        fields = {k: v for k, v in draft.record.items() if k != "image"}
        problem = Problem(pid=str(i), image_path=None, split="train", **fields)
        # the default format for every problem, and each other format in turn
        for fmt in ("llama_adapter", FORMATS[1 + i % (len(FORMATS) - 1)]):
            texts += [build_prompt(problem, fmt), build_target(problem, fmt)]
        if draft.drawing is not None:
            texts += caption_variants(random.Random(i), draft.drawing, 3)
    texts.append(caption_prompt())
    texts.append(format_prompt(CAPTION_INSTRUCTION, "input"))
    for rec in alpaca_records(seed, min(n, 500)):
        texts += [format_prompt(rec["instruction"], rec["input"]), rec["output"]]
    return texts


def _explain_trainer_error(message: str) -> str:
    """sentencepiece's two size errors, in terms a caller can act on."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
    if too_high:
        return f"the text supports at most {too_high.group(2)} pieces; give more (or more varied) text"
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return (
            f"vocab_size must be at least {too_small.group(2)} for this text (256 byte-fallback pieces, one per "
            "character and 3 special pieces)"
        )
    return message


def train_tokenizer(texts: Iterable[str] | str | Path, out_path: str | Path, vocab_size: int = 512) -> Path:
    """Train a sentencepiece BPE tokenizer like Meta's (unk 0, bos 1, eos 2, no pad, byte fallback) with exactly
    ``vocab_size`` pieces and write it atomically to ``out_path`` (a .model file, or a folder -> tokenizer.model).

    texts: the sentences, or a text file with one per line. Deterministic: the same text gives the same bytes.
    Raises DataError when the text is too small to support ``vocab_size`` pieces.
    """
    import sentencepiece as spm

    if isinstance(texts, (str, Path)):
        corpus = Path(texts)
        if not corpus.is_file():
            raise FileNotFoundError(f"{corpus}: no such corpus file")
        sentences = corpus.read_text(encoding="utf-8").splitlines()
        source = str(corpus)
    else:
        sentences, source = list(texts), "the given texts"
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
        raise DataError(f"{source}: no text to train a tokenizer on")
    out = Path(out_path)
    if out.is_dir():
        out = out / "tokenizer.model"
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",  # as Meta's: keep newlines, spaces and case
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"cannot train a {vocab_size}-piece tokenizer on {source} ({len(sentences)} sentences): "
            f"{_explain_trainer_error(str(e))}"
        ) from None
    from model.checkpoint import atomic_write

    atomic_write(out, lambda tmp: tmp.write_bytes(model.getvalue()))
    return out
