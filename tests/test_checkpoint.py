"""model/checkpoint/: base layouts (Meta, HF), adapter files, importers and the errors users meet.

The helpers here write tiny real-format checkpoints (transformers' save_pretrained, Meta's params.json +
consolidated.NN.pth shards, PEFT's save_pretrained, the official V1 release layout); tests/test_load_model.py
reuses them for the end-to-end parity tests.
"""

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from model import BaseWeightsWarning, CheckpointError, WriteError, load_adapter, load_model, save_adapter
from model.checkpoint import (
    atomic_write,
    detect_base_format,
    hf_rows_to_meta,
    load_trainable,
    open_adapter,
    read_official_v1,
)
from model.config import ConfigError, LlamaConfig

# hidden 64, 4 query heads, 2 key/value heads (GQA), 3 layers, vocab 100. ffn 176 = Meta's rule for dim 64 with
# multiple_of 16; rope_theta and norm_eps differ from the defaults so a config that drops them shows.
HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, FFN, THETA, EPS = 64, 4, 2, 3, 100, 176, 5000.0, 1e-5


def make_hf_model(seed: int = 0, tie: bool = False, rope: dict | None = None) -> LlamaForCausalLM:
    """``rope``: transformers' rope_parameters (default: plain RoPE with base THETA)."""
    torch.manual_seed(seed)
    cfg = HFLlamaConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        num_hidden_layers=LAYERS, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=EPS,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": THETA}, tie_word_embeddings=tie,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a dropped or swapped norm shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def meta_rows_from_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of the converter's permutation, written index by index: Meta row 2p+a is HF row a*hd/2 + p."""
    hd = weight.shape[0] // n_heads
    index = [h * hd + (j % 2) * (hd // 2) + j // 2 for h in range(n_heads) for j in range(hd)]
    return weight[index]


HF_TO_META = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def meta_state_dict(hf: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    sd = hf.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}  # fmt: skip
    for i in range(LAYERS):
        for hf_name, meta_name in HF_TO_META.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                w = meta_rows_from_hf(w, HEADS)
            elif hf_name == "self_attn.k_proj":
                w = meta_rows_from_hf(w, KV_HEADS)
            out[f"layers.{i}.{meta_name}.weight"] = w.clone()
    return out


def write_meta(hf: LlamaForCausalLM, folder: Path, n_shards: int = 1) -> Path:
    """Meta layout: params.json (vocab_size -1) + consolidated.NN.pth split like fairscale model parallelism."""
    folder.mkdir(parents=True)
    params = {"dim": HIDDEN, "multiple_of": 16, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "n_layers": LAYERS,
              "norm_eps": EPS, "vocab_size": -1, "rope_theta": THETA, "max_seq_len": 128}  # fmt: skip
    (folder / "params.json").write_text(json.dumps(params))
    dim0 = ("wq", "wk", "wv", "w1", "w3", "output")
    dim1 = ("wo", "w2", "tok_embeddings")
    shards = [{} for _ in range(n_shards)]
    for name, w in meta_state_dict(hf).items():
        module = name.split(".")[-2]
        axis = 0 if module in dim0 else 1 if module in dim1 else None
        parts = w.chunk(n_shards, axis) if axis is not None else [w] * n_shards
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.ones(HIDDEN // HEADS // 2)  # a buffer real Meta files carry; must be dropped
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


def write_hf_bin(hf: LlamaForCausalLM, folder: Path, sharded: bool) -> Path:
    """The older PyTorch-pickle HF layout: pytorch_model.bin, or two shards + pytorch_model.bin.index.json."""
    hf.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    sd = hf.state_dict()
    for i in range(LAYERS):  # a buffer older transformers saved; recomputed by us, must be ignored
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(HIDDEN // HEADS // 2)
    if not sharded:
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    names = list(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in halves.items():
        torch.save({k: sd[k] for k in keys}, folder / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


# ---- base layouts ---------------------------------------------------------------------------------------------
def test_hf_rows_to_meta_inverts_the_converter_permutation():
    w = torch.randn(HEADS * 16, HIDDEN)
    hf_layout = torch.empty_like(w)
    hd = 16
    for h in range(HEADS):  # the converter: per head, even Meta rows first, then odd ones
        hf_layout[h * hd : (h + 1) * hd] = torch.cat([w[h * hd : (h + 1) * hd : 2], w[h * hd + 1 : (h + 1) * hd : 2]])
    assert torch.equal(hf_rows_to_meta(hf_layout, HEADS), w)
    assert torch.equal(meta_rows_from_hf(hf_layout, HEADS), w)


def test_format_detection(tmp_path, hf_dir):
    hf = make_hf_model()
    assert detect_base_format(hf_dir) == "hf"
    assert detect_base_format(write_meta(hf, tmp_path / "meta")) == "meta"
    assert detect_base_format(write_hf_bin(hf, tmp_path / "bin", sharded=True)) == "hf"


def test_legacy_pickle_format_without_mmap_loads_the_same_weights(tmp_path):
    folder = write_meta(make_hf_model(), tmp_path / "meta")
    zip_model = load_model(folder)  # read through mmap; its weights must not alias the file rewritten below
    shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
    torch.save(shard, folder / "consolidated.00.pth", _use_new_zipfile_serialization=False)  # cannot be mmapped
    legacy_model = load_model(folder)
    for (name, a), b in zip(zip_model.state_dict().items(), legacy_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_directory_in_neither_format_is_one_clear_error(tmp_path):
    (tmp_path / "weights.ckpt").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="neither a Meta checkpoint .* nor a Hugging Face one") as e:
        load_model(tmp_path)
    assert str(tmp_path) in str(e.value) and "weights.ckpt" in str(e.value)
    with pytest.raises(CheckpointError, match="no such base directory, not a Hugging Face Hub id .* not a preset name"):
        load_model(tmp_path / "missing")


def test_truncated_meta_shard_names_the_file(tmp_path):
    folder = write_meta(make_hf_model(), tmp_path / "meta", n_shards=2)
    truncate(folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: cannot read PyTorch weights"):
        load_model(folder)


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = tmp_path / "hf"
    make_hf_model().save_pretrained(folder)
    truncate(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors"):
        load_model(folder)


def test_base_weights_that_do_not_fit_the_config_name_the_keys(tmp_path):
    folder = tmp_path / "hf"
    make_hf_model().save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = load_file(folder / "model.safetensors")
    del sd["model.norm.weight"]
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(HIDDEN)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder}: base weights (architecture from config.json) do not match the model")
    assert "missing keys:\n    norm.weight\n" in msg
    assert "unexpected keys:\n    model.layers.0.self_attn.q_proj.bias  [model.safetensors: " in msg
    # Meta name, both shapes, and where it came from (file and original HF name)
    w1 = "layers.0.feed_forward.w1.weight: (176, 64) vs (128, 64)  [model.safetensors: model.layers.0.mlp.gate_proj"
    assert w1 in msg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'; only LLaMA"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"architectures": ["GemmaForCausalLM"]}, "field architectures names GemmaForCausalLM although model_type"),
        ({"architectures": "LlamaForCausalLM"}, "field architectures: 'LlamaForCausalLM'; expected a list"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}}, "only default and llama3 RoPE"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "field rope_parameters.factor: missing"),
    ],
)
def test_unsupported_hf_configs_are_refused(tmp_path, hf_dir, change, message):
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    cfg = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


# ---- our adapter files ----------------------------------------------------------------------------------------
def trained_tiny(seed: int = 3) -> torch.nn.Module:
    """The tiny preset with every trainable tensor set to random values (as after training)."""
    model = load_model("tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_save_and_reload_is_bit_exact(tmp_path):
    model = trained_tiny()
    path = save_adapter(model, tmp_path / "run", base="tiny", prompt_format="alpaca", extra={"step": 7})
    assert path == tmp_path / "run" / "adapter.safetensors"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter.json", "adapter.safetensors"]
    stored = load_file(path)
    assert set(stored) == {f"layers.{i}.attention.{p}" for i in (1, 2, 3) for p in ("adapter_prompt", "adapter_gate")}
    sidecar = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert sidecar["base"] == "tiny" and sidecar["prompt_format"] == "alpaca" and sidecar["extra"] == {"step": 7}
    assert sidecar["base_fingerprint"] == {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 176,
                                           "vocab_size": 512}  # fmt: skip
    assert sidecar["version"] == 2 and sidecar["model_config"]["method"] == "llama_adapter"
    assert sidecar["model_config"]["method_config"] == {"prompt_len": 10, "n_layers": 3, "gate_fn": "tanh"}

    fresh = load_model("tiny")
    assert load_adapter(fresh, tmp_path / "run")["extra"] == {"step": 7}
    for (name, a), (_, b) in zip(model.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(tokens), fresh(tokens))
        assert torch.equal(load_model("tiny", tmp_path / "run")(tokens), model(tokens))


def test_save_to_a_file_path_puts_the_sidecar_beside_it(tmp_path):
    path = save_adapter(trained_tiny(), tmp_path / "best.safetensors", base="tiny")
    assert path == tmp_path / "best.safetensors" and (tmp_path / "best.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_failed_save_leaves_the_previous_adapter_intact(tmp_path):
    model = trained_tiny()
    save_adapter(model, tmp_path, base="tiny")
    before = (tmp_path / "adapter.safetensors").read_bytes(), (tmp_path / "adapter.json").read_text()
    with pytest.raises(TypeError):
        save_adapter(trained_tiny(seed=9), tmp_path, base="tiny", extra={"not json": object()})
    assert ((tmp_path / "adapter.safetensors").read_bytes(), (tmp_path / "adapter.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]


def test_adapter_for_another_architecture_names_both(tmp_path, hf_dir):
    save_adapter(trained_tiny(), tmp_path, base="tiny")
    with pytest.raises(CheckpointError, match="another architecture") as e:
        load_model(hf_dir, tmp_path)
    msg = str(e.value)
    assert "dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512" in msg
    assert "dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=100" in msg
    assert str(hf_dir) in msg
    with pytest.raises(CheckpointError, match="another architecture"):
        load_adapter(load_model(hf_dir), tmp_path)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda sd: sd.pop("layers.2.attention.adapter_gate"), "missing keys:\n    layers.2.attention.adapter_gate"),
        (lambda sd: sd.update({"layers.0.attention.adapter_gate": torch.zeros(4)}),
         "unexpected keys:\n    layers.0.attention.adapter_gate"),
        (lambda sd: sd.update({"layers.3.attention.adapter_prompt": torch.zeros(9, 64)}),
         r"layers.3.attention.adapter_prompt: \(9, 64\) vs \(10, 64\)"),
    ],
)  # fmt: skip
def test_tampered_adapter_file_names_the_key(tmp_path, tamper, message):
    path = save_adapter(trained_tiny(), tmp_path, base="tiny")
    sd = load_file(path)
    tamper(sd)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=message) as e:
        load_adapter(load_model("tiny"), tmp_path)
    assert str(path) in str(e.value)


# The sidecar exactly as save_adapter wrote it before the PEFT method plug-in point (version 1, "adapter" entry).
SIDECAR_V1 = {
    "version": 1,
    "model_config": {
        "llama": {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "ffn_dim": 176,
                  "norm_eps": 1e-06, "rope_theta": 10000.0, "max_seq_len": 512, "rope_scaling_factor": None,
                  "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_seq_len": 8192},
        "adapter": {"prompt_len": 10, "n_layers": 3, "gate_fn": "tanh"},
        "visual": None,
    },
    "base": "tiny", "tokenizer": None, "clip_weights": None, "prompt_format": None,
    "base_fingerprint": {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 176, "vocab_size": 512},
    "base_weights_fingerprint": "e1cf8cd5c2664b4787f2dc6d24f5fb10",
    "extra": {},
}  # fmt: skip


def test_adapter_saved_before_the_method_plug_in_point_gives_the_old_logits(tmp_path):
    g = torch.Generator().manual_seed(3)  # the old code's tensors: N(0, 1) from seed 3, in parameter order
    tensors = {}
    for layer in (1, 2, 3):
        tensors[f"layers.{layer}.attention.adapter_prompt"] = torch.randn(10, 64, generator=g)
        tensors[f"layers.{layer}.attention.adapter_gate"] = torch.randn(4, generator=g)
    save_file(tensors, str(tmp_path / "adapter.safetensors"), metadata={"format": "pt"})
    (tmp_path / "adapter.json").write_text(json.dumps(SIDECAR_V1, indent=2) + "\n")
    model = load_model("tiny", tmp_path)
    assert model.method.describe() == "adaption prompts K=10 on the top 3 of 4 layers, tanh gate"
    tokens = torch.arange(1, 13)[None] * 37 % 512
    with torch.no_grad():
        logits = model(tokens)
    # Printed by the code before the change (commit c04e92a) for this file and these tokens.
    old_last = torch.tensor([-0.07372606, 0.32439449, 0.20001851, -0.29067948, -0.36861855, 0.11872775])
    old_fourth = torch.tensor([0.01153392, 0.14378485, 0.13204299, -0.28159028])
    torch.testing.assert_close(logits[0, -1, :6], old_last, atol=2e-7, rtol=0)
    torch.testing.assert_close(logits[0, 3, :4], old_fourth, atol=2e-7, rtol=0)


def test_adapter_with_another_gate_fn_or_missing_sidecar(tmp_path):
    save_adapter(trained_tiny(), tmp_path, base="tiny")
    model = load_model("tiny")
    model.config.method.gate_fn = "raw"
    with pytest.raises(CheckpointError, match="'gate_fn': 'tanh'.* differs from the model's .*'gate_fn': 'raw'"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter.json").unlink()
    with pytest.raises(CheckpointError, match=r"adapter\.json: adapter sidecar not found"):
        load_adapter(load_model("tiny"), tmp_path)


# ---- official V1 release and PEFT ---------------------------------------------------------------------------------
def official_v1_file(path: Path, *, per_head: bool, k: int = 10, low_gate: float = 0.0) -> dict:
    """A file in the release layout for the tiny HF base: prompts of the top 2 of 3 layers, gates of all 3."""
    g = torch.Generator().manual_seed(5)
    state = {"adapter_query.weight": torch.randn(2 * k, HIDDEN, generator=g).half()}
    for layer in range(LAYERS):
        shape = (1, HEADS, 1, 1) if per_head else (1,)
        gate = torch.full(shape, low_gate) if layer == 0 else torch.randn(shape, generator=g)
        state[f"layers.{layer}.attention.gate"] = gate.half()
    torch.save(state, path)
    return state


@pytest.mark.parametrize("per_head", [True, False])
def test_official_v1_file_gives_the_per_layer_prompts_and_gates(tmp_path, hf_dir, per_head):
    state = official_v1_file(tmp_path / "release.pth", per_head=per_head)
    model = load_model(hf_dir, tmp_path / "release.pth")
    assert model.config.method.prompt_len == 10 and model.config.method.n_layers == 2
    assert model.config.method.gate_fn == "tanh"  # training semantics (see read_official_v1)
    query = state["adapter_query.weight"].float()
    for i, layer in enumerate((1, 2)):
        attn = model.layers[layer].attention
        assert torch.equal(attn.adapter_prompt, query[10 * i : 10 * (i + 1)])
        gate = state[f"layers.{layer}.attention.gate"].float().flatten()
        assert torch.equal(attn.adapter_gate, gate if per_head else gate.expand(HEADS))
    assert not hasattr(model.layers[0].attention, "adapter_prompt")
    # The released inference code's raw gate: an option of the V1 reader, its tensors loaded onto a model built
    # with the config it returns.
    weights = read_official_v1(tmp_path / "release.pth", model.config.llama, gate_fn="raw")
    raw = load_model(hf_dir, adapter_config=weights.method)
    load_trainable(raw, weights)
    assert raw.config.method.gate_fn == "raw" and raw.config.method.n_layers == 2
    tanh_tensors, raw_tensors = model.adapter_state_dict(), raw.adapter_state_dict()
    assert raw_tensors.keys() == tanh_tensors.keys()
    assert all(torch.equal(raw_tensors[n], t) for n, t in tanh_tensors.items())


def test_official_v1_rejects_trained_gates_below_the_prompts_and_odd_shapes(tmp_path):
    llama = LlamaConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=VOCAB, ffn_dim=FFN)
    official_v1_file(tmp_path / "bad.pth", per_head=True, low_gate=0.5)
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.gate is non-zero but layer 0 carries no prompts"):
        read_official_v1(tmp_path / "bad.pth", llama)
    official_v1_file(tmp_path / "k8.pth", per_head=True, k=8)  # 16 rows: not a multiple of K=10
    with pytest.raises(CheckpointError, match=r"adapter_query\.weight has shape \(16, 64\); expected \(L\*10, 64\)"):
        read_official_v1(tmp_path / "k8.pth", llama)
    assert read_official_v1(tmp_path / "k8.pth", llama, prompt_len=8).method.n_layers == 2
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an official LLaMA-Adapter V1 file"):
        open_adapter(tmp_path / "other.pth", llama)


def test_the_official_v1_file_is_taken_wherever_a_run_is(tmp_path, capsys):
    """The V1 release file (a text-only Alpaca adapter) on a LLaMA base, as users pass it: `python -m app
    --checkpoint FILE --base DIR` serves it, `python -m eval.scienceqa` scores it (its questions without their
    images), `train.py --model.init_from FILE` starts from its tensors; COCO captioning and the V2 release export,
    which a text-only V1 adapter cannot do, are refused saying why. Here on the shipped tiny base, in the release's
    layout for its shape (prompts of the top 3 of 4 layers, gates of all 4 per head)."""
    import train
    from app.__main__ import build_parser, load_engine
    from app.engine import CHAT_STOP
    from data.prompts import format_prompt
    from data.synthetic import make_coco, make_scienceqa
    from eval import coco, scienceqa
    from model import export
    from model.generate import generate

    base = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-base")
    g = torch.Generator().manual_seed(5)
    state = {"adapter_query.weight": torch.randn(3 * 10, 64, generator=g).half()}
    for layer in range(4):
        gate = torch.zeros(1, 4, 1, 1) if layer == 0 else torch.randn(1, 4, 1, 1, generator=g)
        state[f"layers.{layer}.attention.gate"] = gate.half()
    v1 = tmp_path / "llama_adapter_len10_layer30_release.pth"
    torch.save(state, v1)
    reference = load_model(base, v1)

    engine = load_engine(build_parser().parse_args(["--checkpoint", str(v1), "--base", base, "--device", "cpu"]))
    assert engine.name == f"adapter {v1.name} (llama_adapter) on {base}" and not engine.has_vision
    greedy = {"temperature": 0.0, "max_new_tokens": 8}
    prompt = format_prompt("Tell me about alpacas.")
    assert "".join(engine.chat([], "Tell me about alpacas.", **greedy)) == generate(
        reference, prompt, stop=list(CHAT_STOP), **greedy
    )

    sqa = make_scienceqa(tmp_path / "sqa", n_train=4, n_val=2, n_test=4)
    common = ["--checkpoint", str(v1), "--base", base, "--device", "cpu", "--max-new-tokens", "4"]
    assert scienceqa.main([*common, "--data", str(sqa), "--output", str(tmp_path / "sqa-eval")]) == 0
    predictions = json.loads((tmp_path / "sqa-eval" / "predictions.json").read_text())
    assert len(predictions["outputs"]) == 4 and (tmp_path / "sqa-eval" / "metrics.json").is_file()
    coco_dir = make_coco(tmp_path / "coco", n_train=2, n_restval=0, n_val=1, n_test=2)
    annotations = str(coco_dir / "dataset_coco.json")
    assert coco.main([*common, "--annotations", annotations, "--output", str(tmp_path / "coco-eval")]) == 2
    assert "this run has no visual path (a text-only adapter); it cannot caption images" in capsys.readouterr().err
    assert export.main([str(v1), "--to", "release", str(tmp_path / "v2.pth"), "--base", base]) == 2
    assert "only llama_adapter_v2 adapters have the release format" in capsys.readouterr().err

    argv = [
        "--base", base, "--data", str(sqa), "--no-images", "--model.init_from", str(v1),
        "--optim.trainable", "adapter_gate", "--optim.max_steps", "1", "--run.eval", "false", "--run.progress",
        "false", "--run.out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert train.main(argv) == 0
    saved = load_file(tmp_path / "run" / "adapter.safetensors")
    for i, layer in enumerate((1, 2, 3)):  # the prompts held still: the file's own, gates trained from the file's
        assert torch.equal(
            saved[f"layers.{layer}.attention.adapter_prompt"],
            state["adapter_query.weight"][10 * i : 10 * (i + 1)].float(),
        )
    assert not torch.equal(saved["layers.1.attention.adapter_gate"], state["layers.1.attention.gate"].float().flatten())


def test_peft_directory_of_another_method_or_size_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    llama = LlamaConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=VOCAB, ffn_dim=FFN)
    with pytest.raises(CheckpointError, match=r"peft_type='LOHA'; supported: ADAPTION_PROMPT, IA3, LORA"):
        open_adapter(tmp_path, llama)
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    peft_config = {"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 5, "target_modules": "self_attn"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(peft_config))
    with pytest.raises(CheckpointError, match="adapter_layers=5 but the base has 3"):
        open_adapter(tmp_path, llama)
    (tmp_path / "adapter_config.json").unlink()
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter.safetensors .* and no adapter_config.json"):
        open_adapter(tmp_path, llama)


# ---- hostile configs and weights ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory) -> Path:
    return write_meta(make_hf_model(), tmp_path_factory.mktemp("meta") / "meta")


INF, NAN = float("inf"), float("nan")  # json.dumps writes the literals Infinity and NaN, which json.loads accepts


@pytest.mark.parametrize(
    "layout, change, field, problem",
    [
        ("meta", {"n_layers": 10**7}, "n_layers", "must be in 1..1,024, got 10,000,000"),  # used to hang
        ("meta", {"n_heads": None}, "n_heads", "must be an integer, got None (NoneType)"),
        ("meta", {"multiple_of": 0}, "multiple_of", "must be in 1..1,048,576, got 0"),
        ("meta", {"dim": 64.0}, "dim", "must be an integer, got 64.0 (float)"),
        ("meta", {"dim": True}, "dim", "must be an integer, got True (bool)"),
        ("meta", {"vocab_size": INF}, "vocab_size", "must be an integer, got inf (float)"),
        ("meta", {"dim": 2**31}, "dim", "must be in 1..65,536, got 2,147,483,648"),
        ("meta", {"n_heads": 0}, "n_heads", "must be in 1..65,536, got 0"),
        ("meta", {"n_heads": 3}, "n_heads", "dim=64 is not divisible by n_heads=3"),
        ("meta", {"rope_theta": 0}, "rope_theta", "must be finite and > 1, got 0"),
        ("meta", {"rope_theta": -1}, "rope_theta", "must be finite and > 1, got -1"),
        ("meta", {"rope_theta": NAN}, "rope_theta", "must be finite and > 1, got nan"),
        ("meta", {"norm_eps": "1e-5"}, "norm_eps", "must be a number, got '1e-5' (str)"),
        ("meta", {"max_seq_len": 10**11}, "max_seq_len", "must be in 1..2,097,152, got 100,000,000,000"),
        ("meta", {"ffn_dim_multiplier": INF}, "ffn_dim_multiplier", "must be finite and in (0, 1024], got inf"),
        ("hf", {"num_hidden_layers": 10**7}, "num_hidden_layers", "must be in 1..1,024, got 10,000,000"),
        ("hf", {"hidden_size": 64.0}, "hidden_size", "must be an integer, got 64.0 (float)"),
        ("hf", {"vocab_size": INF}, "vocab_size", "must be an integer, got inf (float)"),
        ("hf", {"num_attention_heads": 0}, "num_attention_heads", "must be in 1..65,536, got 0"),
        ("hf", {"intermediate_size": None}, "intermediate_size", "must be an integer, got None (NoneType)"),
        ("hf", {"rms_norm_eps": -1e-6}, "rms_norm_eps", "must be finite and 0 < norm_eps < 1, got -1e-06"),
        ("hf", {"rope_parameters": {"rope_type": "default", "rope_theta": NAN}}, "rope_parameters.rope_theta",
         "must be finite and > 1, got nan"),
        ("hf", {"max_position_embeddings": 10**11}, "max_position_embeddings",
         "must be in 1..2,097,152, got 100,000,000,000"),
        ("hf", {"head_dim": 32}, "head_dim", "32 differs from hidden_size / num_attention_heads = 16"),
        ("hf", {"hidden_act": "gelu"}, "hidden_act",
         "'gelu'; the LLaMA feed-forward block is SwiGLU, only 'silu' is supported"),
    ],
)  # fmt: skip
def test_hostile_config_values_name_the_file_and_field(tmp_path, meta_dir, hf_dir, layout, change, field, problem):
    folder = tmp_path / layout
    shutil.copytree(meta_dir if layout == "meta" else hf_dir, folder)
    config_file = folder / ("params.json" if layout == "meta" else "config.json")
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(e.value) == f"{config_file}: field {field}: {problem}"


def test_max_seq_len_is_bounded_by_the_rope_table_size():
    llama = dict(dim=4096, n_layers=1, n_heads=1, vocab_size=10, ffn_dim=10)  # head_dim 4096
    with pytest.raises(ConfigError, match=r"LlamaConfig\.max_seq_len: 1048576 positions x head_dim 4096 need a RoPE"):
        LlamaConfig(**llama, max_seq_len=2**20)
    assert LlamaConfig(**llama, max_seq_len=2**17).max_seq_len == 131072


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_integer_or_bool_base_weights_are_refused_by_name(tmp_path, meta_dir, hf_dir, layout):
    folder = tmp_path / layout
    shutil.copytree(meta_dir if layout == "meta" else hf_dir, folder)
    if layout == "meta":
        shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
        shard["layers.1.attention.wv.weight"] = shard["layers.1.attention.wv.weight"].to(torch.int8)
        torch.save(shard, folder / "consolidated.00.pth")
        found = "consolidated.00.pth: layers.1.attention.wv.weight (torch.int8)"
    else:
        sd = load_file(folder / "model.safetensors")
        sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"] > 0
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        found = "model.safetensors: model.layers.1.mlp.up_proj.weight (BOOL)"
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    must = "base weights must be floating point (float16, bfloat16, float32 or float64)"
    assert str(e.value) == f"{folder}: {must}; found {found}"


# ---- HF shard index -------------------------------------------------------------------------------------------
def sharded_hf(folder: Path) -> dict[str, str]:
    """The tiny HF model saved in several safetensors shards; returns the index's weight_map."""
    make_hf_model().save_pretrained(folder, max_shard_size="20KB")
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def write_index(folder: Path, weight_map: dict[str, str]) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_shard_index_naming_a_file_outside_the_folder_is_refused(tmp_path, kind):
    folder = tmp_path / "hf"
    weight_map = sharded_hf(folder)
    shard = weight_map["model.norm.weight"]
    outside = tmp_path / "elsewhere.safetensors"
    (folder / shard).rename(outside)
    if kind == "symlink":
        (folder / shard).symlink_to(outside)
        name, problem = shard, f"links to {outside}, outside the base folder {folder}"
    else:
        name = "../elsewhere.safetensors" if kind == "dotdot" else str(outside)
        problem = f"is outside the base folder {folder}"
    index = write_index(folder, {k: name if v == shard else v for k, v in weight_map.items()})
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(e.value) == f"{index}: shard file {name!r} {problem}"


def test_each_tensor_is_read_from_the_shard_the_index_names(tmp_path):
    folder = tmp_path / "hf"
    weight_map = sharded_hf(folder)
    shards = sorted(set(weight_map.values()))
    key = next(k for k, v in weight_map.items() if v != shards[-1])
    decoy = load_file(folder / shards[-1])  # read last: it used to win
    decoy[key] = torch.zeros_like(load_file(folder / weight_map[key])[key])
    save_file(decoy, folder / shards[-1], metadata={"format": "pt"})
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = make_hf_model()(tokens).logits
        torch.testing.assert_close(load_model(folder)(tokens), expected, atol=1e-4, rtol=0)
    other = next(s for s in shards if s != weight_map["lm_head.weight"])
    index = write_index(folder, {**weight_map, "lm_head.weight": other})
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert str(e.value) == f"{index}: names {other} for keys it does not hold: lm_head.weight"


def test_hub_cache_snapshot_links_into_its_blobs_folder_load(tmp_path):
    repo = tmp_path / "models--someone--tiny-llama"
    snapshot = repo / "snapshots" / "0123abc"
    weight_map = sharded_hf(snapshot)
    (repo / "blobs").mkdir()
    for i, name in enumerate(sorted({*weight_map.values(), "config.json"})):
        blob = repo / "blobs" / f"blob{i}"
        (snapshot / name).rename(blob)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    assert load_model(snapshot).config.llama.n_layers == LAYERS


# ---- refused pickles ------------------------------------------------------------------------------------------
class Opaque:
    """A class that weights-only loading does not allow."""


@pytest.mark.parametrize(
    "obj, reason",
    [
        (Opaque(), "Unsupported global: GLOBAL tests.test_checkpoint.Opaque was not an allowed global by default."),
        (os.system, f"Trying to load unsupported GLOBAL {os.system.__module__}.system whose module "
                    f"{os.system.__module__} is blocked."),
    ],
)  # fmt: skip
def test_refused_pickle_gives_the_reason_without_the_unsafe_hint(tmp_path, hf_dir, obj, reason):
    torch.save({"adapter_query.weight": torch.zeros(20, HIDDEN), "extra": obj}, tmp_path / "release.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(hf_dir, tmp_path / "release.pth")
    assert str(e.value) == (
        f"{tmp_path / 'release.pth'}: refused: the file holds Python objects other than tensors, which are never "
        f"unpickled here ({reason})"
    )


# ---- writing files --------------------------------------------------------------------------------------------
def test_saved_files_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        save_adapter(trained_tiny(), tmp_path, base="tiny")  # safetensors alone writes 0600 files
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"adapter.safetensors": 0o640, "adapter.json": 0o640}


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or replace(a, b))
    atomic_write(tmp_path / "notes.txt", lambda tmp: tmp.write_text("done"))
    assert calls == ["fsync", "replace", "fsync"] and (tmp_path / "notes.txt").read_text() == "done"


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def safetensors_disk_full(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 10)  # a partial file, then safetensors' own error for ENOSPC
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


class FullDisk:
    """A file object on a full disk: torch.save turns its OSError into a RuntimeError (the OSError as context)."""

    def write(self, data: bytes) -> int:
        disk_full()

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("failure", ["fsync", "safetensors", "write_text"])
def test_full_disk_names_the_file_and_keeps_the_previous_adapter(tmp_path, monkeypatch, failure):
    save_adapter(trained_tiny(), tmp_path, base="tiny")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if failure == "fsync":
        monkeypatch.setattr(os, "fsync", disk_full)
    elif failure == "safetensors":
        monkeypatch.setattr("model.checkpoint.adapter.save_file", safetensors_disk_full)
    else:
        monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(WriteError) as e:
        save_adapter(trained_tiny(seed=9), tmp_path, base="tiny")
    failed = tmp_path / ("adapter.json" if failure == "write_text" else "adapter.safetensors")
    assert str(e.value) == f"{failed}: cannot write (No space left on device); the previous file is unchanged"
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC and e.value.path == failed
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file either


def test_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(WriteError) as e:
        atomic_write(tmp_path / "state.pt", lambda tmp: torch.save({"x": torch.zeros(99)}, FullDisk()))
    assert str(e.value) == f"{tmp_path / 'state.pt'}: cannot write (No space left on device); no file was written"
    assert list(tmp_path.iterdir()) == []


# ---- which base an adapter was trained on -------------------------------------------------------------------------
TINY_BASE = Path(__file__).resolve().parents[1] / "assets" / "tiny-base"  # Meta layout, shaped like the preset


def test_adapter_on_a_base_with_other_weights_warns_and_strict_refuses(tmp_path):
    model = load_model(TINY_BASE)
    save_adapter(model, tmp_path, base=TINY_BASE)
    message = (
        f"{tmp_path / 'adapter.safetensors'}: adapter was trained on base {TINY_BASE}, whose weights differ from "
        "those of this base (tiny) although the shapes match; its outputs will not be the trained ones"
    )
    with pytest.warns(BaseWeightsWarning) as record:
        load_model("tiny", tmp_path)
    assert [str(w.message) for w in record] == [f"{message} (strict_base=True refuses this)"]
    with pytest.raises(CheckpointError) as e:
        load_model("tiny", tmp_path, strict_base=True)
    assert str(e.value) == message
    with pytest.raises(CheckpointError, match="the model\\) although the shapes match"):
        load_adapter(load_model("tiny"), tmp_path, strict_base=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(TINY_BASE, tmp_path, strict_base=True)  # the same weights, another dtype
        load_model(TINY_BASE, tmp_path, dtype=torch.bfloat16, strict_base=True)


def test_adapter_saved_before_content_fingerprints_loads_silently(tmp_path):
    save_adapter(trained_tiny(), tmp_path, base="tiny")
    sidecar = json.loads((tmp_path / "adapter.json").read_text())
    assert len(sidecar.pop("base_weights_fingerprint")) == 32
    (tmp_path / "adapter.json").write_text(json.dumps(sidecar))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model("tiny", tmp_path, seed=1, strict_base=True)


def test_hostile_value_in_an_adapter_sidecar_names_the_field(tmp_path):
    save_adapter(trained_tiny(), tmp_path, base="tiny")
    sidecar = json.loads((tmp_path / "adapter.json").read_text())
    sidecar["model_config"]["llama"]["n_layers"] = 10**7
    (tmp_path / "adapter.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError) as e:
        load_model("tiny", tmp_path)
    assert (
        str(e.value)
        == f"{tmp_path / 'adapter.json'}: field model_config.llama.n_layers: must be in 1..1,024, got 10,000,000"
    )
