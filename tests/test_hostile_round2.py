"""Hostile files, round 2 (issue 26): type confusion, sizes that would allocate before any check, nesting that
overflows the recursion limit, sidecars from the future and keys given twice. Each gets one error naming the file
and the field or key; nothing is built or written for them."""

import json
import os
import re
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
        (lambda s: method_values(s).update(prompt_len=4.0), r"LlamaAdapterConfig\.prompt_len = 4\.0 is not int"),
        (lambda s: method_values(s).update(prompt_len=True), r"LlamaAdapterConfig\.prompt_len = True is not int"),
        (
            lambda s: method_values(s).update(gate_fn=["tanh"]),
            r"LlamaAdapterConfig\.gate_fn = \['tanh'\] is not Literal",
        ),
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

    from data.llava import load_examples
    from data.prompts import CHAT_MAX_TURNS

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


# ---- Meta's checklist.chk -------------------------------------------------------------------------------------------
def meta_base(tmp_path: Path) -> Path:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(TINY_BASE, base)
    return base


def write_checklist(base: Path, lines: list[str] | None = None) -> None:
    from model.checkpoint.meta import file_md5

    if lines is None:  # as Meta ships it: md5sum's output for the shards and params.json
        lines = [f"{file_md5(base / name)}  {name}" for name in ("consolidated.00.pth", "params.json")]
    (base / "checklist.chk").write_text("".join(line + "\n" for line in lines))


def flip_inside_tensor_data(path: Path, size: int = 4096) -> None:
    """XOR 1 into ``size`` bytes in the middle of the largest tensor's data in a torch zip file: every value stays
    finite (no NaN check can see it), the zip structure stays valid."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - size // 2
    raw[start : start + size] = bytes(b ^ 1 for b in raw[start : start + size])
    path.write_bytes(bytes(raw))


def changed_weights(model, reference) -> list[str]:
    ours, theirs = model.state_dict(), reference.state_dict()
    return [name for name in ours if not torch.equal(ours[name], theirs[name])]


def test_flipped_bytes_in_a_meta_shard_are_refused_by_its_checklist_naming_the_file(tmp_path):
    base = meta_base(tmp_path)
    write_checklist(base)
    original = load_model(TINY_BASE)
    assert changed_weights(load_model(base), original) == []  # an intact checklist passes
    shard = base / "consolidated.00.pth"
    flip_inside_tensor_data(shard)
    damaged = load_model(base, verify_checksums=False)  # what loading without the checklist gives: no error
    assert len(changed_weights(damaged, original)) == 1
    refusal = rf"^{re.escape(str(shard))}: md5 [0-9a-f]{{32}} differs from [0-9a-f]{{32}} in checklist\.chk; "
    with pytest.raises(CheckpointError, match=refusal + r"the file is damaged or incomplete \(download it again\)$"):
        load_model(base)
    (base / "checklist.chk").unlink()
    assert changed_weights(load_model(base), damaged) == []  # no checklist: nothing changes


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["0" * 32 + "  params.json"], r"checklist\.chk: does not list consolidated\.00\.pth"),
        (["0" * 32 + "  consolidated.00.pth", "not a sum"], r"checklist\.chk:2: expected '<md5 hex>  <file name>'"),
        (["0" * 32 + " *consolidated.00.pth", "0" * 32 + "  ../params.json"],
         r"checklist\.chk:2: '\.\./params\.json' is not a file name in this directory"),
        (["0" * 32 + "  consolidated.00.pth", "0" * 32 + "  consolidated.01.pth"],
         r"consolidated\.01\.pth: listed in checklist\.chk but missing \(or not a regular file\)"),
        (["0" * 32 + "  consolidated.00.pth", "0" * 32 + "  fifo"],  # a FIFO would block a read forever
         r"fifo: listed in checklist\.chk but missing \(or not a regular file\)"),
    ],
)  # fmt: skip
def test_a_checklist_that_does_not_fit_is_one_error_naming_the_line_or_file(tmp_path, lines, message):
    base = meta_base(tmp_path)
    os.mkfifo(base / "fifo")
    write_checklist(base, lines)
    with pytest.raises(CheckpointError, match=message):
        load_model(base)


# ---- --model.quantize -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["int3", "", "nf4 ", "4", "NF4", 4])
def test_a_quantize_value_outside_the_choices_is_refused_before_any_weight_is_read(value, monkeypatch):
    monkeypatch.setattr("model.loading.open_base", lambda *a, **k: pytest.fail("the base was opened"))
    refusal = rf"^quantize={re.escape(repr(value))} is not supported; choose one of nf4, int8$"
    with pytest.raises(ValueError, match=refusal):
        load_model(TINY_BASE, quantize=value)


def test_a_quantize_value_outside_the_choices_is_one_usage_error_from_the_command_line_and_from_config_json(
    tmp_path, capsys
):
    from training.cli import ConfigError, parse_args
    from training.config import config_to_dict
    from training.state import read_run_config

    for value in ("nf4 ", "int3"):
        with pytest.raises(SystemExit) as stop:
            parse_args(["--model.quantize", value])
        assert stop.value.code == 2
        expected = f"train.py: error: argument --model.quantize: {value!r}: expected one of none, nf4, int8\n"
        assert capsys.readouterr().err.endswith(expected)
    values = config_to_dict(parse_args([]).config)
    values["model"]["quantize"] = 3
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=r"config\.json: setting model\.quantize = 3; choose one of none, nf4, int8$"):
        read_run_config(tmp_path)
