"""Tokenizers behind one interface: Meta's sentencepiece ``tokenizer.model`` and Hugging Face ``tokenizer.json``.

Meta-style framing for both (as in the LLaMA and LLaMA-Adapter code): ``encode(text, bos, eos)`` encodes the text
without special tokens and adds BOS / EOS ids explicitly, so a prompt and its target can be encoded apart and
concatenated with an exact boundary (data/collate.py relies on this). ``decode`` drops control / special tokens.

Special ids: a sentencepiece model carries them (Meta: unk 0, bos 1, eos 2, pad -1 = none -> ``pad_id`` None).
A tokenizer.json does not say which token is BOS or EOS; they are read from ``tokenizer_config.json`` /
``special_tokens_map.json`` / ``config.json`` / ``generation_config.json`` beside it, else recognized by the usual
names (``<s>`` / ``</s>``, ``<|begin_of_text|>`` / ``<|end_of_text|>``). An EOS is required (generation stops on
it and training appends it); BOS and pad may be absent (None).

Streaming (``decode_stream``): the decoder re-decodes the ids pushed so far and returns what is new, holding back
an incomplete multi-byte character (rendered as U+FFFD until its last byte arrives). Both backends decode
prefix-stably (sentencepiece strips only the very first piece's leading space; the Llama tokenizer.json ends with a
``Strip`` of one leading space), so the pieces concatenate to exactly the one-shot ``decode``. Re-decoding costs
O(n) per token, microseconds at generation lengths, and is what makes the equality hold by construction.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
REPLACEMENT_CHAR = "\ufffd"

# Names tried, in order, when no config file beside a tokenizer.json says which token is which.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")
_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
"""Halves of a UTF-16 pair alone in a str: Python allows them, no tokenizer can encode them."""


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (missing, corrupt, not a tokenizer, no EOS token); names the file."""


class StreamDecoder:
    """Incremental decoding: ``push(token_id)`` returns the text that token completed (possibly "")."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (an unfinished multi-byte character is held back)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        stable = text.rstrip(REPLACEMENT_CHAR)  # a trailing U+FFFD may still become a character
        return self._advance(stable)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end, as U+FFFD): call at end of stream."""
        return self._advance(self._decode(self._ids))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self._emitted) or not text.startswith(self._emitted):
            return ""
        new, self._emitted = text[len(self._emitted) :], text
        return new


class Tokenizer(ABC):
    """Common interface: ``encode`` / ``decode`` / ``decode_stream`` and the special ids.

    Subclasses implement ``_encode_text`` (no special tokens) and ``_decode_ids``.
    """

    path: Path
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False, *, specials: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS first / EOS last when asked (BOS only if the tokenizer has one).

        specials: read special tokens written in the text (``<s>``, ``</s>``, ``<|eot_id|>``) as their ids, as
        transformers does, for a rendered chat template (model.chat_template). A tokenizer.json always does (the
        tokenizers library matches its added tokens first); a sentencepiece model only when asked.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        lone = _LONE_SURROGATE.search(text)
        if lone is not None:  # not Unicode text: sentencepiece would raise a raw RuntimeError from its C++ side
            raise ValueError(
                f"text to encode holds a lone surrogate \\u{ord(lone.group()):04x} at character {lone.start()}: "
                "not Unicode text (a broken escape or a cut UTF-16 pair); remove or replace it"
            )
        ids = self._encode_specials(text) if specials else self._encode_text(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; BOS / EOS / other control tokens decode to nothing."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.path} (0..{self.vocab_size - 1})")
        return self._decode_ids(ids)

    def decode_stream(self) -> StreamDecoder:
        """A fresh incremental decoder whose pushed pieces concatenate to ``decode`` of all pushed ids."""
        return StreamDecoder(self.decode)

    @abstractmethod
    def hf_files(self) -> dict[str, bytes]:
        """The tokenizer as the files of a Hugging Face model directory that ``AutoTokenizer.from_pretrained`` reads
        and encodes with as ``encode(text)`` does (file name -> content)."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special (control) token, which ``decode`` drops."""

    @abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` without any special token."""

    def _encode_specials(self, text: str) -> list[int]:
        """Ids of ``text`` with the special tokens written in it read as their ids."""
        return self._encode_text(text)

    @abstractmethod
    def _decode_ids(self, ids: list[int]) -> str:
        """Text of in-vocabulary ``ids``, special tokens dropped."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


class SentencePieceTokenizer(Tokenizer):
    """Meta's ``tokenizer.model`` (sentencepiece); special ids come from the model itself."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(
                f"{self.path}: neither a sentencepiece tokenizer.model nor a tokenizer.json (corrupt or truncated?): "
                f"{e}"
            ) from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = _optional_id(self.sp.bos_id())
        eos = _optional_id(self.sp.eos_id())
        if eos is None:
            raise TokenizerError(f"{self.path}: the sentencepiece model defines no end-of-sequence token (eos_id -1)")
        self.eos_id = eos
        self.pad_id = _optional_id(self.sp.pad_id())
        self._specials: tuple[re.Pattern[str], dict[str, int]] | None = None

    def _encode_text(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def is_special(self, token_id: int) -> bool:
        return bool(self.sp.is_control(token_id) or self.sp.is_unknown(token_id))

    def _encode_specials(self, text: str) -> list[int]:
        """Each stretch of text between special pieces encoded on its own (a "▁" put before each, as the
        tokenizer.json of ``hf_files`` and transformers' Llama tokenizers do), the special pieces as their ids."""
        if self._specials is None:
            pieces = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.is_special(i)}
            pattern = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
            self._specials = (re.compile(f"({pattern})"), pieces)
        split, pieces = self._specials
        ids: list[int] = []
        for n, part in enumerate(split.split(text)):
            if n % 2:
                ids.append(pieces[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def hf_files(self) -> dict[str, bytes]:
        """tokenizer.model itself, and a tokenizer.json for transformers built from it: LLaMA's byte-fallback BPE
        with sentencepiece's whitespace handling (one "▁" put before the text, every space a "▁"; transformers 5's
        own LlamaTokenizer does not double a leading space as sentencepiece does). BPE models only (LLaMA's)."""
        from tokenizers import AddedToken, decoders, normalizers, processors
        from tokenizers import Tokenizer as _HFTokenizer
        from tokenizers.models import BPE

        sp, n = self.sp, self.vocab_size
        vocab = {sp.id_to_piece(i): i for i in range(n)}
        special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
        merges = []  # every split of a piece into two pieces, the best-scoring merged piece first (sentencepiece BPE)
        for piece, i in vocab.items():
            if i in special or sp.is_byte(i) or sp.is_unused(i):
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((-sp.get_score(i), vocab[left], vocab[right], left, right))
        merges.sort()
        unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
        tok = _HFTokenizer(
            BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
        )
        tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        names = {role: sp.id_to_piece(i) for role, i in (("bos", self.bos_id), ("eos", self.eos_id)) if i is not None}
        if self.bos_id is not None:
            bos = names["bos"]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
            )
        config = {f"{role}_token": name for role, name in names.items()} | {"unk_token": unk}
        return {
            "tokenizer.model": self.path.read_bytes(),
            "tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": _tokenizer_config(config),
        }

    def _decode_ids(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library); special ids from the config files beside it."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        try:
            self.tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the tokenizers library raises a bare Exception for any parse error
            raise TokenizerError(f"{self.path}: not a valid tokenizer.json (corrupt or truncated?): {e}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        names = _special_token_names(self.path.parent)
        self.bos_id = self._resolve(names.get("bos"), _BOS_NAMES)
        eos = self._resolve(names.get("eos"), _EOS_NAMES)
        if eos is None:
            raise TokenizerError(
                f"{self.path}: cannot tell which token is end-of-sequence; put a tokenizer_config.json with "
                '"eos_token" beside it'
            )
        self.eos_id = eos
        self.pad_id = self._resolve(names.get("pad"), ())

    def _resolve(self, named: str | int | None, fallbacks: tuple[str, ...]) -> int | None:
        """A configured token (name or id) must exist; else the first known name in the vocabulary, else None."""
        if isinstance(named, int):
            return named
        if named is not None:
            found = self.tok.token_to_id(named)
            if found is None:
                raise TokenizerError(f"{self.path}: special token {named!r} named beside it is not in the vocabulary")
            return found
        for name in fallbacks:
            found = self.tok.token_to_id(name)
            if found is not None:
                return found
        return None

    def _encode_text(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def is_special(self, token_id: int) -> bool:
        added = self.tok.get_added_tokens_decoder().get(token_id)
        return bool(added is not None and added.special) or token_id in (self.bos_id, self.eos_id, self.pad_id)

    def hf_files(self) -> dict[str, bytes]:
        """tokenizer.json and the config files beside it that name its special tokens; without a
        tokenizer_config.json, one naming BOS / EOS / pad as resolved here."""
        files = {"tokenizer.json": self.path.read_bytes()}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (self.path.parent / name).is_file():
                files[name] = (self.path.parent / name).read_bytes()
        if "tokenizer_config.json" not in files:
            roles = (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))
            names = {f"{role}_token": self.tok.id_to_token(i) for role, i in roles if i is not None}
            files["tokenizer_config.json"] = _tokenizer_config(names)
        return files

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _tokenizer_config(special_tokens: dict[str, str | None]) -> bytes:
    """A tokenizer_config.json for a tokenizer.json used as it is (transformers' generic fast tokenizer)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_tokens, "clean_up_tokenization_spaces": False}
    return (json.dumps(config, indent=2) + "\n").encode()


def _optional_id(value: int) -> int | None:
    """sentencepiece reports a missing special token as -1."""
    return None if value < 0 else value


def token_name(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_token_names(folder: Path) -> dict[str, str | int]:
    """{"bos" | "eos" | "pad": token name or id} from the first config files beside a tokenizer.json that say so."""
    found: dict[str, str | int] = {}
    for name in _SIDE_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{file}: invalid JSON ({e})") from None
        if not isinstance(data, dict):
            continue
        for role in ("bos", "eos", "pad"):
            if role in found:
                continue
            token = token_name(data.get(f"{role}_token"))
            token_id = data.get(f"{role}_token_id")
            if isinstance(token_id, list) and token_id:  # generation_config may list several EOS ids: take the first
                token_id = token_id[0]
            if token is not None:
                found[role] = token
            elif isinstance(token_id, int):
                found[role] = token_id
    return found


def _looks_like_json(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at ``path``: a sentencepiece ``tokenizer.model``, a ``tokenizer.json``, or a directory holding
    one (tokenizer.model preferred). The file type is recognized from its content, whatever its name.

    Raises FileNotFoundError for a missing path and TokenizerError (a ValueError) naming the file when it holds no
    usable tokenizer.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    if path.is_dir():
        files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not files:
            raise TokenizerError(f"{path}: directory holds neither {' nor '.join(TOKENIZER_FILES)}")
        path = files[0]
    if path.stat().st_size == 0:
        raise TokenizerError(f"{path}: empty file; expected a sentencepiece tokenizer.model or a tokenizer.json")
    if path.suffix == ".json" or _looks_like_json(path):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)
