"""Build assets/tiny-base: the ``tiny`` LLaMA preset trained as a language model on synthetic text, on the CPU.

    python scripts/build_tiny_base.py                  # ~2 minutes on 2 cores; writes assets/tiny-base/
    python scripts/build_tiny_base.py --demo           # ~3 minutes; writes assets/tiny-demo-base/
    python scripts/build_tiny_base.py --out /tmp/base --steps 300

train.py's embedded default adapts this base, the way LLaMA-Adapter adapts LLaMA-7B: the frozen model must already
read ScienceQA-style questions and answer the ones its text settles, so that the adapter's job is to bring in
what only the picture shows. Full training of every weight, seeded, single-threaded (so the same torch version
writes the same bytes anywhere), on documents drawn from data.synthetic with BASE_SEED, a different seed from the
synthetic ScienceQA that train.py trains and tests on:

- ScienceQA-format problems *without* an image, whole (prompt + "The answer is (X)"), in every prompt format:
  questions settled by their hint (TXT) or by the question itself (NO context);
- the *prompts* of problems with an image, cut after "Answer:": the base learns how image questions read but
  never sees an answer to one (nor a picture), so it cannot answer them; train.py --no-images checks that the
  adapter cannot either without the image;
- COCO-style captions after the caption prompt, and Alpaca instructions with their responses.

``--demo`` writes assets/tiny-demo-base, the base of the demo recipe (``make train``): the same text plus the
demo's own formats (data.synthetic_mix), as a real LLaMA has read chats and captions before any adapter: a chat
about a picture it never sees (so the colour, size and shape in the answers are random to it), captions of such
pictures, and the demo's text instructions. An adapter on the plain base, which never read those formats, learned
neither them nor the pictures (data/synthetic_mix.py records the measurements).

Output (Meta layout, loaded by ``model.load_model("assets/tiny-base")``): params.json, consolidated.00.pth
(float32), tokenizer.model (512-piece sentencepiece BPE, data.synthetic.train_tokenizer) and README.md with the
settings and the base's own accuracy on held-out problems (text questions high, image questions at chance).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere: import the repository's packages

from data.coco import caption_prompt  # noqa: E402
from data.prompts import chat_prompt, format_prompt  # noqa: E402
from data.scienceqa import FORMATS, Problem, build_prompt, build_target  # noqa: E402
from data.synthetic import alpaca_records, scienceqa_drafts, synthetic_corpus, train_tokenizer  # noqa: E402
from data.synthetic_mix import conversation, demo_drawing, text_instruction  # noqa: E402
from model.config import PRESETS, ModelConfig  # noqa: E402
from model.llama import Transformer  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402

BASE_SEED = 1234
"""Seed of the base's text; train.py's synthetic ScienceQA uses data.synthetic's default seed 0."""
DEFAULT_OUT = REPO_ROOT / "assets" / "tiny-base"
DEMO_OUT = REPO_ROOT / "assets" / "tiny-demo-base"
MAIN_FORMAT = "llama_adapter"


@dataclass
class BaseTraining:
    """Settings of the base's language-model training."""

    steps: int = 1200
    """Optimizer steps."""
    batch_size: int = 16
    """Rows of ``row_len`` tokens per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to a tenth)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms)."""
    n_problems: int = 12000
    """Synthetic ScienceQA problems drawn (about half have an image: only their prompts are used)."""
    n_alpaca: int = 1500
    """Synthetic Alpaca records."""
    n_captions: int = 1500
    """Caption documents (caption prompt + one synthetic caption)."""
    n_chats: int = 0
    """Demo conversations about a picture (data.synthetic_mix), each answer after the demo's chat prompt; the
    picture is never shown, so the colour, size and shape in the answers are random to the base."""
    n_demo_captions: int = 0
    """Captions of the demo's pictures (one centred shape) after the caption prompt."""
    n_demo_instructions: int = 0
    """The demo's text instructions (data.synthetic_mix.text_instruction) in the Alpaca template."""
    answer_weight: float = 10.0
    """Loss weight of the answer tokens of text-only problems ("The answer is (X)"): a few tokens per document,
    drowned by the predictable template text around them at weight 1."""
    row_len: int = 128
    """Tokens per training row (documents are packed end to end)."""
    seed: int = BASE_SEED
    """Seed of the text, the initialisation and the batch order."""


DEMO = {"steps": 1600, "n_chats": 1500, "n_demo_captions": 1500, "n_demo_instructions": 1500}
"""--demo: the settings of assets/tiny-demo-base, the base of the demo recipe (the embedded default)."""


@dataclass
class Document:
    """A token sequence (BOS first) and the loss weight of predicting each token (BOS itself: none)."""

    tokens: list[int]
    weights: list[float]


def _problem(record: dict, pid: str) -> Problem:
    fields = {k: v for k, v in record.items() if k != "image"}
    return Problem(pid=pid, image_path=None, split="train", **fields)


def documents(tokenizer, cfg: BaseTraining) -> tuple[list[Document], list[Problem], list[Problem]]:
    """The training documents, and held-out text / image problems to check the base with."""
    rng = random.Random(cfg.seed)
    drafts = scienceqa_drafts(cfg.seed, cfg.n_problems)
    n_heldout = 400
    heldout, train = drafts[:n_heldout], drafts[n_heldout:]
    docs: list[Document] = []

    def add(prompt: str, target: str | None, answer_weight: float = 1.0) -> None:
        ids = tokenizer.encode(prompt, bos=True, eos=False)
        weights = [0.0] + [1.0] * (len(ids) - 1)
        if target is not None:
            answer = tokenizer.encode(target, bos=False, eos=True)
            ids, weights = ids + answer, weights + [answer_weight] * len(answer)
        docs.append(Document(ids, weights))

    for i, draft in enumerate(train):
        problem = _problem(draft.record, str(i))
        # Mostly the format train.py uses; the others so that any of them reads naturally.
        fmt = MAIN_FORMAT if rng.random() < 0.7 else rng.choice(FORMATS)
        if draft.drawing is None:
            add(build_prompt(problem, fmt), build_target(problem, fmt), cfg.answer_weight)
        else:
            add(build_prompt(problem, fmt), None)  # no answer to an image question, ever
    for rec in alpaca_records(cfg.seed, cfg.n_alpaca):
        add(format_prompt(rec["instruction"], rec["input"]), rec["output"])
    caption_drafts = [d for d in scienceqa_drafts(cfg.seed + 1, 4 * cfg.n_captions) if d.drawing is not None]
    for draft in caption_drafts[: cfg.n_captions]:
        add(caption_prompt(), draft.drawing.caption())
    for _ in range(cfg.n_chats):
        turns = conversation(rng, demo_drawing(rng))
        for k, (question, answer) in enumerate(turns):
            add(chat_prompt(turns[:k], question), answer)
    for _ in range(cfg.n_demo_captions):
        add(caption_prompt(), demo_drawing(rng).caption())
    for _ in range(cfg.n_demo_instructions):
        rec = text_instruction(rng)
        add(format_prompt(rec["instruction"], rec["input"]), rec["output"])
    text_heldout = [_problem(d.record, f"t{i}") for i, d in enumerate(heldout) if d.drawing is None]
    image_heldout = [_problem(d.record, f"i{i}") for i, d in enumerate(heldout) if d.drawing is not None]
    return docs, text_heldout, image_heldout


def init_weights(model: Transformer, seed: int) -> None:
    """N(0, 0.02) for every matrix, ones for the norms (as transformers' LlamaForCausalLM initialises)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.empty_like(p).normal_(0.0, 0.02, generator=gen))


def packed_rows(docs: Sequence[Document], row_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents, shuffled, concatenated and cut into rows of ``row_len`` tokens (no padding): tokens and the
    loss weight of predicting each. A BOS weighs nothing: nothing learns to predict the start of the next document,
    so an image question's prompt is never followed by anything the base could take for its answer."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    tokens = [t for i in order for t in docs[i].tokens]
    weights = [w for i in order for w in docs[i].weights]
    n_rows = len(tokens) // row_len
    shape = (n_rows, row_len)
    return torch.tensor(tokens[: n_rows * row_len]).view(shape), torch.tensor(weights[: n_rows * row_len]).view(shape)


def lr_at(step: int, cfg: BaseTraining) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_base(model: Transformer, docs: list[Document], cfg: BaseTraining) -> list[float]:
    """Full training of every weight; returns the loss of each step."""
    model.requires_grad_(True)  # the Transformer freezes its base for adapter training; here all of it trains
    model.train()
    matrices = [p for n, p in model.named_parameters() if p.ndim >= 2]
    norms = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": norms, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    losses: list[float] = []
    epoch, rows, weights_all, row = 0, None, None, 0
    for step in range(cfg.steps):
        if rows is None or row + cfg.batch_size > len(rows):
            rows, weights_all = packed_rows(docs, cfg.row_len, cfg.seed + epoch)  # a fresh shuffle per pass
            epoch, row = epoch + 1, 0
        tokens, weights = rows[row : row + cfg.batch_size], weights_all[row : row + cfg.batch_size]
        row += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = model(tokens)  # (B, T, V)
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        w = weights[:, 1:].flatten()
        loss = (token_loss * w).sum() / w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step, cfg):.2e}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: Transformer, problems: Sequence[Problem]) -> float:
    """Greedy answers of the base in the train.py format, scored by the answer letter (eval.scienceqa's parser)."""
    from eval.scienceqa import parse_answer
    from model.generate import generate

    outputs = generate(model, [build_prompt(p, MAIN_FORMAT) for p in problems], max_new_tokens=10, temperature=0)
    right = sum(parse_answer(out, len(p.choices)).index == p.answer for out, p in zip(outputs, problems))
    return 100.0 * right / len(problems)


def chance(problems: Sequence[Problem]) -> float:
    """Expected accuracy of a uniform guess among each problem's choices."""
    return 100.0 * sum(1 / len(p.choices) for p in problems) / len(problems)


def meta_params(model: Transformer) -> dict:
    """params.json as Meta writes it; multiple_of reproduces the preset's ffn_dim through Meta's rounding rule."""
    llama = model.config.llama
    multiple_of = 16
    assert llama.meta_ffn_dim(llama.dim, multiple_of) == llama.ffn_dim
    return {
        "dim": llama.dim,
        "n_layers": llama.n_layers,
        "n_heads": llama.n_heads,
        "n_kv_heads": llama.n_kv_heads,
        "vocab_size": llama.vocab_size,
        "multiple_of": multiple_of,
        "norm_eps": llama.norm_eps,
        "rope_theta": llama.rope_theta,
        "max_seq_len": llama.max_seq_len,
    }


def write_base(out: Path, model: Transformer, tokenizer_file: Path, readme: str) -> None:
    """Fill a temporary sibling of ``out``, then swap it into place (an interrupted build leaves ``out`` as it was)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)
        (tmp / "params.json").write_text(json.dumps(meta_params(model), indent=2) + "\n")
        state = {n: t.detach().clone().contiguous() for n, t in model.state_dict().items()}
        torch.save(state, tmp / "consolidated.00.pth")
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
        (tmp / "README.md").write_text(readme)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(out: Path, cfg: BaseTraining) -> dict[str, float]:
    """Tokenizer, documents, training, check, files; returns the held-out accuracies."""
    started = time.perf_counter()
    torch.set_num_threads(1)  # one thread: the same floating-point sums, hence the same weights, on any machine
    with tempfile.TemporaryDirectory() as work:
        tokenizer_file = train_tokenizer(synthetic_corpus(seed=cfg.seed), Path(work) / "tokenizer.model")
        tokenizer = load_tokenizer(tokenizer_file)
        docs, text_heldout, image_heldout = documents(tokenizer, cfg)
        llama = dataclasses.replace(PRESETS["tiny"], vocab_size=tokenizer.vocab_size)
        model = Transformer(ModelConfig(llama=llama))  # no PEFT method: the plain base language model
        init_weights(model, cfg.seed)
        print(f"{len(docs)} documents, {sum(p.numel() for p in model.parameters()):,} weights", flush=True)
        losses = train_base(model, docs, cfg)
        model.tokenizer = tokenizer
        scores = {
            "text_accuracy": accuracy(model, text_heldout),
            "text_chance": chance(text_heldout),
            "image_accuracy": accuracy(model, image_heldout),
            "image_chance": chance(image_heldout),
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "minutes": (time.perf_counter() - started) / 60,
        }
        readme = _readme(out.name, cfg, scores, len(docs), len(text_heldout), len(image_heldout))
        write_base(out, model, tokenizer_file, readme)
    return scores


def _readme(name: str, cfg: BaseTraining, scores: dict[str, float], n_docs: int, n_text: int, n_image: int) -> str:
    settings = "\n".join(f"- {f.name}: {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))
    demo = " and the demo's chats, captions and\ninstructions" if cfg.n_chats or cfg.n_demo_captions else ""
    return (
        f"# {name}\n\n"
        "The `tiny` LLaMA preset (dim 64, 4 layers, 4 heads, 2 KV heads, FFN 176, vocabulary 512) trained as a\n"
        f"language model on synthetic ScienceQA-format text, captions and Alpaca-style instructions{demo} by\n"
        "`scripts/build_tiny_base.py` (see its docstring for what the text holds and why). Meta layout:\n"
        "`params.json`, `consolidated.00.pth` (float32), `tokenizer.model`.\n\n"
        f"Training: {n_docs} documents, settings:\n\n{settings}\n\n"
        f"Final training loss (mean of the last 50 steps): {scores['final_loss']:.3f}; "
        f"build time {scores['minutes']:.1f} min.\n\n"
        f"Greedy answers of the base alone on held-out synthetic problems (format `{MAIN_FORMAT}`):\n\n"
        f"| problems | n | accuracy | chance |\n|---|---|---|---|\n"
        f"| text only (hint or question settles it) | {n_text} | {scores['text_accuracy']:.1f}% "
        f"| {scores['text_chance']:.1f}% |\n"
        f"| with an image (not given to the base) | {n_image} | {scores['image_accuracy']:.1f}% "
        f"| {scores['image_chance']:.1f}% |\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    defaults = BaseTraining()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"the demo base: the demo's conversations, captions and instructions added, {DEMO['steps']} steps "
        f"(default out: {DEMO_OUT})",
    )
    parser.add_argument("--out", type=Path, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, help=f"optimizer steps ({defaults.steps}; --demo: {DEMO['steps']})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of text and weights ({defaults.seed})")
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(defaults, **DEMO) if args.demo else defaults
    cfg = dataclasses.replace(cfg, seed=args.seed, steps=cfg.steps if args.steps is None else args.steps)
    if cfg.steps < 1:
        parser.error(f"--steps must be >= 1, got {cfg.steps}")
    out = args.out or (DEMO_OUT if args.demo else DEFAULT_OUT)
    scores = build(out, cfg)
    print(
        f"wrote {out} in {scores['minutes']:.1f} min: held-out text questions {scores['text_accuracy']:.1f}% "
        f"(chance {scores['text_chance']:.1f}%), image questions without the image {scores['image_accuracy']:.1f}% "
        f"(chance {scores['image_chance']:.1f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
