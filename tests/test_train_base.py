"""assets/tiny-base (the embedded default's frozen base) and scripts/build_tiny_base.py that writes it."""

import json
import subprocess
import sys

import torch

from data.scienceqa import Problem, build_prompt
from data.synthetic import scienceqa_drafts
from model import load_model
from model.config import PRESETS
from training.config import REPO_ROOT, TINY_BASE

SCRIPT = REPO_ROOT / "scripts" / "build_tiny_base.py"


def test_the_committed_base_is_the_tiny_preset_in_meta_layout_under_10_mb():
    base = TINY_BASE
    assert sorted(p.name for p in base.iterdir()) == [
        "README.md",
        "consolidated.00.pth",
        "params.json",
        "tokenizer.model",
    ]
    assert sum(p.stat().st_size for p in base.iterdir()) < 10 * 2**20
    model = load_model(base)
    assert model.config.llama == PRESETS["tiny"]
    assert model.tokenizer.vocab_size == 512 and (model.tokenizer.bos_id, model.tokenizer.eos_id) == (1, 2)
    # A language model, not random weights: it writes the answer format it was trained on.
    record = next(d.record for d in scienceqa_drafts(5, 50) if d.drawing is None)
    problem = Problem(pid="1", image_path=None, split="test", **{k: v for k, v in record.items() if k != "image"})
    answer = model.generate(build_prompt(problem), max_new_tokens=8, temperature=0)
    assert answer.startswith("The answer is (")


def test_the_script_writes_a_loadable_base_and_documents_it(tmp_path):
    out = tmp_path / "base"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "3"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {out}" in done.stdout
    params = json.loads((out / "params.json").read_text())
    assert params == {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 16,
                      "norm_eps": 1e-06, "rope_theta": 10000.0, "max_seq_len": 512}  # fmt: skip
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert not any("adapter" in k for k in state) and all(t.dtype == torch.float32 for t in state.values())
    assert load_model(out).config.llama == PRESETS["tiny"]
    readme = (out / "README.md").read_text()
    assert "- steps: 3" in readme and "| with an image (not given to the base) |" in readme
    # Same seed, same steps, same bytes (one thread in the script).
    again = tmp_path / "again"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(again), "--steps", "3"], check=True, capture_output=True)
    assert (again / "consolidated.00.pth").read_bytes() == (out / "consolidated.00.pth").read_bytes()
    assert (again / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()


def test_the_demo_base_has_read_the_demos_chats_and_its_settings_are_recorded(tmp_path):
    from data.prompts import chat_prompt

    model = load_model(REPO_ROOT / "assets" / "tiny-demo-base")
    assert model.config.llama == PRESETS["tiny"]
    # It writes the demo's answer template (the colour is the picture's, which it never sees: the adapter's job).
    assert model.generate(chat_prompt([], "What color is the shape in the picture?"), max_new_tokens=8,
                          temperature=0).startswith("The shape is ")  # fmt: skip
    out = tmp_path / "demo-base"
    done = subprocess.run([sys.executable, str(SCRIPT), "--demo", "--out", str(out), "--steps", "2"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    readme = (out / "README.md").read_text()
    assert readme.startswith("# demo-base\n") and "the demo's chats" in readme and "- n_chats: 1500" in readme


def test_bad_arguments_are_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "0", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "--steps must be >= 1, got 0" in done.stderr
    assert not (tmp_path / "b").exists()
