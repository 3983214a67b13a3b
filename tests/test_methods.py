"""model/methods: the PEFT plug-in point is real. Toy methods registered here, with no change to model code, are
built by load_model, train (only their tensors), save and load bit-exactly, and use every backbone hook."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from model import CheckpointError, LlamaAdapterConfig, ModelConfig, load_adapter, load_model, save_adapter
from model.llama import AttentionContext, Transformer, apply_rope
from model.methods import Method, MethodConfig, method_names, register_method

TOKENS = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(0))


# ---- toy methods --------------------------------------------------------------------------------------------------
@dataclass
class ShiftConfig(MethodConfig):
    """A learned vector added to the output of every FFN sublayer (hook: after_sublayer)."""


@register_method("toy_ffn_shift")
class FFNShift(Method):
    config_class = ShiftConfig

    def attach(self, model):
        self.adapter_shift = nn.Parameter(torch.empty(self.llama.n_layers, self.llama.dim))  # (n_layers, dim)

    def reset_parameters(self, model, generator):
        with torch.no_grad():
            self.adapter_shift.zero_()  # identity at start

    def after_sublayer(self, block, sublayer, x, out, ctx):
        if sublayer != "feed_forward":
            return out
        return out + self.adapter_shift[block.attention.layer_idx].to(out.dtype)

    def describe(self):
        return "a shift after every FFN"


@dataclass
class PrefixConfig(MethodConfig):
    """P key/value vectors per layer joined to the tokens' in the same softmax (hook: joint_kv)."""

    prefix_len: int = 3


@register_method("toy_prefix")
class Prefix(Method):
    config_class = PrefixConfig

    def attach(self, model):
        kv_dim = self.llama.n_kv_heads * self.llama.head_dim
        for block in model.layers:
            block.attention.adapter_prefix_k = nn.Parameter(torch.empty(self.config.prefix_len, kv_dim))
            block.attention.adapter_prefix_v = nn.Parameter(torch.empty(self.config.prefix_len, kv_dim))

    def reset_parameters(self, model, generator):
        with torch.no_grad():
            for _, p in model.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=generator))

    def joint_kv(self, attention, ctx):
        shape = (1, self.config.prefix_len, attention.n_kv_heads, attention.head_dim)
        return attention.adapter_prefix_k.view(shape).transpose(1, 2), attention.adapter_prefix_v.view(shape).transpose(
            1, 2
        )


class ScaledLinear(nn.Linear):
    """y = s * (W x): the frozen weight keeps its name (``.weight``), the scale is ``adapter_scale``."""

    def forward(self, x):
        return super().forward(x) * self.adapter_scale.to(x.dtype)


@dataclass
class ScaleConfig(MethodConfig):
    """A learned scale on the output projection (hooks: a wrapped linear, merge)."""


@register_method("toy_output_scale")
class OutputScale(Method):
    config_class = ScaleConfig

    def attach(self, model):
        wrapped = ScaledLinear(self.llama.dim, self.llama.vocab_size, bias=False)
        wrapped.adapter_scale = nn.Parameter(torch.empty(self.llama.vocab_size))  # (vocab,)
        model.output = wrapped

    def reset_parameters(self, model, generator):
        with torch.no_grad():
            model.output.adapter_scale.fill_(1.0)

    def merge(self, model):
        with torch.no_grad():
            model.output.weight.mul_(model.output.adapter_scale[:, None].to(model.output.weight.dtype))
            model.output.adapter_scale.fill_(1.0)


def base_model():
    return load_model("tiny", adapter_config=LlamaAdapterConfig(n_layers=0))


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g))


# ---- a method outside model/ behind the plug-in point -------------------------------------------------------------
def test_toy_method_is_built_by_load_model_and_starts_as_the_base_model():
    model = load_model("tiny", adapter_config=ShiftConfig())
    assert {"llama_adapter", "toy_ffn_shift"} <= set(method_names())
    assert [n for n, _ in model.trainable_parameters()] == ["method.adapter_shift"]
    assert model.method.describe() == "a shift after every FFN"
    assert model.describe_trainable() == "256 trainable values (shift 256)"
    with torch.no_grad():
        assert torch.equal(model(TOKENS), base_model()(TOKENS))


def test_toy_method_trains_only_its_tensors():
    model = load_model("tiny", adapter_config=ShiftConfig()).train()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    losses = []
    for _ in range(10):
        logits = model(TOKENS[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == {"method.adapter_shift"}


def test_toy_method_saves_and_loads_bit_exactly(tmp_path):
    model = load_model("tiny", adapter_config=ShiftConfig())
    perturb(model)
    save_adapter(model, tmp_path, base="tiny")
    assert set(load_file(tmp_path / "adapter.safetensors")) == {"method.adapter_shift"}
    sidecar = json.loads((tmp_path / "adapter.json").read_text())
    assert sidecar["model_config"]["method"] == "toy_ffn_shift" and sidecar["model_config"]["method_config"] == {}
    loaded = load_model("tiny", tmp_path)
    assert torch.equal(loaded.method.adapter_shift, model.method.adapter_shift)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
        assert not torch.equal(loaded(TOKENS), base_model()(TOKENS))


def test_adapter_of_an_unregistered_method_names_the_file_and_the_method(tmp_path):
    save_adapter(load_model("tiny", adapter_config=ShiftConfig()), tmp_path, base="tiny")
    sidecar = json.loads((tmp_path / "adapter.json").read_text())
    sidecar["model_config"]["method"] = "no_such_method"
    (tmp_path / "adapter.json").write_text(json.dumps(sidecar))
    with pytest.raises(
        CheckpointError, match=r"adapter\.json: invalid model_config .*unknown PEFT method 'no_such_method'"
    ):
        load_model("tiny", tmp_path)
    loaded_with_other_method = load_model("tiny", adapter_config=PrefixConfig())
    save_adapter(load_model("tiny", adapter_config=ShiftConfig()), tmp_path, base="tiny")
    with pytest.raises(CheckpointError, match=r"adapter config toy_ffn_shift \{\} differs from the model's toy_prefix"):
        load_adapter(loaded_with_other_method, tmp_path)


def test_registry_refuses_clashes_and_visual_paths_for_methods_without_one():
    with pytest.raises(ValueError, match="'toy_ffn_shift' .* clashes with 'toy_ffn_shift'"):

        @register_method("toy_ffn_shift")
        class Again(FFNShift):
            pass

    with pytest.raises(ValueError, match="'toy_ffn_shift' takes no visual vector"):
        load_model("tiny", adapter_config=ShiftConfig(), clip="tiny")


# ---- the other hooks ------------------------------------------------------------------------------------------------
def reference_prefix_attention(attn, x, cos, sin):
    """One softmax over [prefix; tokens], causal on the tokens, the prefix visible to every query, no RoPE on it."""
    B, T, _ = x.shape
    H, hd, rep = attn.n_heads, attn.head_dim, attn.n_heads // attn.n_kv_heads
    q = apply_rope(attn.wq(x).view(B, T, H, hd), cos, sin).transpose(1, 2)  # (B, H, T, hd)
    k = apply_rope(attn.wk(x).view(B, T, -1, hd), cos, sin).transpose(1, 2)  # (B, nkv, T, hd)
    v = attn.wv(x).view(B, T, -1, hd).transpose(1, 2)
    P = attn.adapter_prefix_k.shape[0]
    pk = attn.adapter_prefix_k.view(1, P, -1, hd).transpose(1, 2).expand(B, -1, -1, -1)
    pv = attn.adapter_prefix_v.view(1, P, -1, hd).transpose(1, 2).expand(B, -1, -1, -1)
    keys = torch.cat([pk, k], 2).repeat_interleave(rep, 1)  # (B, H, P + T, hd)
    values = torch.cat([pv, v], 2).repeat_interleave(rep, 1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(hd)
    visible = torch.cat([torch.ones(T, P, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return attn.wo((probs @ values).transpose(1, 2).reshape(B, T, -1))


def test_joint_kv_is_one_softmax_over_prefix_and_tokens_with_cache_and_padding():
    model = load_model("tiny", adapter_config=PrefixConfig())
    attn, x = model.layers[1].attention, torch.randn(2, 7, 64)
    rope_cos, rope_sin = model.rope(x.device)
    cos, sin = rope_cos[:7][None, :, None], rope_sin[:7][None, :, None]
    with torch.no_grad():
        ours = attn(x, AttentionContext(cos, sin, None, True, None, model.method, None))
        torch.testing.assert_close(ours, reference_prefix_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-5)

        full = model(TOKENS)
        cache = model.new_cache(3, 16)
        steps = [model(TOKENS[:, :8], cache=cache)] + [model(TOKENS[:, t : t + 1], cache=cache) for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)

        cache = model.new_cache(1, 16)
        cache.mark_padding(0, 3)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), TOKENS[:1, :6]], 1)
        positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
        out = model(padded, cache=cache, positions=positions)[:, -1]
        torch.testing.assert_close(out, model(TOKENS[:1, :6])[:, -1], atol=1e-5, rtol=1e-5)


def test_wrapped_linear_keeps_the_base_names_and_merges_exactly():
    model = load_model("tiny", adapter_config=ScaleConfig())
    assert [n for n, _ in model.trainable_parameters()] == ["output.adapter_scale"]
    base = base_model()
    assert torch.equal(model.output.weight, base.output.weight)  # the base loaded under its own name
    with torch.no_grad():
        assert torch.equal(model(TOKENS), base(TOKENS))  # scale 1: identity
        perturb(model)
        scaled = model(TOKENS)
        model.method.merge(model)
        assert torch.equal(model.output.adapter_scale, torch.ones(512))
        torch.testing.assert_close(model(TOKENS), scaled, atol=1e-5, rtol=1e-5)


def test_adaption_prompts_describe_themselves_and_group_their_values_for_the_training_log():
    model = load_model("tiny", adapter_config=LlamaAdapterConfig(prompt_len=3, n_layers=2), clip="tiny")
    assert model.method.describe() == "adaption prompts K=3 on the top 2 of 4 layers, tanh gate"
    assert model.describe_trainable() == "21,016 trainable values (prompts 384, gates 8, visual projection 20,624)"
    assert Transformer(ModelConfig(llama=model.config.llama)).method.describe() == "no PEFT method (the base model)"
