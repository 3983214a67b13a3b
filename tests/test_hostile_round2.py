"""Hostile files, round 2 (issue 26): type confusion, sizes that would allocate before any check, nesting that
overflows the recursion limit, sidecars from the future and keys given twice. Each gets one error naming the file
and the field or key; nothing is built or written for them."""

import json
from pathlib import Path

import pytest
import torch

from eval import scienceqa as sqa_eval
from model import CheckpointError, load_model, save_adapter
from model.methods import method_class
from tests.test_eval_scienceqa import OUTPUTS, write_scienceqa
from tests.test_method_contract import TINY_BASE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Our adapter (V1 prompts on the tiny base) saved once; each test edits a copy of its sidecar."""
    folder = tmp_path_factory.mktemp("ours")
    config = method_class("llama_adapter").config_class(prompt_len=4, n_layers=2)
    save_adapter(load_model(TINY_BASE, adapter_config=config), folder, base=TINY_BASE)
    return folder


def edited(saved: Path, tmp_path: Path, edit) -> Path:
    for name in ("adapter.safetensors", "adapter.json"):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    sidecar = json.loads((tmp_path / "adapter.json").read_text())
    edit(sidecar)
    (tmp_path / "adapter.json").write_text(json.dumps(sidecar))
    return tmp_path


def method_values(sidecar: dict) -> dict:
    return sidecar["model_config"]["method_config"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: method_values(s).update(prompt_len=4.0), r"AdapterConfig\.prompt_len = 4\.0 is not int"),
        (lambda s: method_values(s).update(prompt_len=True), r"AdapterConfig\.prompt_len = True is not int"),
        (lambda s: method_values(s).update(gate_fn=["tanh"]), r"AdapterConfig\.gate_fn = \['tanh'\] is not Literal"),
        (lambda s: s.update(version=99), r"field version is 99; this code reads sidecar versions 1 and 2"),
        # 10**9 prompts of width 64 would be 256 GB: refused from the meta-device shapes, before any allocation
        (
            lambda s: method_values(s).update(prompt_len=10**9),
            r"(?s)mis-shaped keys.*adapter_prompt: \(4, 64\) vs \(1000000000, 64\)",
        ),
    ],
)
def test_a_hostile_sidecar_names_the_field(saved, tmp_path, edit, message):
    folder = edited(saved, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as error:
        load_model(TINY_BASE, folder)
    assert str(folder) in str(error.value)


@pytest.mark.parametrize("name", ["adapter.json", "adapter_config.json"])
def test_json_nested_past_the_recursion_limit_is_one_error(saved, tmp_path, name):
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000
    if name == "adapter.json":
        folder = edited(saved, tmp_path, lambda s: None)
    else:
        folder = tmp_path
        (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / name).write_text(deep)
    with pytest.raises(CheckpointError, match=rf"{name}: JSON nested too deeply to read"):
        load_model(TINY_BASE, folder)


@pytest.mark.parametrize("peft_type", [["LORA"], {"x": 1}, 7])
def test_a_peft_type_that_is_no_name_is_refused_naming_it(tmp_path, peft_type):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: peft_type=.*; supported: ADAPTION_PROMPT"):
        load_model(TINY_BASE, tmp_path)


def duplicate_key(text: str, key: str, value) -> str:
    """``text`` (a JSON object) with ``key`` given a second time at its end."""
    return text.rstrip()[:-1] + f", {json.dumps(key)}: {json.dumps(value)}}}"


def test_keys_given_twice_and_outputs_that_are_no_text_are_one_error_line(tmp_path, capsys):
    root = write_scienceqa(tmp_path / "scienceqa")
    results = {pid: 0 for pid in OUTPUTS}
    good = {"results": results, "outputs": OUTPUTS}
    cases = {
        "a pid twice in the results": json.dumps(good).replace('"results": {', '"results": {"1": 1, ', 1),
        "outputs[pid] a number": json.dumps({"results": {"1": -1}, "outputs": {"1": 5}}),
    }
    messages = {"a pid twice in the results": "key '1' appears twice in one object",
                "outputs[pid] a number": "outputs['1'] = 5; expected the generated text"}  # fmt: skip
    for case, text in cases.items():
        (tmp_path / "p.json").write_text(text)
        assert sqa_eval.main(["--predictions", str(tmp_path / "p.json"), "--data", str(root)]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and messages[case] in err and err.count("\n") == 1, (case, err)
    problems = (root / "problems.json").read_text()
    (root / "problems.json").write_text(duplicate_key(problems, "1", json.loads(problems)["2"]))
    (tmp_path / "p.json").write_text(json.dumps(good))
    assert sqa_eval.main(["--predictions", str(tmp_path / "p.json"), "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert "problems.json: key '1' appears twice in one object" in err and err.count("\n") == 1


def test_a_peft_rank_of_a_billion_is_refused_before_it_is_allocated(tmp_path):
    from safetensors.torch import save_file

    config = {"peft_type": "LORA", "r": 10**9, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for layer in range(4):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors |= {f"{prefix}.lora_A.weight": torch.zeros(4, 64), f"{prefix}.lora_B.weight": torch.zeros(64, 4)}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)mis-shaped keys.*adapter_lora_a: \(4, 64\) vs \(1000000000, 64\)"):
        load_model(TINY_BASE, tmp_path)


def test_a_lone_surrogate_is_refused_by_the_tokenizer_naming_where_it_is():
    from model import load_tokenizer

    tokenizer = load_tokenizer(Path(TINY_BASE) / "tokenizer.model")
    with pytest.raises(ValueError, match=r"lone surrogate \\ud800 at character 2"):
        tokenizer.encode("a \ud800 b")
    assert tokenizer.encode("a \U0001f600 b")  # a real pair (one code point) is text


def peft_lora_dir(folder: Path, lora_b: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for layer in range(4):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors |= {f"{prefix}.lora_A.weight": torch.zeros(4, 64), f"{prefix}.lora_B.weight": lora_b.clone()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: t.fill_(float("nan")), r"layers\.2\.attention\.adapter_prompt holds 256 non-finite values"),
        (lambda t: t.to(torch.int64), r"layers\.2\.attention\.adapter_prompt is torch\.int64; adapter tensors must be"),
        (lambda t: t > 0, r"layers\.2\.attention\.adapter_prompt is torch\.bool"),
    ],
)
def test_non_finite_or_non_float_adapter_tensors_are_refused_naming_them(saved, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    folder = edited(saved, tmp_path, lambda s: None)
    tensors = load_file(folder / "adapter.safetensors")
    name = "layers.2.attention.adapter_prompt"
    tensors[name] = damage(tensors[name].clone())
    save_file(tensors, str(folder / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match=rf"adapter\.safetensors: {message}"):
        load_model(TINY_BASE, folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_peft_lora_b_or_a_v1_release_file_that_is_not_finite_is_refused(tmp_path, value):
    peft = peft_lora_dir(tmp_path, torch.full((64, 4), value))
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: .*lora_B\.weight holds 256 non-finite"):
        load_model(TINY_BASE, peft)
    v1 = {"adapter_query.weight": torch.full((20, 64), value), "layers.3.attention.gate": torch.zeros(1)}
    torch.save(v1 | {"layers.2.attention.gate": torch.zeros(1)}, tmp_path / "v1.pth")
    with pytest.raises(CheckpointError, match=r"v1\.pth: adapter_query\.weight holds 1,280 non-finite values"):
        load_model(TINY_BASE, tmp_path / "v1.pth")


def test_a_caption_of_twenty_megabytes_is_refused_at_once(tmp_path, capsys):
    from data.synthetic import make_coco
    from eval import coco

    root = make_coco(tmp_path / "coco", n_train=1, n_restval=1, n_val=1, n_test=1, image_size=32)
    image_id = json.loads((root / "dataset_coco.json").read_text())["images"][-1]["cocoid"]
    (tmp_path / "r.json").write_text(json.dumps([{"image_id": image_id, "caption": "a " * 10_000_000}]))
    argv = ["--results", str(tmp_path / "r.json"), "--annotations", str(root / "dataset_coco.json")]
    assert coco.main(argv) == 2
    assert "caption of 20,000,000 characters, over the limit of 10,000" in capsys.readouterr().err


def test_a_conversation_of_1500_exchanges_costs_linear_time(tmp_path):
    from PIL import Image

    from data.llava import CHAT_MAX_TURNS, load_examples

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    turns = [{"from": f, "value": f"{f} message {i}"} for i in range(1500) for f in ("human", "gpt")]
    record = {"id": "long", "image": "a.jpg", "conversations": turns}
    (tmp_path / "llava.json").write_text(json.dumps([record]))
    examples = load_examples(tmp_path / "llava.json")
    assert len(examples) == 1500
    last = examples[-1].prompt
    assert last.count("User: ") == CHAT_MAX_TURNS + 1 and "human message 1243" in last
    assert "human message 1499" in last and "human message 1242" not in last


def test_a_meta_base_of_nan_is_refused_naming_the_tensor(tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(TINY_BASE, base)
    state = torch.load(base / "consolidated.00.pth", weights_only=True)
    state["layers.1.feed_forward.w2.weight"] = torch.full_like(state["layers.1.feed_forward.w2.weight"], float("nan"))
    torch.save(state, base / "consolidated.00.pth")
    with pytest.raises(
        CheckpointError, match=r"consolidated\.00\.pth: layers\.1\.feed_forward\.w2\.weight: 4096 of 4096 sampled"
    ):
        load_model(base)
