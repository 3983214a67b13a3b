"""Speed and memory of this project side by side with PEFT (AdaptionPrompt by default; LoRA, prefix tuning, prompt
tuning, p-tuning with ``--method``) on transformers' LlamaForCausalLM, the comparison of every PEFT method, and the
memory a training set-up needs.

``python -m bench train|generate|methods|memory`` (bench/__main__.py). Modules: ``shapes`` (model shapes, HF twin
config), ``methods`` (each method's PEFT config, non-zero weights and FLOP / byte accounting), ``measure`` (clocks,
peak memory, FLOP / byte counts, device peaks), ``run`` (shared weights, both sides, reports), ``worker`` (one side
in a fresh process), ``lengths`` (the Alpaca-like length distribution of ``train --lengths alpaca``), ``compare`` /
``compare_measure`` / ``compare_report`` (``methods``: every method trained alike, one table), ``memory``
(predicted and measured peak memory), ``gpu_check`` (the table of scripts/gpu_check.sh). Results and method:
BENCHMARKS.md."""

import warnings

# PEFT still calls transformers' deprecated is_gradient_checkpointing: not ours to fix, and not news on every run.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
