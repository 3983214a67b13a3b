"""Small datasets written in exactly the real formats, and a tiny sentencepiece tokenizer for them.

Everything is drawn from ``random.Random(seed)``: the same seed gives byte-identical files, in seconds. One module
a format:

- ``scienceqa``: ``make_scienceqa`` / ``ensure_scienceqa``, the official ScienceQA layout, of the one-shape task
  (``shapes``, the embedded default) or the scenes task (data.synthetic_scenes); ``export_scienceqa_hf``, its
  Hugging Face copy.
- ``shapes``: the one-shape task's drawings and problems, and the word tables the other sets share.
- ``coco``: ``make_coco``, Karpathy ``dataset_coco.json`` and the official caption annotations.
- ``alpaca``: ``make_alpaca`` / ``alpaca_records``, an alpaca_data.json list of {instruction, input, output}.
- ``tokenizer``: ``train_tokenizer``, a sentencepiece BPE model like Meta's, and ``synthetic_corpus``, text
  covering everything the generators write.
- ``folders``: folders are written atomically, into a temporary sibling renamed into place.

The names below are the package's public API, importable from ``data.synthetic``.
"""

from data.synthetic.alpaca import alpaca_records, make_alpaca
from data.synthetic.coco import make_coco
from data.synthetic.scienceqa import (
    KIND_SIZES,
    SCIENCEQA_KINDS,
    SYNTHETIC_RECORD,
    ensure_scienceqa,
    export_scienceqa_hf,
    make_scienceqa,
    scienceqa_drafts,
)
from data.synthetic.shapes import COLORS, Draft, Drawing
from data.synthetic.tokenizer import synthetic_corpus, train_tokenizer

__all__ = [
    "COLORS",
    "KIND_SIZES",
    "SCIENCEQA_KINDS",
    "SYNTHETIC_RECORD",
    "Draft",
    "Drawing",
    "alpaca_records",
    "ensure_scienceqa",
    "export_scienceqa_hf",
    "make_alpaca",
    "make_coco",
    "make_scienceqa",
    "scienceqa_drafts",
    "synthetic_corpus",
    "train_tokenizer",
]
