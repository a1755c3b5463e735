"""The encoder against sentence-transformers on the same all-MiniLM-L6-v2 files: per-sentence
cosine ≥ 0.99999 in float32 and ≥ 0.999 with int8 weights or bfloat16 math on 64 sentences of mixed lengths and
languages, the same top document for each query, and the other pooling modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.engine.encoder.loader import load_encoder
from backends.engine.encoder.pooling import PoolingConfig
from tests.backends.engine.encoder.conftest import BASE_SENTENCES, mixed_sentences

SENTENCES = mixed_sentences(64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _ours(model, texts: list[str], batch_size: int = 32) -> np.ndarray:  # type: ignore[no-untyped-def]
    ids = model.tokenize(texts)
    return torch.cat([model.embed(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]).numpy()


@pytest.fixture(scope="module")
def reference(st_model) -> np.ndarray:  # type: ignore[no-untyped-def]
    return st_model.encode(SENTENCES, batch_size=32)


def test_the_sentences_are_mixed(minilm) -> None:  # type: ignore[no-untyped-def]
    lengths = [len(ids) for ids in minilm.tokenize(SENTENCES)]
    assert len(SENTENCES) >= 64 and min(lengths) <= 5 and max(lengths) >= 200


def test_float32_matches_sentence_transformers(minilm, reference: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    ours = _ours(minilm, SENTENCES)
    cos = _cosines(ours, reference)
    assert cos.min() >= 0.99999, f"worst sentence {int(cos.argmin())}: cosine {cos.min():.7f}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # Normalize from modules.json


def test_int8_weights_match_within_tolerance(minilm_path, reference: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    int8 = load_encoder(minilm_path, quantization="int8")
    assert int8.nbytes < 0.7 * load_encoder(minilm_path).nbytes
    cos = _cosines(_ours(int8, SENTENCES), reference)
    assert cos.min() >= 0.999, f"worst sentence {int(cos.argmin())}: cosine {cos.min():.6f}"


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_bfloat16_math_matches_within_tolerance(minilm_path, reference: np.ndarray, quantization: str) -> None:  # type: ignore[no-untyped-def]
    """``dtype = "bfloat16"``: matmuls and attention in bfloat16, residual stream and norms in
    float32 — the int8 bar, and the vectors still float32 and unit length."""
    model = load_encoder(minilm_path, quantization=quantization, dtype="bfloat16")
    assert {layer.compute_dtype for layer in model.encoder.layers} == {torch.bfloat16}
    ours = _ours(model, SENTENCES)
    assert ours.dtype == np.float32
    cos = _cosines(ours, reference)
    assert cos.min() >= 0.999, f"worst sentence {int(cos.argmin())}: cosine {cos.min():.6f}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_retrieval_ranks_the_same_top_document(minilm, st_model) -> None:  # type: ignore[no-untyped-def]
    docs = [
        "Paris is the capital and most populous city of France.",
        "The Great Wall of China is over 20,000 kilometres long.",
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
        "The mitochondria is the powerhouse of the cell.",
        "Python is a programming language that emphasises readability.",
        "Mount Everest is the highest mountain above sea level.",
        "The Pacific is the largest and deepest ocean on Earth.",
        "Beethoven composed nine symphonies.",
    ]
    queries = [
        "What is the capital of France?",
        "Which ocean is the biggest?",
        "How do plants make food?",
        "Who wrote nine symphonies?",
        "tallest mountain in the world",
        "a language for writing readable code",
        "Quelle est la capitale de la France ?",
    ]
    for model in (minilm,):
        ours_d, ours_q = _ours(model, docs), _ours(model, queries)
        ref_d, ref_q = st_model.encode(docs), st_model.encode(queries)
        ours_top = (ours_q @ ours_d.T).argmax(1)
        ref_top = (ref_q @ ref_d.T).argmax(1)
        assert ours_top.tolist() == ref_top.tolist()
        assert ours_top.tolist()[:6] == [0, 6, 2, 7, 5, 4]  # and the sensible document, too


@pytest.fixture(scope="module")
def st_transformer(minilm_path):  # type: ignore[no-untyped-def]
    from sentence_transformers import models

    return models.Transformer(str(minilm_path), max_seq_length=256)


@pytest.mark.parametrize("mode", ["cls", "max", "lasttoken", "mean_sqrt_len"])
def test_other_pooling_modes_match_sentence_transformers(minilm, st_transformer, mode: str) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer, models

    st_mode = {"mean_sqrt_len": "mean_sqrt_len_tokens"}.get(mode, mode)
    pooling = models.Pooling(384, pooling_mode=st_mode)
    reference = SentenceTransformer(modules=[st_transformer, pooling], device="cpu")
    texts = BASE_SENTENCES
    old = minilm.pooling
    minilm.pooling = PoolingConfig(mode=mode, normalize=False)
    try:
        ours = _ours(minilm, texts, batch_size=7)
    finally:
        minilm.pooling = old
    cos = _cosines(ours, reference.encode(texts, batch_size=32))
    assert cos.min() >= 0.99999, f"{mode}: worst {cos.min():.7f}"


def test_a_vector_does_not_depend_on_its_batch(minilm) -> None:  # type: ignore[no-untyped-def]
    ids = minilm.tokenize(BASE_SENTENCES)
    alone = torch.cat([minilm.embed([x]) for x in ids])
    together = minilm.embed(ids)
    torch.testing.assert_close(together, alone, atol=2e-6, rtol=1e-5)


def test_token_ids_without_special_tokens_embed_like_the_text(minilm) -> None:  # type: ignore[no-untyped-def]
    text = "Le chat dort sur le canapé."
    plain = minilm.tokenizer.encode(text, add_special_tokens=False).ids
    assert minilm.wrap(plain) == minilm.tokenize([text])[0]


def test_truncation_keeps_the_end_token_like_sentence_transformers(minilm, st_model) -> None:  # type: ignore[no-untyped-def]
    long_text = " ".join(SENTENCES[:16]) * 3
    ids = minilm.tokenize([long_text])[0]
    assert len(ids) > 256
    cut = minilm.truncate(ids)
    assert len(cut) == 256 and cut[-1] == ids[-1] and cut[:255] == ids[:255]
    cos = _cosines(minilm.embed([cut]).numpy(), st_model.encode([long_text]))
    assert cos.min() >= 0.99999
