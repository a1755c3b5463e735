"""Sequence-classification encoders (cross-encoders and classifiers) against transformers'
``BertForSequenceClassification`` on the same files: logits of single texts and of text pairs
(token type 1 on the second text), batched with inputs of other lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backends.engine.encoder.loader import load_encoder
from tests.backends.engine.encoder.conftest import BASE_SENTENCES, mixed_sentences

QUERIES = ["What is the capital of France?", "Who composed nine symphonies?", "ok"]


def _reference(path: Path, first: list[str], second: list[str] | None = None) -> np.ndarray:
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    rows = []
    with torch.inference_mode():
        for i, text in enumerate(first):  # one at a time: no padding in the reference
            enc = tokenizer(text, None if second is None else second[i], return_tensors="pt", truncation=True,
                            max_length=512)  # fmt: skip
            rows.append(model(**enc).logits[0].numpy())
    return np.stack(rows)


def test_pair_logits_match_transformers(cross_encoder_path: Path) -> None:
    model = load_encoder(cross_encoder_path, dtype="float32")
    assert model.labels == ("LABEL_0",) and model.output_size == 1
    docs = mixed_sentences(24, seed=5)
    pairs = [(QUERIES[i % len(QUERIES)], doc) for i, doc in enumerate(docs)]
    ids, seconds = model.tokenize_pairs(pairs, truncate=False)
    ours = torch.cat([model.embed(ids[i : i + 8], seconds[i : i + 8]) for i in range(0, len(ids), 8)]).numpy()
    expected = _reference(cross_encoder_path, [q for q, _ in pairs], [d for _, d in pairs])
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    # a pair's token types matter: read as one text, the logits differ
    flat = model.embed(ids[:8]).numpy()
    assert np.abs(flat - expected[:8]).max() > 1e-3


def test_single_text_labels_match_transformers(classifier_path: Path) -> None:
    model = load_encoder(classifier_path, dtype="float32")
    assert model.labels == ("negative", "neutral", "positive")
    texts = list(BASE_SENTENCES)
    ours = model.embed(model.tokenize(texts)).numpy()
    np.testing.assert_allclose(ours, _reference(classifier_path, texts), rtol=1e-4, atol=1e-4)


def test_bfloat16_pair_logits_stay_close(cross_encoder_path: Path) -> None:
    model = load_encoder(cross_encoder_path, dtype="bfloat16")
    pairs = [(q, d) for q in QUERIES for d in BASE_SENTENCES[:6]]
    ids, seconds = model.tokenize_pairs(pairs, truncate=False)
    ours = model.embed(ids, seconds).numpy()
    expected = _reference(cross_encoder_path, [q for q, _ in pairs], [d for _, d in pairs])
    assert np.abs(ours - expected).max() < 0.05 * max(1.0, np.abs(expected).max())


def test_long_pairs_truncate_from_the_longer_text(cross_encoder_path: Path) -> None:
    model = load_encoder(cross_encoder_path, dtype="float32")
    long_doc = " ".join(BASE_SENTENCES * 8)
    ids, seconds = model.tokenize_pairs([(QUERIES[0], long_doc)], truncate=False)
    assert len(ids[0]) > model.max_length
    ids, seconds = model.tokenize_pairs([(QUERIES[0], long_doc)], truncate=True)
    assert len(ids[0]) == model.max_length
    assert ids[0][: seconds[0]] == model.tokenize_pairs([(QUERIES[0], "x")], truncate=False)[0][0][: seconds[0]]


def test_a_classifier_without_its_head_is_refused(cross_encoder_path: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from gateway.errors import ConfigError

    broken = tmp_path / "headless"
    shutil.copytree(cross_encoder_path, broken)
    state = {k: v for k, v in load_file(str(broken / "model.safetensors")).items() if not k.startswith("classifier")}
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ConfigError, match="no classification head"):
        load_encoder(broken)
