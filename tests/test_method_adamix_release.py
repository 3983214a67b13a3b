"""model/methods/adamix.py as the released scripts run it: the shared up-projection, the consistency loss between two
routed passes (checked against the symmetric KL written out), the unrouted experts held through an AdamW step
(training/optim.py ``hold_slices``), and records from before these settings loading with what they trained with."""

import json

import torch
import torch.nn.functional as F

from model.config import ModelConfig, preset
from model.loss import IGNORE_INDEX
from model.methods import config_from_dict
from model.methods.adamix import AdaMixConfig, step_route
from tests.test_method_adamix import BOTH, TOKENS, houlsby_with, mixed
from training.config import TrainConfig, config_to_dict
from training.optim import hold_slices
from training.state import CONFIG_FILE, read_run_config

LABELS = TOKENS.clone()
LABELS[:, :4] = IGNORE_INDEX  # a prompt without targets, as data.collate writes it


def picked(model, route):
    """The Houlsby model whose adapters hold the experts ``route`` picks (the shared side: its one tensor)."""

    def pick(t, i, s, kind):
        down, up = model.method.pair(route, i, s)
        return t[down if kind.startswith("down") else up]

    return houlsby_with(model, pick).train()


def test_experts_share_one_up_projection_by_default():
    model = mixed(shared="up").train()
    experts = model.layers[0].adapter_feed_forward
    assert experts.down.shape == (3, 8, 64) and experts.up.shape == (1, 64, 8) and experts.up_bias.shape == (1, 64)
    model.method.begin_step(2, 9)
    expected = picked(model, step_route(9, 2, 4, 3))
    with torch.no_grad():
        assert torch.equal(model(TOKENS), expected(TOKENS))  # forward only: no consistency pass without labels


def symmetric_kl_by_hand(logits_p, logits_q):
    """sum over rows of 1/2 (sum q (log q - log p) + sum p (log p - log q))."""
    p, q = logits_p.float().softmax(-1), logits_q.float().softmax(-1)
    return 0.5 * ((q * (q.log() - p.log())).sum() + (p * (p.log() - q.log())).sum())


def test_the_training_loss_adds_the_weighted_symmetric_kl_of_a_second_routed_pass():
    model = mixed(consistency_weight=100.0).train()
    model.method.begin_step(4, 1)
    first, second = (picked(model, step_route(1, 4, 4, 3, forward)) for forward in (0, 1))
    with torch.no_grad():
        a, b = first(TOKENS)[:, :-1], second(TOKENS)[:, :-1]  # (B, T-1, vocab): position t predicts t + 1
        mask = LABELS[:, 1:] != IGNORE_INDEX
        ce = F.cross_entropy(a[mask], LABELS[:, 1:][mask], reduction="sum")
        expected = ce + 100.0 * symmetric_kl_by_hand(a[mask], b[mask])
        assert symmetric_kl_by_hand(a[mask], b[mask]) > 1e-4  # the two routes differ
        torch.testing.assert_close(model(TOKENS, labels=LABELS), expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(model(TOKENS, labels=LABELS, loss_chunk=5), expected, rtol=1e-5, atol=0)
        off = mixed(consistency_weight=0.0).train()
        off.method.begin_step(4, 1)
        torch.testing.assert_close(off(TOKENS, labels=LABELS), ce, rtol=1e-6, atol=0)


def test_activation_checkpointing_recomputes_each_pass_under_its_own_route():
    grads = []
    for recompute in (False, True):
        model = mixed().train()
        model.activation_checkpointing = recompute
        model.method.begin_step(3, 2)
        model(TOKENS, labels=LABELS, loss_chunk=5).backward()
        grads.append({n: p.grad.clone() for n, p in model.trainable_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def test_unrouted_experts_keep_their_values_and_moments_through_an_adamw_step():
    model = mixed(freeze_unrouted=True).train()
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        model.method.begin_step(step, 0)
        before = {n: p.detach().clone() for n, p in model.trainable_parameters()}
        moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params if optimizer.state[p]}
        model(TOKENS, labels=LABELS).backward()
        held = model.method.held_in_step(model)
        with hold_slices(optimizer, held):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        routes = [step_route(0, step, 4, 3, forward) for forward in (0, 1)]
        for i, block in enumerate(model.layers):
            for s in BOTH:
                experts = getattr(block, f"adapter_{s}")
                for side, kind in ((0, "down"), (1, "up")):
                    routed = {model.method.pair(r, i, s)[side] for r in routes}
                    p, name = getattr(experts, kind), f"layers.{i}.adapter_{s}.{kind}"
                    for e in range(3):
                        moved = not torch.equal(p[e], before[name][e])
                        assert moved == (e in routed), (step, name, e)
                        if e not in routed and id(p) in moments:
                            assert torch.equal(optimizer.state[p]["exp_avg"][e], moments[id(p)]["exp_avg"][e])
        assert len(held) == sum(len(idx) > 0 for _, idx in held) > 0  # some expert idles every step (3 experts)

    free = mixed().train()
    optimizer = torch.optim.AdamW([p for _, p in free.trainable_parameters()], lr=1e-2, weight_decay=0.1)
    assert free.method.held_in_step(free) == []
    before = free.layers[0].adapter_feed_forward.down.detach().clone()
    free(TOKENS, labels=LABELS).backward()
    optimizer.step()
    assert all(not torch.equal(free.layers[0].adapter_feed_forward.down[e], before[e]) for e in range(3))  # decay


def test_adapters_and_runs_recorded_before_the_release_settings_keep_what_they_trained_with(tmp_path):
    old = {"n_experts": 3, "bottleneck": 8, "activation": "gelu", "sublayers": ["feed_forward"], "n_layers": None,
           "visual_layers": 2}  # fmt: skip
    config = config_from_dict("adamix", old)
    assert (config.shared, config.consistency_weight, config.freeze_unrouted) == ("none", 0.0, False)
    assert config_from_dict("adamix", {**old, "shared": "up"}).shared == "up"  # recorded values win
    sidecar = ModelConfig(llama=preset("tiny").llama, method=config).to_dict()
    sidecar["method_config"] = old
    assert ModelConfig.from_dict(sidecar).method == AdaMixConfig(n_experts=3, bottleneck=8, shared="none",
                                                                   consistency_weight=0.0)  # fmt: skip
    assert AdaMixConfig().shared == "up" and AdaMixConfig().consistency_weight == 100.0  # new runs: the release's

    values = config_to_dict(TrainConfig())
    for field in ("shared", "consistency_weight", "freeze_unrouted"):
        del values["model"]["adamix"][field]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(values))
    resumed = read_run_config(tmp_path).model.adamix
    assert (resumed.shared, resumed.consistency_weight, resumed.freeze_unrouted) == ("none", 0.0, False)
