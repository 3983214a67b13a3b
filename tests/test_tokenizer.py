"""model/tokenizer.py: sentencepiece tokenizer.model and HF tokenizer.json behind one interface, streaming decode."""

import json
import pickle
import random

import pytest
from tokenizers import Tokenizer as HFRawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data.synthetic import synthetic_corpus, train_tokenizer
from model.tokenizer import HFTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer

UNICODE = ["café au lait", "naïve 東京 tower", "smile 😀 please", "Größe ändern", "x\ty"]
TEXTS = [
    "Question: What color is the ball in the picture?\nContext: N/A\nChoices: (A) red (B) blue\nAnswer:",
    "The answer is (B)",
    "two  spaces and\n\nblank lines  ",
    "digits 12345 and 3.14",
    *UNICODE,
]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    corpus = synthetic_corpus(seed=0, n=600) + UNICODE * 3
    return train_tokenizer(corpus, tmp_path_factory.mktemp("sp") / "tokenizer.model", vocab_size=512)


@pytest.fixture(scope="module")
def sp(sp_path):
    return load_tokenizer(sp_path)


@pytest.fixture(scope="module")
def hf_dir(sp_path, tmp_path_factory):
    """The same vocabulary as a Hugging Face tokenizer.json (+ tokenizer_config.json), via transformers' converter."""
    from transformers import LlamaTokenizer

    src = tmp_path_factory.mktemp("spdir")
    (src / "tokenizer.model").write_bytes(sp_path.read_bytes())
    out = tmp_path_factory.mktemp("hf")
    LlamaTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def byte_level_path(tmp_path_factory):
    """A Llama-3-style byte-level BPE tokenizer.json (no sentencepiece), special tokens known only by name."""
    tok = HFRawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed=0, n=300) + UNICODE * 3, trainer=trainer)
    path = tmp_path_factory.mktemp("bl") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_sentencepiece_special_ids_and_framing(sp):
    assert isinstance(sp, SentencePieceTokenizer)
    assert (sp.bos_id, sp.eos_id, sp.pad_id, sp.vocab_size) == (1, 2, None, 512)
    body = sp.encode("The answer is (A)", bos=False)
    assert sp.encode("The answer is (A)") == [1, *body]
    assert sp.encode("The answer is (A)", bos=True, eos=True) == [1, *body, 2]
    assert 0 not in body and 1 not in body and 2 not in body
    assert sp.encode("", bos=True) == [1]
    assert sp.decode([1, *body, 2]) == "The answer is (A)"  # control tokens decode to nothing


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(sp, text):
    assert sp.decode(sp.encode(text, bos=True, eos=True)) == text


def test_hf_tokenizer_json_matches_sentencepiece(sp, hf_dir):
    hf = load_tokenizer(hf_dir / "tokenizer.json")
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (1, 2, None, 512)
    for text in TEXTS:
        assert hf.encode(text, bos=True, eos=True) == sp.encode(text, bos=True, eos=True), text
        assert hf.decode(hf.encode(text)) == text
    # a directory holding only tokenizer.json is found too
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)


def test_byte_level_tokenizer_json_special_tokens_by_name(byte_level_path):
    tok = load_tokenizer(byte_level_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 0 and ids[-1] == 1
        assert tok.decode(ids) == text


def test_config_beside_tokenizer_json_names_special_tokens(byte_level_path, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(byte_level_path.read_bytes())
    config = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|end_of_text|>", "pad_token": "!"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.pad_id == tok.encode("!", bos=False)[0]
    config["eos_token"] = "<|eot_id|>"  # named but not in the vocabulary
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: special token '<\|eot_id\|>'"):
        load_tokenizer(tmp_path)


def _stream(tok, ids):
    decoder = tok.decode_stream()
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_for_encoded_text(sp, hf_dir, byte_level_path, text):
    for tok in (sp, load_tokenizer(hf_dir), load_tokenizer(byte_level_path)):
        ids = tok.encode(text, bos=False)
        pieces, rest = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert rest == ""
        for n in range(len(ids)):  # no piece ever shows text that a later token changes
            assert tok.decode(ids[: n + 1]).startswith("".join(pieces[: n + 1]))


def test_stream_keeps_spaces_and_holds_back_partial_characters(sp):
    ids = sp.encode("red 🦊 blue", bos=False)  # 🦊 is in no training text: four byte-fallback tokens
    assert [sp.sp.id_to_piece(i) for i in ids] == ["▁red", "▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x8A>", "▁blue"]
    pieces, rest = _stream(sp, ids)
    # the first piece's leading space is dropped as in a one-shot decode; incomplete UTF-8 is held back
    assert pieces == ["red", " ", "", "", "", "🦊", " blue"] and rest == ""
    decoder = sp.decode_stream()
    assert [decoder.push(i) for i in ids[:4]] == ["red", " ", "", ""]
    # stream cut mid-character: flush renders the tail as a one-shot decode does (one U+FFFD per byte)
    assert decoder.flush() == "\ufffd\ufffd"
    assert sp.decode(ids[:4]) == "red \ufffd\ufffd"


def test_stream_of_random_ids_equals_full_decode(sp, byte_level_path):
    rng = random.Random(0)
    for tok in (sp, load_tokenizer(byte_level_path)):
        for _ in range(200):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
            pieces, rest = _stream(tok, ids)
            assert "".join(pieces) + rest == tok.decode(ids), ids


def test_decode_rejects_ids_outside_the_vocabulary(sp, sp_path):
    with pytest.raises(ValueError, match=f"token id 512 is outside the vocabulary of {sp_path}"):
        sp.decode([5, 512])
    with pytest.raises(TypeError, match="encode takes a str"):
        sp.encode(["a"])


def test_tokenizers_pickle_for_dataloader_workers(sp, hf_dir):
    for tok in (sp, load_tokenizer(hf_dir)):
        copy = pickle.loads(pickle.dumps(tok))
        assert copy.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_bad_paths_and_corrupt_files_name_the_file(sp_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match=f"{tmp_path}: directory holds neither tokenizer.model nor"):
        load_tokenizer(tmp_path)
    empty = tmp_path / "empty" / "tokenizer.model"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match=f"{empty}: empty file"):
        load_tokenizer(empty.parent)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01this is not a model" * 10)
    with pytest.raises(TokenizerError, match=f"{garbage}: neither a sentencepiece tokenizer.model nor a tokenizer"):
        load_tokenizer(garbage)
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(sp_path.read_bytes()[: sp_path.stat().st_size // 2])
    with pytest.raises(TokenizerError, match=f"{truncated}: .*corrupt or truncated"):
        load_tokenizer(truncated)
    broken_json = tmp_path / "tokenizer.json"
    broken_json.write_text('{"version": "1.0", "model": {')
    with pytest.raises(TokenizerError, match=f"{broken_json}: not a valid tokenizer.json"):
        load_tokenizer(broken_json)


def test_tokenizer_json_without_known_eos_is_refused(tmp_path):
    tok = HFRawTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    with pytest.raises(TokenizerError, match=f"{path}: cannot tell which token is end-of-sequence"):
        load_tokenizer(path)
