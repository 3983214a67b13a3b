"""Hugging Face Hub ids where a local path is expected: ``--base meta-llama/Llama-2-7b-hf`` and ``--clip-weights``
as an open_clip pretrained tag (``openai``, ``laion2b_s32b_b82k``) or a hub file (``owner/name/file.safetensors``).

Resolved with ``huggingface_hub``, so its cache (``HF_HOME`` / ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``:
the cache only), tokens (``HF_TOKEN`` or ``hf auth login``) and resumable downloads all apply. Only the files a
base needs are fetched (``BASE_PATTERNS``: config, safetensors weights with their index, Meta's params.json and
consolidated.*.pth, the tokenizer files; ``pytorch_model*.bin`` only when the repository has no safetensors).
A path that exists is always taken as a path; a name that is neither a path nor a hub id is left for the caller's
"no such file" error. Every failure is one ``CheckpointError`` naming the id and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from model.checkpoint.files import CheckpointError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[\w./-]{1,128}))?$")
"""``owner/name`` with an optional ``@revision`` (branch, tag or commit)."""
HUB_FILE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})/(?P<file>[\w./-]+\.(?:safetensors|bin|pt|pth))$"
)
"""``owner/name/path/in/repo.safetensors``: one weights file of a repository."""
BASE_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "params.json",
    "consolidated.*.pth", "checklist.chk", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json",
)  # fmt: skip
BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
"""Fetched only when the repository has no safetensors weights (older Hugging Face uploads)."""


def is_hub_id(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names a hub repository rather than a local path (a path that exists always wins)."""
    text = str(ref)
    return not Path(text).exists() and HUB_ID.match(text) is not None


def resolve_base(ref: str | Path) -> str | Path:
    """The local directory of a base: ``ref`` itself unless it is a hub id, then its snapshot in the hub cache
    (downloaded when absent and the hub is reachable)."""
    if not is_hub_id(ref):
        return ref
    match = HUB_ID.match(str(ref))
    repo, revision = match["repo"], match["revision"]
    folder = Path(_download(str(ref), "snapshot_download", repo_id=repo, revision=revision,
                            allow_patterns=list(BASE_PATTERNS)))  # fmt: skip
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("consolidated.*.pth")):
        folder = Path(_download(str(ref), "snapshot_download", repo_id=repo, revision=revision,
                                allow_patterns=list(BIN_PATTERNS)))  # fmt: skip
    return folder


def resolve_clip_weights(ref: str | Path | None, clip_model: str) -> str | Path | None:
    """A local CLIP weights file: ``ref`` itself when it exists (or is None); an open_clip pretrained tag of
    ``clip_model`` (its hub file, safetensors preferred); or ``owner/name/file`` on the hub."""
    if ref is None or Path(ref).exists():
        return ref
    text = str(ref)
    if match := HUB_FILE.match(text):
        return _download(text, "hf_hub_download", repo_id=match["repo"], filename=match["file"])
    tags = _open_clip_tags(clip_model)
    if text in tags:
        import open_clip

        hub = (open_clip.get_pretrained_cfg(clip_model, text) or {}).get("hf_hub", "").strip("/")
        if not hub:
            raise CheckpointError(f"--clip-weights {text}: open_clip has no hub copy of {clip_model} {text}")
        repo, filename = os.path.split(hub) if hub.count("/") > 1 else (hub, "")  # 'org/name[/file]'
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names[:-1]:  # safetensors first, as open_clip prefers it
            try:
                return _download(f"{clip_model} {text}", "hf_hub_download", repo_id=repo, filename=name)
            except CheckpointError:
                pass
        return _download(f"{clip_model} {text}", "hf_hub_download", repo_id=repo, filename=names[-1])
    return ref


def _open_clip_tags(clip_model: str) -> list[str]:
    if clip_model in ("tiny", "openai"):
        return []
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(clip_model))


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (at call time, so a changed environment counts)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _download(what: str, function: str, **kwargs: Any) -> str:
    """huggingface_hub.<function>(**kwargs), its errors as one CheckpointError naming ``what``."""
    import huggingface_hub
    from huggingface_hub import errors

    repo = kwargs["repo_id"]
    try:
        return getattr(huggingface_hub, function)(**kwargs, local_files_only=offline())
    except errors.GatedRepoError:
        raise CheckpointError(
            f"{what}: the repository {repo} is gated: accept its licence at https://huggingface.co/{repo} with your "
            "account, then log in here (hf auth login, or set HF_TOKEN)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"{what}: no repository {repo} on the Hugging Face Hub, or a private one this machine has no token for "
            "(hf auth login, or set HF_TOKEN); a local path must exist"
        ) from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{what}: the repository {repo} has no revision {kwargs.get('revision')!r}") from None
    except errors.IncompleteSnapshotError:
        raise CheckpointError(
            f"{what}: the cached copy of {repo} is incomplete (an interrupted download): run again with the hub "
            "reachable and the download resumes"
        ) from None
    except errors.LocalEntryNotFoundError as e:  # not cached, and offline or the hub unreachable
        if offline():
            raise CheckpointError(
                f"{what}: {repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: fetch it once with the "
                "hub reachable (unset HF_HUB_OFFLINE), or pass a local path"
            ) from None
        raise CheckpointError(
            f"{what}: {repo} could not be fetched and is not in the Hugging Face cache ({e})"
        ) from None
    except errors.EntryNotFoundError:
        raise CheckpointError(f"{what}: the repository {repo} has no file {kwargs.get('filename')!r}") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:  # network, disk, an incomplete snapshot
        raise CheckpointError(f"{what}: could not fetch {repo} from the Hugging Face Hub: {e}") from None
