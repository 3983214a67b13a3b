"""AdaMix: a mixture of bottleneck adapters per insertion point (Wang et al., "AdaMix: Mixture-of-Adaptations for
Parameter-efficient Model Tuning", arXiv 2205.12410; microsoft/AdaMix ``expert_soup.py``).

Each insertion point holds M bottleneck experts (Houlsby's bottleneck, model/methods/houlsby.py). In training, one
forward goes through ONE down-projection and ONE up-projection, each chosen uniformly at random and independently
of the other (stochastic routing: AdaMix's ``MixtureSoup`` draws the two separately):

    out + W_up[j] f(W_down[i] out + b_down[i]) + b_up[j]

In inference the experts' weights are averaged ("merging"; AdaMix's inference level 3: a softmax of zero scores)
into one adapter, down and up separately: the cost of a single Houlsby adapter. ``merge()`` makes that permanent:
every insertion point keeps one expert holding the averages and the model's config says ``n_experts=1``, so a
merged adapter saves at 1/M of the size, loads, and gives exactly the pre-merge inference outputs.

Routes: AdaMix draws a new route at every forward. Here the route is drawn per optimizer step, from (run seed,
step), by ``begin_step``, which the trainer calls before the step's micro-batches: every DDP process and every
micro-batch of the step take the same route, so one process or N with the same global batch give the same run,
and DDP needs no unused-parameter search (the experts of a point are stacked in one tensor each: the unrouted ones
get zero gradients). A loop of one's own calls ``model.method.begin_step(step, seed)`` at each step; before the first
call the route is that of step 0, seed 0. With Adam, unrouted experts still move on their momentum (AdaMix's
separate parameters get no update when unrouted).

Insertion points: after the feed-forward sublayer (before the residual addition), as in AdaMix's BERT, RoBERTa
and GPT-2 code; ``sublayers`` adds the attention sublayer (Houlsby's second point). Init: each expert as Houlsby's
near-identity init (truncated N(0, 1e-2) weights, zero biases), drawn independently, so the experts differ and the
model is close to, not exactly, the base model at start (AdaMix's code: transformers' N(0, 0.02)). Defaults: 4
experts (AdaMix's), width 16, GELU (AdaMix's code).

AdaMix's optional consistency loss (a symmetric KL between the logits of two differently routed forwards) is not
offered: it needs a second forward of every micro-batch (twice the training compute) under a second route, and a
loss term that the method adds inside the trainer, which has no such hook.

With images: the experts take no prompt, so the image enters as the gated visual prompt of
model/methods/visual_prompt.py: in the top ``visual_layers`` layers, wv(I_p) of the visual vector, scaled per head by
a zero-init tanh gate, added to the attention heads before wo. Text-only items add nothing.

Tensor names: ``layers.N.adapter_feed_forward.down`` (M, m, dim) / ``down_bias`` (M, m) / ``up`` (M, dim, m) /
``up_bias`` (M, dim) (``adapter_attention.*`` likewise), plus ``layers.N.attention.adapter_visual_gate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from model.methods.base import MethodConfig, register_method
from model.methods.houlsby import SUBLAYERS, Bottleneck, bottleneck, check_bottleneck, check_layers
from model.methods.visual_prompt import GatedVisualPrompt, check_visual_layers

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import AttentionContext, Transformer, TransformerBlock


@dataclass
class AdaMixConfig(MethodConfig):
    """AdaMix (arXiv 2205.12410): M bottleneck experts per insertion point, randomly routed in training, averaged
    for inference."""

    n_experts: int = 4
    """M: bottleneck experts per insertion point (1 after ``merge()``)."""
    bottleneck: int = 16
    """m: width of each expert's bottleneck."""
    activation: Literal["relu", "gelu", "silu"] = "gelu"
    """Nonlinearity between the down- and up-projection (AdaMix: gelu)."""
    sublayers: tuple[str, ...] = ("feed_forward",)
    """Sublayers followed by a mixture: feed_forward (AdaMix's code) and/or attention."""
    n_layers: int | None = None
    """Adapted layers counted from the top of the stack; None: all layers."""
    visual_layers: int = 2
    """Top layers where the image enters (a per-head gated visual value; 0: images have no effect)."""

    def __post_init__(self) -> None:
        if isinstance(self.sublayers, str):
            raise ValueError(f"AdaMixConfig.sublayers must be a list of names, got the string {self.sublayers!r}")
        self.sublayers = tuple(self.sublayers)  # a list from JSON or the command line compares equal after a round trip
        names = self.sublayers
        if not names or len(set(names)) != len(names) or set(names) - {*SUBLAYERS}:
            raise ValueError(
                f"AdaMixConfig.sublayers must be distinct names among {', '.join(SUBLAYERS)}, got {list(names)}"
            )
        if self.n_experts <= 0:
            raise ValueError(f"AdaMixConfig.n_experts must be positive, got {self.n_experts}")
        check_bottleneck(self)
        check_visual_layers(self)

    def check(self, llama: LlamaConfig) -> None:
        """The adapted layers must exist."""
        check_layers(self, llama)


def step_route(seed: int, step: int, n_layers: int, n_experts: int) -> list[list[list[int]]]:
    """route[layer][sublayer] = [down expert, up expert] of optimizer step ``step`` in a run seeded with ``seed``
    (sublayers in ``SUBLAYERS`` order): the same on every process. The generator's seed hashes the pair (torch's
    CPU generator keeps only 32 bits of its seed, so packing seed and step side by side would drop the seed)."""
    key = hashlib.sha256(f"adamix route {seed} {step}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:4], "little"))
    return torch.randint(n_experts, (n_layers, len(SUBLAYERS), 2), generator=generator, device="cpu").tolist()


@register_method("adamix")
class AdaMix(GatedVisualPrompt):
    """M stacked bottleneck experts after the chosen sublayers of the top ``config.n_layers`` layers."""

    config: AdaMixConfig
    config_class = AdaMixConfig
    fold_refusal = "its bottleneck adapters (down-projection, nonlinearity, up-projection) are modules a LLaMA lacks"

    def __init__(self, config: AdaMixConfig, llama: LlamaConfig) -> None:
        super().__init__(config, llama)
        self.begin_step(0, 0)

    def begin_step(self, step: int, seed: int) -> None:
        """Draw this step's route (``step_route``): every training forward until the next call takes it."""
        self.route = step_route(seed, step, self.llama.n_layers, self.config.n_experts)

    def points(self, model: Transformer) -> list[tuple[TransformerBlock, str]]:
        """(block, sublayer) of every insertion point, bottom layer first, in ``SUBLAYERS`` order within a layer."""
        first = self.llama.n_layers - (self.config.n_layers or self.llama.n_layers)
        return [(block, s) for block in model.layers[first:] for s in SUBLAYERS if s in self.config.sublayers]

    def mixtures(self, model: Transformer) -> list[Bottleneck]:
        """The stacked experts of every insertion point, in ``points`` order."""
        return [getattr(block, f"adapter_{sublayer}") for block, sublayer in self.points(model)]

    def attach(self, model: Transformer) -> None:
        super().attach(model)  # the visual gates
        c = self.config
        for block, sublayer in self.points(model):
            setattr(block, f"adapter_{sublayer}", Bottleneck(self.llama.dim, c.bottleneck, c.n_experts))

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """Every expert drawn independently with Houlsby's near-identity init (see the module docstring)."""
        super().reset_parameters(model, generator)
        for experts in self.mixtures(model):
            experts.reset_parameters(generator, zero_up=False)

    def after_sublayer(self, block: TransformerBlock, sublayer: str, out: Tensor, ctx: AttentionContext) -> Tensor:
        """out + the routed expert pair (training) or the averaged adapter (inference)."""
        experts = getattr(block, f"adapter_{sublayer}", None)
        if experts is None:
            return out
        if self.training:
            i, j = self.route[block.attention.layer_idx][SUBLAYERS.index(sublayer)]
            weights = (experts.down[i], experts.down_bias[i], experts.up[j], experts.up_bias[j])
        else:
            weights = (experts.down.mean(0), experts.down_bias.mean(0), experts.up.mean(0), experts.up_bias.mean(0))
        return out + bottleneck(out, *weights, self.config.activation)

    def merge(self, model: Transformer) -> None:
        """Keep one expert per point holding the averaged weights and set ``n_experts=1`` in the model's config:
        the inference outputs are unchanged (the average of one expert is itself), and the adapter saves, loads
        and trains as a one-expert AdaMix."""
        with torch.no_grad():
            for experts in self.mixtures(model):
                for name, p in list(experts.named_parameters()):
                    setattr(experts, name, nn.Parameter(p.mean(0, keepdim=True)))  # (1, ...)
        model.config.method = self.config = dataclasses.replace(self.config, n_experts=1)
        self.begin_step(0, 0)

    def describe(self) -> str:
        c, n = self.config, self.llama.n_layers
        return (
            f"AdaMix {c.n_experts} experts m={c.bottleneck} ({c.activation}) after {' and '.join(c.sublayers)} of "
            f"the top {c.n_layers or n} of {n} layers; {self.describe_visual()}"
        )

    def group(self, name: str) -> str:
        return "experts" if ".adapter_attention." in name or ".adapter_feed_forward." in name else super().group(name)
