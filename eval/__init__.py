"""Evaluations that generate with a trained run and score like the official scripts.

- ``python -m eval.scienceqa``: greedy answers, deterministic letter parsing, accuracy by the official categories
  (Avg, NAT, SOC, LAN, TXT, IMG, NO, G1-6, G7-12); ``score_scienceqa`` / ``format_table`` for train.py.
- ``python -m eval.coco``: greedy captions scored with pycocoevalcap (BLEU-1..4, METEOR, ROUGE_L, CIDEr; no SPICE).
- ``eval.common``: the resumable generation log, batched decoding, run loading, atomic JSON output.

Both commands write into ``--output``: ``generations.jsonl`` (resume point), ``predictions.json`` (official results
format) and ``metrics.json``; an interrupted run started again with the same arguments continues where it stopped.
"""
