"""model/config.py: LlamaConfig accepts every released LLaMA shape and refuses mistyped or absurd values by field."""

import pytest

from model.config import PRESETS, ConfigError, LlamaAdapterConfig, LlamaConfig, ModelConfig, preset

# Llama 3.1 405B (the largest released LLaMA), 128K context, llama3 RoPE scaling
LLAMA_405B = dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, ffn_dim=53248,
                  norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, rope_scaling_factor=8.0)  # fmt: skip


def test_released_shapes_and_presets_are_accepted():
    assert LlamaConfig(**LLAMA_405B).head_dim == 128
    assert LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672).n_kv_heads == 8  # 70B
    assert all(LlamaConfig(**vars(cfg)) == cfg for cfg in PRESETS.values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_layers": 10**7}, "LlamaConfig.n_layers: must be in 1..1,024, got 10,000,000"),
        ({"dim": 64.0}, "LlamaConfig.dim: must be an integer, got 64.0 (float)"),
        ({"vocab_size": False}, "LlamaConfig.vocab_size: must be an integer, got False (bool)"),
        ({"n_kv_heads": 3}, "LlamaConfig.n_kv_heads: n_heads=128 is not divisible by n_kv_heads=3"),
        ({"rope_theta": float("inf")}, "LlamaConfig.rope_theta: must be finite and > 1, got inf"),
        ({"rope_scaling_factor": 0.0}, "LlamaConfig.rope_scaling_factor: must be finite and > 0, got 0.0"),
        ({"rope_high_freq_factor": 0.5},
         "LlamaConfig.rope_high_freq_factor: must be finite and > rope_low_freq_factor, got 0.5"),
        ({"max_seq_len": 2**21 + 1}, "LlamaConfig.max_seq_len: must be in 1..2,097,152, got 2,097,153"),
    ],
)  # fmt: skip
def test_bad_values_name_the_field(change, message):
    with pytest.raises(ConfigError) as e:
        LlamaConfig(**{**LLAMA_405B, **change})
    assert str(e.value) == message and e.value.field == next(iter(change))


def test_model_config_records_the_method_by_name_and_reads_the_old_adapter_entry():
    cfg = preset("tiny")
    assert cfg.to_dict()["method"] == "llama_adapter"
    assert cfg.to_dict()["method_config"] == {"prompt_len": 10, "n_layers": 3, "gate_fn": "tanh"}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    plain = ModelConfig(llama=cfg.llama)
    assert plain.to_dict()["method"] is None and ModelConfig.from_dict(plain.to_dict()) == plain
    old = {"llama": cfg.to_dict()["llama"], "adapter": {"prompt_len": 4, "n_layers": 2, "gate_fn": "raw"}}
    assert ModelConfig.from_dict(old).method == LlamaAdapterConfig(prompt_len=4, n_layers=2, gate_fn="raw")
    with pytest.raises(ValueError, match="unknown PEFT method 'no_such_method'; registered: adamix, dora, houlsby"):
        ModelConfig.from_dict({**cfg.to_dict(), "method": "no_such_method"})
    with pytest.raises(ValueError, match="settings of PEFT method 'lora': .*unexpected keyword argument 'prompt_len'"):
        ModelConfig.from_dict({**cfg.to_dict(), "method": "lora"})
