"""Tokenizers built from GGUF metadata agree with the reference: HF transformers' own conversion of
the same GGUF (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), on >= 1,000 generated
strings per vocabulary, encoding with and without special tokens, and decoding.

Vocabularies: the real default model (SmolLM2, byte-level BPE, ``pre = smollm``); synthetic GGUFs
holding a byte-level sub-vocabulary of it under other ``tokenizer.ggml.pre`` values; and a
synthetic SentencePiece-style (``tokenizer.ggml.model = llama``) vocabulary trained here.
"""

from __future__ import annotations

import builtins
import json
import itertools
import random
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers

from backends.engine.model.gguf_reader import read_gguf_metadata
from backends.engine.text.gguf_vocab import byte_to_unicode
from backends.engine.text.tokenizer import TooManyTokens, Tokenizer
from gateway.errors import ConfigError

NUM_STRINGS = 1200

# -- deterministic test strings ----------------------------------------------------------------

_FRAGMENTS = [
    "Hello", "world", "hello world", "The quick brown fox", "jumps over the lazy dog.",
    "I'm", "you're", "they'LL", "it's", "we've", "don't", "HE'D", "'s",
    "def main():", "    return x + 1", "if (a && b) { c++; }", "for i in range(10):", "#include <stdio.h>",
    "print(f\"{x!r:>10}\")", "SELECT * FROM t WHERE id = 42;", "{\"key\": [1, 2.5, null]}", "a_b-c.d/e\\f",
    "<html><body>", "x**2 + y**2 == z**2", "λx.x", "→", "...", "!!!", "???", "—", "«quote»",
    "0", "7", "42", "123", "2024", "3.14159", "1,000,000", "0x1F", "v1.2.3", "12345678901234567890",
    "café", "naïve", "résumé", "Ångström", "straße", "Ελληνικά", "Привет мир", "مرحبا بالعالم", "שלום",
    "नमस्ते", "สวัสดี", "Tiếng Việt", "ａｂｃ", "ﬁ", "e\u0301", "\u00a0", "\u200b", "\ufeff",
    "日本語", "中文文本", "東京タワー", "한국어 텍스트", "漢字かなカナ", "你好，世界！", "。", "「」",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🏳️‍🌈", "❤️", "☃", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "🤖💬", "\U0001f600\U0001f601",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "<|im_", "im_end|>", "<|",
    "<s>", "</s>", "<unk>", "<|user|>", "<|end|>", "[INST]", "<<SYS>>",
]  # fmt: skip
_SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\t\t", "    ", " \t \n", "\u3000", "\x0b"]


def _random_char(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x4FF), (0x4E00, 0x9FFF), (0x3040, 0x30FF),
              (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x10000, 0x1034F), (0x2000, 0x2BFF)]  # fmt: skip
    lo, hi = rng.choice(ranges)
    return chr(rng.randint(lo, hi))


def generate_strings(seed: int, count: int) -> list[str]:
    """Strings mixing words, code, whitespace runs, Unicode, emoji, CJK and special-token text."""
    rng = random.Random(seed)
    out = ["", " ", "a", "  leading", "trailing  ", "\n", "   \n\n  "]
    while len(out) < count:
        parts = []
        for _ in range(rng.randint(1, 8)):
            roll = rng.random()
            if roll < 0.55:
                parts.append(rng.choice(_FRAGMENTS))
            elif roll < 0.8:
                parts.append(rng.choice(_SPACES))
            else:
                parts.append("".join(_random_char(rng) for _ in range(rng.randint(1, 4))))
        joiner = rng.choice(["", " ", " ", "\n"])
        out.append(joiner.join(parts))
    return out


STRINGS = generate_strings(20240611, NUM_STRINGS)


def test_generated_strings_are_varied() -> None:
    assert len(set(STRINGS)) >= 1000
    joined = "".join(STRINGS)
    for needle in ["<|im_end|>", "  ", "\n", "日", "😀", "'s", "123"]:
        assert needle in joined


# -- comparing with the reference ------------------------------------------------------------


def assert_parity(ours: Tokenizer, ref, strings: list[str]) -> int:  # type: ignore[no-untyped-def]
    """Encode/decode every string both ways; returns the count compared (all must agree)."""
    mismatches = []
    for text in strings:
        for add in (False, True):
            a, b = ours.encode(text, add_special_tokens=add), ref.encode(text, add_special_tokens=add)
            if a != b:
                mismatches.append(("encode", add, text, a, b))
        ids = ref.encode(text, add_special_tokens=True)
        for skip in (True, False):
            a, b = ours.decode(ids, skip_special_tokens=skip), ref.decode(ids, skip_special_tokens=skip)
            if a != b:
                mismatches.append(("decode", skip, text, a, b))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
    return len(strings)


def _reference(path: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _write_gguf(path: Path, fields: dict[str, object]) -> Path:
    """A GGUF holding only tokenizer metadata and one dummy tensor."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)  # type: ignore[arg-type]
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- the real default model (``smollm2_path``: tests/engine/conftest.py) ------------------------


@pytest.fixture(scope="module")
def smollm_metadata(smollm2_path: Path) -> dict[str, object]:
    return read_gguf_metadata(smollm2_path, prefix="tokenizer.")


@pytest.fixture(scope="module")
def smollm(smollm_metadata) -> Tokenizer:  # type: ignore[no-untyped-def]
    return Tokenizer.from_gguf_metadata(smollm_metadata)


def with_digit_splitting(ref):  # type: ignore[no-untyped-def]
    """``ref`` with the pre-tokenizer of SmolLM2's own tokenizer.json (HuggingFaceTB/SmolLM2-*:
    ``Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]``), which llama.cpp's
    ``smollm`` pre-type also implements. transformers' GGUF conversion uses plain GPT-2 splitting."""
    from tokenizers import pre_tokenizers

    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return ref


def _space_before_number(text: str) -> bool:
    return any(a.isspace() and unicodedata.category(b)[0] == "N" for a, b in itertools.pairwise(text))


def _digit_split_divergences(ours: Tokenizer, ref, strings: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    return [t for t in strings if ours.encode(t) != ref.encode(t)]


@pytest.mark.slow
def test_smollm_matches_transformers_gguf_tokenizer(smollm: Tokenizer, smollm2_path: Path) -> None:
    ref = _reference(smollm2_path)
    # Where plain transformers-GGUF differs, it is only its GPT-2 splitting of whitespace before
    # a number character (\p{N}: "\n\n1" -> "\n" "\n" "1" there; "\n\n" "1" for the real
    # tokenizer; " ⅔" -> " ⅔" there; " " "⅔" for the real one).
    diverging = _digit_split_divergences(smollm, ref, STRINGS)
    assert all(_space_before_number(t) for t in diverging), diverging[:3]
    assert len(diverging) < NUM_STRINGS // 10
    assert assert_parity(smollm, with_digit_splitting(ref), STRINGS) == NUM_STRINGS


@pytest.mark.slow
def test_smollm_facts(smollm: Tokenizer) -> None:
    # From the model's files and llama.cpp: no BOS added, <|im_end|> ends a turn, digits split.
    assert (smollm.bos_token_id, smollm.eos_token_id) == (1, 2)
    assert smollm.bos_token == "<|im_start|>" and smollm.eos_token == "<|im_end|>"
    assert smollm.eos_token_ids == {0, 2}  # <|im_end|> and <|endoftext|>
    assert smollm.special_token_ids == set(range(17))
    assert smollm.encode("Hello world") == [19556, 905]
    assert smollm.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert [smollm.id_to_token(i) for i in smollm.encode(" 2024")] == ["Ġ", "2", "0", "2", "4"]
    assert smollm.vocab_size == 49152
    assert smollm.chat_template is not None and "<|im_start|>" in smollm.chat_template
    assert not smollm.strips_leading_space


@pytest.mark.slow
def test_smollm_token_bytes(smollm: Tokenizer) -> None:
    text = "😀 日本語 café\n"
    ids = smollm.encode(text)
    assert b"".join(smollm.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert any(len(smollm.token_bytes(i).decode("utf-8", "replace")) != len(smollm.token_bytes(i)) for i in ids)
    assert smollm.token_bytes(2) == b"<|im_end|>"
    assert smollm.token_text(905) == " world"
    # Every token of the vocabulary maps to bytes, consistent with decode on whole characters.
    for i in range(0, smollm.vocab_size, 97):
        raw = smollm.token_bytes(i)
        if i not in smollm.special_token_ids and raw.decode("utf-8", "ignore").encode() == raw:
            assert smollm.decode([i]) == raw.decode("utf-8")


# -- byte-level BPE under other pre-tokenizers ------------------------------------------------


def _byte_level_subvocab(metadata: dict[str, object], num_merges: int) -> tuple[list[str], list[str]]:
    """The 256 byte tokens plus those built by the first ``num_merges`` merges, kept consistent."""
    merges = list(metadata["tokenizer.ggml.merges"])[:num_merges]  # type: ignore[call-overload]
    tokens = list(metadata["tokenizer.ggml.tokens"])[:17]  # type: ignore[call-overload]
    tokens += [c for c in byte_to_unicode().values()]
    seen = set(tokens)
    for merge in merges:
        token = merge.replace(" ", "")
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    return tokens, merges


@pytest.fixture(scope="module")
def byte_level_files(tmp_path_factory, smollm_metadata) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    tokens, merges = _byte_level_subvocab(smollm_metadata, 6000)
    tokens.append("<|user_defined|>")
    types = [3] * 17 + [1] * (len(tokens) - 18) + [4]
    out = {}
    root = tmp_path_factory.mktemp("byte_level")
    for pre in ("gpt2", "llama-bpe", "qwen2", "smollm"):
        (root / pre).mkdir()
        out[pre] = _write_gguf(
            root / pre / "tok.gguf",
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": pre,
                "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.merges": merges,
                "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.add_bos_token": pre == "llama-bpe",
            },
        )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt2", "qwen2", "smollm", "llama-bpe"])
def test_byte_level_pre_tokenizers_match_transformers(pre: str, byte_level_files: dict[str, Path]) -> None:
    path = byte_level_files[pre]
    ours, ref = Tokenizer.from_gguf(path), _reference(path)
    if pre == "smollm":
        ref = with_digit_splitting(ref)
    strings = STRINGS if pre != "gpt2" else STRINGS[: NUM_STRINGS // 3]
    assert assert_parity(ours, ref, strings) == len(strings)


@pytest.mark.slow
def test_pre_tokenizer_facts(byte_level_files: dict[str, Path]) -> None:
    pieces = {pre: Tokenizer.from_gguf(path) for pre, path in byte_level_files.items()}

    def split(pre: str, text: str) -> list[str]:
        tok = pieces[pre]
        return [tok.token_text(i) for i in tok.encode(text, add_special_tokens=False)]

    # Llama 3 keeps up to three digits together; Qwen2 and SmolLM split every digit.
    assert "".join(split("llama-bpe", "12345")) == "12345"
    assert split("qwen2", "12345") == ["1", "2", "3", "4", "5"]
    assert split("smollm", " 12") == [" ", "1", "2"]
    assert pieces["llama-bpe"].encode("hi")[0] == 1  # add_bos_token
    assert pieces["gpt2"].encode("hi")[0] != 1
    # User-defined tokens are matched whole but are not special.
    user = pieces["gpt2"].encode("a<|user_defined|>b", add_special_tokens=False)
    assert len(user) == 3 and user[1] not in pieces["gpt2"].special_token_ids


# -- SentencePiece-style (llama) vocabularies ---------------------------------------------------


def _train_spm_vocab() -> list[str]:
    """A small SentencePiece-like BPE vocabulary (pieces start with ▁), trained here."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    corpus = [f.__doc__ for f in vars(builtins).values() if isinstance(getattr(f, "__doc__", None), str)]
    corpus += generate_strings(7, 300)
    corpus += ["日本語のテキストです。中文文本。한국어 텍스트", "naïve café résumé straße"] * 10
    bpe = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=3000, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=150, show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    by_id = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    return [t for t, _ in by_id if t not in ("<unk>", "<s>", "</s>")]


@pytest.fixture(scope="module")
def spm_fields() -> dict[str, object]:
    learned = _train_spm_vocab()
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned + ["<|user|>", "<|end|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned) + [4, 3]
    # Scores as SentencePiece writes them: earlier merges score higher.
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))] + [0.0, 0.0]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.eot_token_id": len(tokens) - 1,
    }


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory, spm_fields) -> Path:  # type: ignore[no-untyped-def]
    fields = dict(spm_fields, **{"tokenizer.ggml.add_space_prefix": True})
    return _write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", fields)


@pytest.mark.slow
def test_sentencepiece_matches_transformers_gguf_tokenizer(spm_file: Path) -> None:
    ours, ref = Tokenizer.from_gguf(spm_file), _reference(spm_file)
    assert assert_parity(ours, ref, STRINGS) == NUM_STRINGS


def test_sentencepiece_facts(spm_file: Path) -> None:
    tok = Tokenizer.from_gguf(spm_file)
    assert tok.byte_encoding == "sentencepiece" and tok.strips_leading_space
    ids = tok.encode("Hello")
    assert ids[0] == 1  # llama vocabularies add BOS unless the file says otherwise
    assert tok.id_to_token(ids[1]).startswith("▁")  # the space prefix
    assert tok.decode(ids) == "Hello"
    # Characters outside the vocabulary fall back to their UTF-8 bytes, and decode back.
    tamil = tok.encode("க", add_special_tokens=False)  # U+0B95, never in the training text
    assert [tok.id_to_token(i) for i in tamil][-3:] == ["<0xE0>", "<0xAE>", "<0x95>"]
    assert b"".join(tok.token_bytes(i) for i in tamil) == " க".encode()
    assert tok.decode(tamil) == "க"
    assert tok.eos_token_ids == {2, tok.vocab_size - 1}  # </s> and the file's EOT token
    assert tok.special_token_ids == {0, 1, 2, tok.vocab_size - 1}


def test_sentencepiece_without_space_prefix(tmp_path: Path, spm_fields) -> None:  # type: ignore[no-untyped-def]
    """``add_space_prefix = false`` is honoured (transformers' GGUF conversion ignores it); the
    reference is an HF LlamaTokenizer built on the same vocabulary with ``add_prefix_space=False``."""
    transformers = pytest.importorskip("transformers")
    fields = dict(spm_fields, **{"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False})
    ours = Tokenizer.from_gguf_metadata(fields)
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}  # type: ignore[arg-type]
    from transformers.tokenization_utils_base import generate_merges

    mergeable = {t: float(s) for t, s, k in zip(tokens, scores, fields["tokenizer.ggml.token_type"]) if k == 1}  # type: ignore[call-overload]
    ref = transformers.LlamaTokenizer(
        vocab=vocab, merges=generate_merges(vocab, mergeable), add_prefix_space=False, add_bos_token=False
    )
    ref.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    ref.add_tokens(["<|user|>"])
    strings = [s for s in STRINGS[:400]]
    assert ours.encode("Hello", add_special_tokens=False)[0] != ours.encode(" Hello", add_special_tokens=False)[0]
    assert assert_parity(ours, ref, strings) == len(strings)


# -- Hugging Face directories -----------------------------------------------------------------


@pytest.mark.slow
def test_hf_directory(tmp_path: Path, smollm: Tokenizer) -> None:
    smollm.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ x }}"})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 2, {0, 2})
    assert tok.chat_template == "{{ x }}" and tok.byte_encoding == "byte_level"
    for text in STRINGS[:200]:
        assert tok.encode(text) == smollm.encode(text)
    (tmp_path / "chat_template.jinja").write_text("{{ y }}")
    assert Tokenizer.load(tmp_path).chat_template == "{{ y }}"
    # add_bos_token in tokenizer_config.json decides, as transformers does.
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": True})
    )
    assert Tokenizer.load(tmp_path).encode("hi") == [1, *smollm.encode("hi")]
    assert Tokenizer.load(tmp_path).encode("hi", add_special_tokens=False) == smollm.encode("hi")


def test_hf_directory_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_unknown_tokenizer_model_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# -- long prompts: a bound before encoding, ids only within the limit ---------------------------


def _bounded_tokenizers(smollm: Tokenizer, spm_file: Path) -> list[Tokenizer]:
    return [smollm, Tokenizer.from_gguf(spm_file)]


def test_min_tokens_is_a_lower_bound(smollm: Tokenizer, spm_file: Path) -> None:
    long = "".join(STRINGS) + " " * 5000 + "\n\n" * 3000
    for tok in _bounded_tokenizers(smollm, spm_file):
        assert tok.min_tokens("x" * 1000) > 0  # GGUF vocabularies are bounded
        for text in [*STRINGS, long, "<|im_start|>" * 50]:
            assert tok.min_tokens(text) <= len(tok.encode(text, add_special_tokens=False)), text[:80]


def test_encode_at_most(smollm: Tokenizer) -> None:
    text = " ".join(STRINGS[:200])
    ids = smollm.encode(text)
    assert smollm.encode_at_most(text, len(ids)) == ids
    with pytest.raises(TooManyTokens) as counted:
        smollm.encode_at_most(text, len(ids) - 1)
    assert counted.value.num_tokens == len(ids) and not counted.value.at_least
    huge = "All work and no play makes Jack a dull boy. " * 90_000  # 4 MB
    with pytest.raises(TooManyTokens) as bounded:
        smollm.encode_at_most(huge, 8192)  # refused before encoding
    assert bounded.value.at_least and 8192 < bounded.value.num_tokens <= len(huge)


def test_a_normalizer_leaves_no_bound(tmp_path: Path, smollm: Tokenizer) -> None:
    backend = tokenizers.Tokenizer.from_str(smollm.backend.to_str())
    backend.normalizer = tokenizers.normalizers.Strip()  # "   x   " is one token: no bound holds
    tok = Tokenizer(backend, bos_token_id=None, eos_token_id=None)
    assert tok.min_tokens(" " * 10_000 + "x") == 0
