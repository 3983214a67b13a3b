"""AdaMix: a mixture of bottleneck adapters per insertion point (Wang et al., "AdaMix: Mixture-of-Adaptations for
Parameter-efficient Model Tuning", arXiv 2205.12410), run as the released scripts run it (microsoft/AdaMix: the
``MixtureSoup`` / ``ExpertSoup`` modules, ``bert_base_mnli_expert_soup.sh``, ``roberta_large_mnli_expert_soup.sh``
and the GPT-2 scripts under NLG/).

Each insertion point holds M bottleneck experts (Houlsby's bottleneck, model/methods/houlsby.py). The released
scripts share one projection among them (``sharing_up 1 sharing_down 0``: experts only in the down-projection),
``shared="up"`` here, the default; ``shared="none"`` gives every expert its own of both (the paper's description).
In training, one forward goes through ONE down-projection and ONE up-projection, each chosen uniformly at random
and independently of the other (stochastic routing; the shared side has one):

    out + W_up[j] f(W_down[i] out + b_down[i]) + b_up[j]

In inference the experts' weights are averaged ("merging"; the release's inference level 3: a softmax of zero
scores) into one adapter, down and up separately: the cost of a single Houlsby adapter. ``merge()`` makes that
permanent: every insertion point keeps one expert holding the averages and the model's config says
``n_experts=1``, so a merged adapter saves at 1/M of the size, loads, and gives exactly the pre-merge outputs.

Consistency loss (``consistency_weight``, the release's ``use_consistency_loss 1``): each training forward runs the
layers twice under two independently drawn routes, and the loss is the first pass's cross-entropy plus the weight
times the symmetric KL between the two passes' next-token distributions, each pass pulled towards the other as a
fixed target, summed over the target tokens (model/loss.py ``symmetric_kl``; the training loss is then divided by
the target count, a mean per target as the release's GPT-2 code takes it). Default 100, the release's weight for
GPT-2 language modelling (its GLUE classifiers use 1 on one prediction per sequence). The two passes run inside one
call of the model (``Method.training_loss``), so DDP and FSDP see one forward and one backward: training costs two
forwards and backwards of the adapted layers per step.

Routes: the release draws a new route at every forward of every mixture from the global RNG. Here the two routes of
an optimizer step are drawn from (run seed, step, pass), by ``begin_step``, which the trainer calls before the
step's micro-batches: every DDP process and every micro-batch of the step take the same routes, so one process or N
with the same global batch give the same run, and DDP needs no unused-parameter search (the experts of a point are
stacked in one tensor each: the unrouted ones get zero gradients). A loop of one's own calls
``model.method.begin_step(step, seed)`` at each step; before the first call the routes are those of step 0, seed 0.
The route of a forward is fixed when the forward starts (it travels in the per-sequence state), so activation
checkpointing recomputes each pass under its own route.

Unrouted experts (``freeze_unrouted``): under AdamW an expert with a zero gradient still moves, on its momentum and
by weight decay. The release keeps each expert a separate parameter, so an expert is skipped by its AdamW only until
its first route; after it the scripts' ``zero_grad()`` (torch 1.7 and transformers 4.x: gradients zeroed in place,
not set to None) leaves zero gradients, and the expert moves like ours: the default, False, is that. With True,
``held_in_step`` names the experts no pass of the step routed, and the trainer restores their values and AdamW
moments after the step (training/optim.py ``hold_slices``): no momentum or decay step on them, as an expert whose
gradient stays None (the release under torch >= 2.0, where ``zero_grad`` sets None). One difference remains: AdamW's
bias correction counts the steps of the whole stacked tensor, not of each expert's own updates.

Insertion points: after the feed-forward sublayer (before the residual addition), as in the release's BERT, RoBERTa
and GPT-2 code; ``sublayers`` adds the attention sublayer (Houlsby's second point). Init: each expert as Houlsby's
near-identity init (truncated N(0, 1e-2) weights, zero biases), drawn independently, so the experts differ and the
model is close to, not exactly, the base model at start (the release: transformers' N(0, 0.02) weights, zero
biases). Defaults: 4 experts (the GLUE scripts; the GPT-2 ones use 8), width 16 (RoBERTa-large's; BERT-base 48,
GPT-2 8), GELU (the release's). The release's weight decay (0.1 in the GLUE scripts) is the run's ``optim``
setting here.

Runs and adapters saved before ``shared``, ``consistency_weight`` and ``freeze_unrouted`` existed trained with
experts in both projections and no consistency loss: their recorded configs lack the fields and load with those
values (``AdaMixConfig.recorded_defaults``), so they resume and load as they trained.

With images: the experts take no prompt, so the image enters as the gated visual prompt of
model/methods/visual_prompt.py: in the top ``visual_layers`` layers, wv(I_p) of the visual vector, scaled per head by
a zero-init tanh gate, added to the attention heads before wo. Text-only items add nothing.

Tensor names: ``layers.N.adapter_feed_forward.down`` (M, m, dim) / ``down_bias`` (M, m) / ``up`` (M, dim, m) /
``up_bias`` (M, dim), with M = 1 on the shared side (``adapter_attention.*`` likewise), plus
``layers.N.attention.adapter_visual_gate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from model.loss import next_token_loss, symmetric_kl
from model.methods.base import MethodConfig, register_method
from model.methods.houlsby import (
    SUBLAYERS,
    Bottleneck,
    bottleneck,
    bottleneck_memory,
    check_bottleneck,
    check_layers,
    check_sublayers,
)
from model.methods.memory import MemoryTerms, StepShape
from model.methods.visual_prompt import GatedVisualPrompt, check_visual_layers

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import AttentionContext, Transformer, TransformerBlock

Route = list[list[list[int]]]
"""route[layer][sublayer] = [down expert, up expert] of one training pass (sublayers in ``SUBLAYERS`` order)."""


@dataclass
class AdaMixConfig(MethodConfig):
    """AdaMix (arXiv 2205.12410) as its released scripts run it: M bottleneck experts per insertion point sharing
    the up-projection, randomly routed in training with a consistency loss, averaged for inference."""

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
    shared: Literal["up", "down", "none"] = "up"
    """The projection every expert of a point shares: up (the released scripts: experts only in the
    down-projection), down, or none (each expert has both)."""
    consistency_weight: float = 100.0
    """Weight of the symmetric KL between two differently routed passes, per target token (the release's GPT-2
    weight); 0: one pass per forward, no consistency loss."""
    freeze_unrouted: bool = False
    """Keep the experts no pass of a step routed exactly as they are (no AdamW momentum or weight-decay step); False:
    they move on their momentum, as in the release with its torch 1.7 (see the module docstring)."""

    recorded_defaults: ClassVar[dict[str, Any]] = {"shared": "none", "consistency_weight": 0.0}
    """What runs and adapters recorded before these fields existed trained with."""

    def __post_init__(self) -> None:
        check_sublayers(self)
        if self.n_experts <= 0:
            raise ValueError(f"AdaMixConfig.n_experts must be positive, got {self.n_experts}")
        check_bottleneck(self)
        check_visual_layers(self)
        if self.shared not in ("up", "down", "none"):
            raise ValueError(f"AdaMixConfig.shared must be 'up', 'down' or 'none', got {self.shared!r}")
        w = self.consistency_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < float("inf"):
            raise ValueError(f"AdaMixConfig.consistency_weight must be a finite number >= 0, got {w!r}")
        if not isinstance(self.freeze_unrouted, bool):
            raise ValueError(f"AdaMixConfig.freeze_unrouted must be true or false, got {self.freeze_unrouted!r}")

    def check(self, llama: LlamaConfig) -> None:
        """The adapted layers must exist."""
        check_layers(self, llama)

    @property
    def experts(self) -> tuple[int, int]:
        """(down experts, up experts) per insertion point: 1 on the shared side."""
        return (1 if self.shared == "down" else self.n_experts, 1 if self.shared == "up" else self.n_experts)


def step_route(seed: int, step: int, n_layers: int, n_experts: int, forward: int = 0) -> Route:
    """The route of training pass ``forward`` (0 or 1) of optimizer step ``step`` in a run seeded with ``seed``:
    route[layer][sublayer] = [down expert, up expert], each in 0..n_experts-1, the same on every process. The
    generator's seed hashes the triple (torch's CPU generator keeps only 32 bits of its seed, so packing seed and
    step side by side would drop the seed); the first pass's key is the one of runs before the second pass existed."""
    text = f"adamix route {seed} {step}" + (f" pass {forward}" if forward else "")
    key = hashlib.sha256(text.encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:4], "little"))
    return torch.randint(n_experts, (n_layers, len(SUBLAYERS), 2), generator=generator, device="cpu").tolist()


class RoutedState(NamedTuple):
    """AdaMix's per-sequence state: the gated visual prompt's, and the route of this pass (None: inference, the
    experts' average)."""

    visual: Any
    route: Route | None


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
        """Draw this step's two routes (``step_route``): every training forward until the next call takes them."""
        n, m = self.llama.n_layers, self.config.n_experts
        self.routes = [step_route(seed, step, n, m, forward) for forward in (0, 1)]

    def pair(self, route: Route, layer: int, sublayer: str) -> tuple[int, int]:
        """(down expert, up expert) that ``route`` takes at a point; 0 on the shared side (its one tensor)."""
        i, j = route[layer][SUBLAYERS.index(sublayer)]
        return (0 if self.config.shared == "down" else i, 0 if self.config.shared == "up" else j)

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
            setattr(block, f"adapter_{sublayer}", Bottleneck(self.llama.dim, c.bottleneck, c.experts))

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """Every expert drawn independently with Houlsby's near-identity init (see the module docstring)."""
        super().reset_parameters(model, generator)
        for experts in self.mixtures(model):
            experts.reset_parameters(generator, zero_up=False)

    def sequence_state(self, model: Transformer, visual: Tensor | None) -> RoutedState:
        """The visual prompt's state and, in training, the first pass's route."""
        return RoutedState(super().sequence_state(model, visual), self.routes[0] if self.training else None)

    def visual_state(self, state: RoutedState) -> Any:
        return state.visual

    def after_sublayer(
        self, block: TransformerBlock, sublayer: str, x: Tensor, out: Tensor, ctx: AttentionContext
    ) -> Tensor:
        """out + the routed expert pair (training) or the averaged adapter (inference)."""
        experts = getattr(block, f"adapter_{sublayer}", None)
        if experts is None:
            return out
        route = ctx.state.route
        if route is not None:
            i, j = self.pair(route, block.attention.layer_idx, sublayer)
            weights = (experts.down[i], experts.down_bias[i], experts.up[j], experts.up_bias[j])
        else:
            weights = (experts.down.mean(0), experts.down_bias.mean(0), experts.up.mean(0), experts.up_bias.mean(0))
        return out + bottleneck(out, *weights, self.config.activation)

    @property
    def training_passes(self) -> int:
        """2 with the consistency loss (a weight, and experts that can differ), else 1."""
        return 2 if self.config.consistency_weight and self.config.n_experts > 1 else 1

    def consistency(self, state: Any) -> bool:
        """Whether a training forward takes the second pass: in training (a route) with the consistency loss."""
        return state.route is not None and self.training_passes == 2

    def training_loss(
        self,
        model: Transformer,
        run_blocks: Callable[[Any], Tensor],
        state: RoutedState,
        labels: Tensor,
        head: Callable[[Tensor], Tensor],
        chunk: int,
    ) -> Tensor:
        """The first pass's cross-entropy, plus the weighted symmetric KL to a second pass under the step's second
        route (see the module docstring)."""
        hidden = run_blocks(state)  # (B, T, dim)
        loss = next_token_loss(hidden, labels, head, chunk)
        if not self.consistency(state):
            return loss
        second = run_blocks(state._replace(route=self.routes[1]))  # (B, T, dim)
        return loss + self.config.consistency_weight * symmetric_kl(hidden, second, labels, head, chunk)

    def held_in_step(self, model: Transformer) -> list[tuple[nn.Parameter, Tensor]]:
        """With ``freeze_unrouted``: per insertion point and side, the experts no pass of this step routed."""
        if not self.config.freeze_unrouted:
            return []
        routes = self.routes if self.consistency(RoutedState(None, self.routes[0])) else self.routes[:1]
        held = []
        for (block, sublayer), experts in zip(self.points(model), self.mixtures(model), strict=True):
            chosen = [self.pair(route, block.attention.layer_idx, sublayer) for route in routes]
            for side, tensors in ((0, (experts.down, experts.down_bias)), (1, (experts.up, experts.up_bias))):
                idle = [e for e in range(tensors[0].shape[0]) if e not in {pair[side] for pair in chosen}]
                if idle:
                    held += [(t, torch.tensor(idle)) for t in tensors]
        return held

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

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        # Per pass, one routed expert in series after each sublayer (the passes: ``training_passes``).
        c = self.config
        return bottleneck_memory(self.llama, step, c.sublayers, c.bottleneck, c.n_layers, serial=True)

    def describe(self) -> str:
        c, n = self.config, self.llama.n_layers
        shared = f", shared {c.shared}-projection" if c.shared != "none" and c.n_experts > 1 else ""
        loss = f"; consistency loss x{c.consistency_weight:g}" if c.consistency_weight else ""
        frozen = "; unrouted experts held" if c.freeze_unrouted else ""
        return (
            f"AdaMix {c.n_experts} experts m={c.bottleneck} ({c.activation}){shared} after {' and '.join(c.sublayers)}"
            f" of the top {c.n_layers or n} of {n} layers{loss}{frozen}; {self.describe_visual()}"
        )

    def group(self, name: str) -> str:
        if ".adapter_attention." in name or ".adapter_feed_forward." in name:
            side = "up" if name.rsplit(".", 1)[-1].startswith("up") else "down"
            return f"shared {side}-projections" if side == self.config.shared else "experts"
        return super().group(name)
