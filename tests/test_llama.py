"""model/llama.py + model/methods/llama_adapter.py: the adapter mechanism, exactly as the paper and the official
code define it."""

import math

import pytest
import torch

from model.config import LlamaAdapterConfig, LlamaConfig, ModelConfig, preset
from model.llama import AttentionContext, Transformer, apply_rope, count_trainable, is_trainable
from model.methods import Method


def tiny(gate_fn: str = "tanh", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny")
    cfg.method.gate_fn = gate_fn
    return Transformer(cfg).eval()


def randomize_gates(model: Transformer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter_gate"):
                p.copy_(torch.randn(p.shape, generator=g))


def test_zero_init_is_exactly_the_base_model():
    model = tiny()
    base = Transformer(ModelConfig(llama=model.config.llama)).eval()  # no method: the plain base model
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not is_trainable(k)})
    tokens = torch.randint(0, 512, (3, 17))
    assert torch.equal(model(tokens), base(tokens))
    randomize_gates(model)
    assert not torch.allclose(model(tokens), base(tokens))


def test_trainable_filter_and_requires_grad():
    model = tiny()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.trainable_parameters()}
    # top 3 of 4 layers carry a prompt (K, dim) and a per-head gate; layer 0 carries nothing
    expected = {f"layers.{i}.attention.{p}" for i in (1, 2, 3) for p in ("adapter_prompt", "adapter_gate")}
    assert trainable == expected
    assert model.layers[1].attention.adapter_prompt.shape == (10, 64)
    assert torch.equal(model.layers[1].attention.adapter_gate, torch.zeros(4))
    assert is_trainable("visual.adapter_proj.0.weight") and not is_trainable("visual.clip.conv1.weight")


def test_only_adapter_parameters_get_gradients():
    model = tiny()
    randomize_gates(model)
    logits = model(torch.randint(0, 512, (2, 9)))
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == is_trainable(name), name
    assert model.layers[3].attention.adapter_prompt.grad.abs().sum() > 0


def test_seven_b_trainable_count_on_meta_device():
    with torch.device("meta"):
        model = Transformer(preset("7B"))
    # 30 layers x 10 prompts x 4096 + 30 layers x 32 per-head gates (official V1: "1.2M")
    assert count_trainable(model) == 30 * 10 * 4096 + 30 * 32 == 1_229_760


def reference_attention(attn, x, gate_fn):
    """The official training code's concat form: one score matrix over [prompts; tokens], separate softmaxes."""
    B, T, _ = x.shape
    H, hd = attn.n_heads, attn.head_dim
    rep = attn.n_heads // attn.n_kv_heads
    pos = torch.arange(T)
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(pos.float(), inv)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    q = apply_rope(attn.wq(x).view(B, T, H, hd), cos, sin).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(B, T, -1, hd), cos, sin).transpose(1, 2).repeat_interleave(rep, 1)
    v = attn.wv(x).view(B, T, -1, hd).transpose(1, 2).repeat_interleave(rep, 1)
    K = attn.adapter_prompt.shape[0]
    ak = attn.wk(attn.adapter_prompt).view(1, K, -1, hd).transpose(1, 2).repeat_interleave(rep, 1)
    av = attn.wv(attn.adapter_prompt).view(1, K, -1, hd).transpose(1, 2).repeat_interleave(rep, 1)
    keys, values = torch.cat([ak.expand(B, -1, -1, -1), k], 2), torch.cat([av.expand(B, -1, -1, -1), v], 2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, K + T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores[..., K:] = scores[..., K:].masked_fill(~causal, float("-inf"))
    g = attn.adapter_gate.tanh() if gate_fn == "tanh" else attn.adapter_gate
    probs = torch.cat([g.view(1, H, 1, 1) * scores[..., :K].softmax(-1), scores[..., K:].softmax(-1)], -1)
    return attn.wo((probs @ values).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("gate_fn", ["tanh", "raw"])
def test_attention_matches_the_official_concat_form(gate_fn):
    model = tiny(gate_fn)
    randomize_gates(model)
    attn = model.layers[2].attention
    x = torch.randn(2, 7, 64)
    rope_cos, rope_sin = model.rope(x.device)
    cos, sin = rope_cos[:7][None, :, None], rope_sin[:7][None, :, None]
    state = model.method.sequence_state(model, None)
    with torch.no_grad():
        ours = attn(x, AttentionContext(cos, sin, None, True, None, model.method, state))
        ref = reference_attention(attn, x, gate_fn)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_recompute_with_adapter():
    model = tiny()
    randomize_gates(model)
    tokens = torch.randint(0, 512, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 32)
        steps = [model(tokens[:, :9], cache=cache)]
        steps += [model(tokens[:, t : t + 1], cache=cache) for t in range(9, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 14 and cache.method_state[0] is None
    assert all(kv[0].shape == (1, 2, 10, 16) for kv in cache.method_state[1:])  # (1, nkv, K, hd), computed once


def test_left_padding_with_key_valid_and_positions_matches_unpadded():
    model = tiny()
    randomize_gates(model)
    seq = torch.randint(0, 512, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)  # 3 pad slots on the left
    with torch.no_grad():
        alone = model(seq)[:, -1]
        cache = model.new_cache(1, 16)
        cache.mark_padding(0, 3)
        positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
        out = model(padded, cache=cache, positions=positions)[:, -1]
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def test_a_method_position_offset_shifts_every_token_position():
    """Method.position_offset (prefix tuning as PEFT runs it): the tokens' RoPE positions start there, cached or
    not, and it counts in max_seq_len."""

    class Shifted(Method):
        position_offset = 3

    model = Transformer(ModelConfig(llama=preset("tiny").llama)).eval()
    tokens = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        expected = model(tokens, positions=torch.arange(3, 12).expand(2, 9))
        model.method = Shifted(None, model.config.llama)
        assert torch.equal(model(tokens), expected)
        cache = model.new_cache(2, 16)
        steps = [model(tokens[:, :6], cache=cache)] + [model(tokens[:, t : t + 1], cache=cache) for t in (6, 7, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-5, rtol=1e-5)
    assert model.max_tokens == 509
    with pytest.raises(ValueError, match=r"sequence of 513 positions \(0 soft\) exceeds max_seq_len=512"):
        model(torch.zeros(1, 510, dtype=torch.long))


def test_last_only_and_sequence_limit():
    model = tiny()
    tokens = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        assert torch.allclose(model(tokens, last_only=True)[:, 0], model(tokens)[:, -1], atol=1e-6)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 513, dtype=torch.long))


def test_images_without_visual_path_is_a_clear_error():
    with pytest.raises(ValueError, match="no visual path"):
        tiny()(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, 32, 32))


def test_config_validation_messages():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="LlamaAdapterConfig.n_layers=3 exceeds the model's n_layers=2"):
        ModelConfig(llama=LlamaConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=8), method=LlamaAdapterConfig(n_layers=3))
    with pytest.raises(ValueError, match="gate_fn"):
        LlamaAdapterConfig(gate_fn="sigmoid")
    assert LlamaConfig.meta_ffn_dim(4096) == 11008 and LlamaConfig.meta_ffn_dim(5120) == 13824
