"""model/hub.py: Hugging Face Hub ids where a path is expected (--base owner/name[@revision], --clip-weights as an
open_clip tag or a hub file), resolved through huggingface_hub's cache; tested offline (HF_HUB_OFFLINE=1) against a
cache the tests populate, never the network."""

import shutil
from pathlib import Path

import pytest
import torch

from model import CheckpointError, load_model
from model.hub import BASE_PATTERNS, is_hub_id, resolve_base, resolve_clip_weights
from tests.test_checkpoint import VOCAB, make_hf_model, write_hf_bin

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached(cache: Path, repo: str, files: dict[str, Path], revision: str = "main", commit: str = COMMIT) -> Path:
    """The hub cache's layout for ``repo`` at ``commit`` (models--owner--name/snapshots/<commit>/..., refs/<rev>)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline: nothing can reach the network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_loads_its_cached_snapshot_like_the_local_folder(hub_cache, hf_dir):
    cached(hub_cache, "meta-llama/Tiny-hf", {p.name: p for p in hf_dir.iterdir()})
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model("meta-llama/Tiny-hf")(tokens), load_model(hf_dir)(tokens))


def test_a_revision_picks_its_commit_and_only_the_needed_files_are_taken(hub_cache, hf_dir, tmp_path):
    other = "f" * 40
    files = {p.name: p for p in hf_dir.iterdir()}
    cached(hub_cache, "o/tiny", files)
    (tmp_path / "notes.md").write_text("a model card")
    snapshot = cached(hub_cache, "o/tiny", files | {"README.md": tmp_path / "notes.md"}, revision="v2", commit=other)
    assert Path(resolve_base("o/tiny@v2")) == snapshot and Path(resolve_base("o/tiny")).name == COMMIT
    assert "config.json" in BASE_PATTERNS and not any(p in ("README.md", "*.md") for p in BASE_PATTERNS)


def test_pytorch_bin_weights_are_taken_when_the_repository_has_no_safetensors(hub_cache, tmp_path):
    write_hf_bin(make_hf_model(), tmp_path / "bin", sharded=False)
    cached(hub_cache, "o/old", {p.name: p for p in (tmp_path / "bin").iterdir()})
    assert load_model("o/old").config.llama.vocab_size == VOCAB


def test_an_id_missing_from_the_cache_offline_is_one_error_saying_what_to_do(hub_cache):
    with pytest.raises(CheckpointError, match=r"o/absent is not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model("o/absent")


def test_a_gated_or_unknown_repository_is_one_error_naming_it(monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub import errors

    url = "https://huggingface.co/api/models/meta-llama/Llama-2-7b-hf"
    response = httpx.Response(403, request=httpx.Request("GET", url))

    def gated(**kwargs):
        raise errors.GatedRepoError("Access to model meta-llama/Llama-2-7b-hf is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(CheckpointError, match=r"meta-llama/Llama-2-7b-hf is gated: accept its licence at "
                                              r"https://huggingface.co/meta-llama/Llama-2-7b-hf"):  # fmt: skip
        resolve_base("meta-llama/Llama-2-7b-hf")

    def unknown(**kwargs):
        raise errors.RepositoryNotFoundError("404", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unknown)
    with pytest.raises(CheckpointError, match=r"no repository o/typo on the Hugging Face Hub, or a private one"):
        resolve_base("o/typo")


def test_local_paths_and_presets_are_never_taken_for_hub_ids(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: pytest.fail("the hub was asked"))
    local = tmp_path / "owner" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("owner/name") and resolve_base("owner/name") == "owner/name"  # exists: a path
    assert not is_hub_id("7B") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    assert load_model("tiny").config.llama.dim == 64  # a preset
    with pytest.raises(CheckpointError, match=r"nope/: no such base directory, not a Hugging Face Hub id"):
        load_model("nope/")


def test_clip_weights_as_an_open_clip_tag_or_a_hub_file(hub_cache, tmp_path):
    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"weights")
    cached(hub_cache, "timm/vit_large_patch14_clip_224.openai", {weights.name: weights})
    resolved = Path(resolve_clip_weights("openai", "ViT-L-14-quickgelu"))
    assert resolved.read_bytes() == b"weights" and resolved.parent.name == COMMIT
    cached(hub_cache, "o/clip", {"ViT.safetensors": weights})
    assert Path(resolve_clip_weights("o/clip/ViT.safetensors", "ViT-L-14")).read_bytes() == b"weights"
    assert resolve_clip_weights(str(weights), "ViT-L-14") == str(weights) and resolve_clip_weights(None, "x") is None
    with pytest.raises(CheckpointError, match=r"ViT-L-14-quickgelu openai: timm/vit_large_patch14_clip_224.openai is "
                                              r"not in the Hugging Face cache"):  # fmt: skip
        shutil.rmtree(hub_cache / "models--timm--vit_large_patch14_clip_224.openai")
        resolve_clip_weights("openai", "ViT-L-14-quickgelu")
