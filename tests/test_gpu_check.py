"""scripts/gpu_check.sh and its collector bench/gpu_check.py: the dry run (tiny shape on the CPU) runs every stage
end to end and produces the table; a stage that fails still leaves a table that says so."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import collect, to_markdown

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dry_run_runs_every_stage_and_prints_the_table(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((out / "gpu_check.json").read_text())
    assert [s["stage"] for s in check["stages"]] == ["train", "generate_eager", "generate_compiled", "memory_nf4"]
    assert all(s["exit_status"] == 0 for s in check["stages"])
    train = check["train"]
    assert train["ours"]["useful_tokens_per_s"] > 0 and train["peft"]["useful_tokens_per_s"] > 0
    assert train["alpaca_5_epochs_minutes"] > 0
    assert train["ours"]["mfu_useful"] is None  # a CPU has no known peak: no MFU is made up
    (row,) = check["decode"]
    assert row["batch"] == 2
    for kind in ("eager", "compiled"):
        assert row[kind]["decode_tokens_per_s"] > 0 and row[kind]["speedup_vs_peft"] > 0
        assert row[kind]["greedy_agree_with_peft"]  # fp32: ours (eager or compiled) decodes as PEFT does
    assert check["reports"]["generate_compiled"]["config"]["compile"] is True
    assert check["reports"]["generate_eager"]["config"]["compile"] is False
    assert check["memory_nf4"]["setup"]["quantize"] == "nf4" and check["memory_nf4"]["measured_peak_gib"] > 0
    table = (out / "gpu_check.md").read_text()
    assert table in proc.stdout
    for heading in ("Training step", "Greedy decode", "NF4 training memory", "| 2 |"):
        assert heading in table


def test_a_failed_stage_is_shown_and_the_others_still_fill_their_rows(tmp_path):
    (tmp_path / "stages.tsv").write_text("train\t1\t3.5\ngenerate_eager\t124\t100.0\n")
    (tmp_path / "generate_eager.json").write_text("{}")  # left by a stage that timed out: not read
    check = collect(tmp_path)
    assert check["train"] is None and check["decode"] == [] and check["memory_nf4"] is None
    table = to_markdown(check)
    assert "train FAILED 4 s" in table and "generate_eager TIMED OUT 100 s" in table
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", str(tmp_path)], cwd=ROOT, capture_output=True)
    assert proc.returncode == 1 and (tmp_path / "gpu_check.md").is_file()


def test_the_collector_names_a_missing_or_malformed_stage_record(tmp_path):
    with pytest.raises(FileNotFoundError, match="stages.tsv"):
        collect(tmp_path)
    (tmp_path / "stages.tsv").write_text("train 0 1.0\n")
    with pytest.raises(ValueError, match=r"stages.tsv:1"):
        collect(tmp_path)
