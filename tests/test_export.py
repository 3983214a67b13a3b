"""model/export.py with model/checkpoint/peft_export.py and hf_export.py: our adapters as PEFT directories that
``PeftModel.from_pretrained`` loads, and merged Hugging Face checkpoints that ``AutoModelForCausalLM`` loads, both
giving our logits on the tiny GQA LlamaForCausalLM; what neither format can express is refused by name."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from model import export as export_cli
from model import load_model, load_tokenizer, save_adapter
from model.checkpoint.hf_export import write_hf
from model.checkpoint.peft_export import write_peft
from model.config import LlamaConfig
from model.methods.dora import DoraConfig
from model.methods.houlsby import HoulsbyConfig
from model.methods.llama_adapter import LlamaAdapterConfig
from model.methods.llama_adapter_v2 import AdapterV2Config
from model.methods.lora import LoraConfig
from model.methods.prefix import PrefixConfig
from model.methods.prompt import PromptConfig
from model.methods.ptuning import PTuningConfig
from model.methods.ptuning_v2 import PTuningV2Config
from tests.test_checkpoint import TINY_BASE, VOCAB, make_hf_model

TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
ALL_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# PEFT 0.21 calls a transformers 5 method that is deprecated; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),  # PEFT passes them so
]


def perturbed(base, config, **kwargs):
    """Our model with ``config``'s method, every trainable tensor random away from identity; a gate is one value per
    layer (PEFT's adaption prompt has one per layer), scales near 1."""
    model = load_model(base, adapter_config=config, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.trainable_parameters():
            if name.endswith("adapter_gate"):
                p.fill_(torch.randn(1, generator=g).item())
            elif name.endswith(("adapter_scale", "adapter_norm_scale")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


def peft_logits(folder, base=None):
    """PEFT's logits for our exported ``folder`` on the tiny HF model (or ``base``), soft-token positions dropped."""
    peft_model = PeftModel.from_pretrained(base if base is not None else make_hf_model(), folder).eval()
    with torch.no_grad():
        return peft_model, peft_model(TOKENS).logits[:, -TOKENS.shape[1] :]


PEFT_CASES = {
    "adaption prompt, raw gate": LlamaAdapterConfig(prompt_len=4, n_layers=2, gate_fn="raw"),
    "adaption prompt, tanh gate": LlamaAdapterConfig(prompt_len=3, n_layers=3, gate_fn="tanh"),
    "lora, every linear of the top 2 layers, rslora": LoraConfig(rank=2, alpha=5, targets=ALL_LINEARS, n_layers=2,
                                                                 rslora=True),
    "lora, defaults": LoraConfig(),
    "dora, wq wk wv of the top 2 layers": DoraConfig(rank=2, alpha=4, targets=("wq", "wk", "wv"), n_layers=2),
    "prefix, trained through its MLP": PrefixConfig(prefix_len=3, mlp_hidden=16),
    "ptuning_v2": PTuningV2Config(prefix_len=3),
    "prompt": PromptConfig(n_tokens=3, init="random"),
    "ptuning, MLP encoder": PTuningConfig(n_tokens=3, encoder_hidden=16),
}  # fmt: skip


@pytest.mark.parametrize("config", PEFT_CASES.values(), ids=PEFT_CASES.keys())
def test_peft_loads_each_exported_method_with_our_logits_and_we_read_it_back(hf_dir, tmp_path, config):
    model = perturbed(hf_dir, config)
    ours = logits(model)
    write_peft(model, tmp_path / "peft")
    peft_model, theirs = peft_logits(tmp_path / "peft")
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - logits(load_model(hf_dir, adapter_config=LoraConfig()))).abs().max().item() > 1e-2  # it acts
    # PEFT's own save of what it loaded: the same keys, tensors and config values as ours
    peft_model.save_pretrained(tmp_path / "resaved")
    written, resaved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "resaved"))
    assert written.keys() == resaved.keys() and all(torch.equal(written[k], resaved[k]) for k in written)
    ours_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    as_set = {k: set(v) if k == "target_modules" else v for k, v in ours_config.items()}  # PEFT keeps a set
    assert {k: set(v) if k == "target_modules" else peft_config[k] for k, v in as_set.items()} == as_set
    # round trip: our import of the directory is the exported tensors (a tanh gate comes back as the raw tanh(g))
    back = load_model(hf_dir, adapter=tmp_path / "peft")
    _, exported = model.method.exported(model)
    tanh_gate = isinstance(config, LlamaAdapterConfig) and config.gate_fn == "tanh"
    for name, tensor in back.adapter_state_dict().items():
        expected = exported[name].tanh() if tanh_gate and name.endswith("adapter_gate") else exported[name]
        assert torch.equal(tensor, expected), name
    assert back.adapter_state_dict().keys() == exported.keys()
    assert (logits(back) - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "config, message",
    [
        (LlamaAdapterConfig(prompt_len=2, n_layers=2), r"layers\.1\.attention\.adapter_gate differs across heads"),
        (PrefixConfig(prefix_len=2, n_layers=2), r"PrefixConfig.n_layers=2: PEFT's prefix tuning puts prefixes on ev"),
        (AdapterV2Config(n_layers=1), r"PEFT has no llama_adapter_v2; the methods that export to PEFT: dora, "
                                      r"llama_adapter, lora, prefix, prompt, ptuning, ptuning_v2$"),
        (HoulsbyConfig(bottleneck=4), r"PEFT has no houlsby"),
    ],
    ids=["per-head gates", "prefix on top layers", "v2", "houlsby"],
)  # fmt: skip
def test_what_peft_cannot_express_is_refused_by_name_and_nothing_is_written(hf_dir, tmp_path, config, message):
    model = perturbed(hf_dir, config)
    if isinstance(config, LlamaAdapterConfig) and not isinstance(config, AdapterV2Config):
        with torch.no_grad():
            model.layers[1].attention.adapter_gate[0] += 1  # one head's gate differs
    with pytest.raises(ValueError, match=message):
        write_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_multimodal_adapter_exports_its_text_part_only_when_asked(hf_dir, tmp_path):
    model = perturbed(hf_dir, LoraConfig(rank=2, visual_layers=2), clip="tiny")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert (logits(model) - model(TOKENS, images).detach()).abs().max() > 1e-3  # the image acts
    with pytest.raises(ValueError, match="has a visual path .* pass --text-only"):
        write_peft(model, tmp_path / "refused")
    write_peft(model, tmp_path / "text", text_only=True)
    assert not any("visual" in k for k in load_file(tmp_path / "text" / "adapter_model.safetensors"))
    assert (peft_logits(tmp_path / "text")[1] - logits(model)).abs().max().item() <= 1e-4  # = ours without an image
    with pytest.raises(ValueError, match="LlamaForCausalLM has no image input: pass --text-only"):
        write_hf(model, tmp_path / "refused")
    write_hf(model, tmp_path / "merged", text_only=True)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(TOKENS).logits
    assert (merged - logits(model)).abs().max().item() <= 1e-4


def test_an_output_folder_holding_other_files_is_refused(hf_dir, tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds other files \(model.safetensors.index.json\); write into a new"):
        write_hf(load_model(hf_dir, adapter_config=LoraConfig()), tmp_path)


HF_CASES = {
    "lora on every linear": LoraConfig(rank=2, alpha=4, targets=ALL_LINEARS),
    "v2 bias, scale, lora, norms": AdapterV2Config(n_layers=0, bias_targets=("wq", "wk", "w2"), lora_rank=2,
                                                   lora_targets=("wk", "wv", "w1")),
    "v2 with closed gates": AdapterV2Config(n_layers=2, bias_targets=("wo",), norm_tuning="weight"),
}  # fmt: skip


@pytest.mark.parametrize("config", HF_CASES.values(), ids=HF_CASES.keys())
def test_transformers_loads_the_merged_checkpoint_with_our_logits(hf_dir, tmp_path, config):
    model = perturbed(hf_dir, config)
    if isinstance(config, AdapterV2Config):
        with torch.no_grad():
            for attention in model.method.adapted(model):
                attention.adapter_gate.zero_()  # prompts that add nothing fold away
    ours = logits(model)
    assert (ours - logits(load_model(hf_dir, adapter_config=LoraConfig()))).abs().max().item() > 1e-2
    write_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf(TOKENS).logits - ours).abs().max().item() <= 1e-4
    config_json = json.loads((tmp_path / "config.json").read_text())
    biased = isinstance(config, AdapterV2Config)
    assert (config_json["attention_bias"], config_json["mlp_bias"]) == (biased, biased and "w2" in config.bias_targets)


@pytest.mark.parametrize(
    "config, message",
    [
        (AdapterV2Config(n_layers=2), r"llama_adapter_v2 cannot be folded .* adaption prompts \(n_layers=2, gates not"),
        (LlamaAdapterConfig(prompt_len=2, n_layers=2), r"llama_adapter cannot be folded .* separate gated softmax"),
        (PrefixConfig(prefix_len=2), r"prefix cannot be folded into plain LLaMA weights: its prefixes are extra keys"),
        (PTuningConfig(n_tokens=2), r"ptuning cannot be folded .* soft tokens are extra input positions"),
        (HoulsbyConfig(bottleneck=4), r"houlsby cannot be folded .* bottleneck adapters"),
    ],
    ids=["v2 with open gates", "llama_adapter", "prefix", "ptuning", "houlsby"],
)  # fmt: skip
def test_methods_that_do_not_fold_are_refused_with_the_reason(hf_dir, tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        write_hf(perturbed(hf_dir, config), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_base_alone_round_trips_through_both_layouts_bit_exactly(hf_dir, tmp_path):
    """HF -> ours -> HF gives transformers' own tensors back; Meta -> HF -> ours gives the Meta weights back: the
    q / k permutation is inverted exactly, biases and all."""
    assert export_cli.main([str(hf_dir), "--to", "hf", str(tmp_path / "hf")]) == 0
    original, written = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)
    assert export_cli.main([str(TINY_BASE), "--to", "hf", str(tmp_path / "meta")]) == 0
    meta, back = load_model(TINY_BASE), load_model(tmp_path / "meta")
    assert back.config.llama == meta.config.llama
    assert all(torch.equal(a, b) for a, b in zip(meta.state_dict().values(), back.state_dict().values()))
    tied = make_hf_model(tie=True)  # one tensor for embedding and output: written twice (safetensors shares none)
    tied.save_pretrained(tmp_path / "tied")
    assert export_cli.main([str(tmp_path / "tied"), "--to", "hf", str(tmp_path / "untied")]) == 0
    untied = AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
    with torch.no_grad():
        assert torch.equal(untied(TOKENS).logits, tied(TOKENS).logits)


def test_the_exported_tokenizer_encodes_in_transformers_as_ours(tmp_path):
    assert export_cli.main([str(TINY_BASE), "--to", "hf", str(tmp_path)]) == 0
    ours, theirs = load_tokenizer(TINY_BASE / "tokenizer.model"), AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Question: which is a mammal?\nOptions: (A) cat (B) fish", " leading space", "two  spaces ", "é ü 🙂"]
    for text in texts:
        assert theirs.encode(text) == ours.encode(text, bos=True), text
        assert theirs.decode(theirs.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text))
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)


def test_the_command_exports_a_run_to_peft_and_hf_and_names_what_it_refuses(tmp_path, capsys):
    """A run on the Meta tiny base: its base exported to HF, the run to PEFT on top of it and merged to HF, all
    three with our logits; V1 prompts to HF are refused with exit status 2."""
    run = tmp_path / "run"
    model = perturbed(TINY_BASE, LoraConfig(rank=2, alpha=2, targets=("wq", "wk", "w2")))
    save_adapter(model, run, base=TINY_BASE)
    ours = logits(model)
    assert export_cli.main([str(TINY_BASE), "--to", "hf", str(tmp_path / "base")]) == 0
    assert export_cli.main([str(run), "--to", "peft", str(tmp_path / "peft")]) == 0
    assert "(PEFT LORA adapter)" in capsys.readouterr().out
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert (peft_logits(tmp_path / "peft", base)[1] - ours).abs().max().item() <= 1e-4
    assert export_cli.main([str(run), "--to", "hf", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(TOKENS).logits
    assert (merged - ours).abs().max().item() <= 1e-4
    save_adapter(perturbed(TINY_BASE, LlamaAdapterConfig(prompt_len=2, n_layers=2)), tmp_path / "v1", base=TINY_BASE)
    assert export_cli.main([str(tmp_path / "v1"), "--to", "hf", str(tmp_path / "no")]) == 2
    assert "llama_adapter cannot be folded into plain LLaMA weights" in capsys.readouterr().err


@pytest.mark.parametrize("rope", [{}, {"rope_scaling_factor": 8.0, "rope_low_freq_factor": 1.0,
                                      "rope_high_freq_factor": 4.0, "rope_original_max_seq_len": 64}],
                         ids=["default", "llama3"])  # fmt: skip
def test_the_hf_config_reads_back_as_the_same_architecture(rope):
    from transformers import LlamaConfig as HFLlamaConfig

    llama = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_dim=176, max_seq_len=128,
                        rope_theta=5000.0, **rope)  # fmt: skip
    cfg = llama.to_hf_config()
    assert LlamaConfig.from_hf_config(cfg) == llama
    parameters = HFLlamaConfig(**cfg).rope_parameters  # transformers reads the RoPE the same way
    assert parameters["rope_theta"] == 5000.0 and parameters.get("factor") == rope.get("rope_scaling_factor")
