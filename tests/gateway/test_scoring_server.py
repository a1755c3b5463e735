"""``/v1/rerank`` (and ``/rerank``), ``/v1/score`` and ``/v1/classify`` through a real
``taxiway serve``: a cross-encoder and a 3-label classifier (all-MiniLM-L6-v2's encoder with a
seeded head, ``write_cross_encoder``) against transformers on the same files, and the embedding
model's scores against sentence-transformers' cosines. Bad requests are 400s naming the field."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from backends.engine.catalogue import default_home, pull
from backends.engine.encoder.loader import unpack
from tests.backends.engine.encoder.conftest import write_cross_encoder

QUERY = "What is the capital of France?"
DOCS = [
    "The Great Wall of China is over 20,000 kilometres long.",
    "Paris is the capital and most populous city of France.",
    "Beethoven composed nine symphonies.",
    "France is a country in Western Europe; its capital is Paris.",
    "ok",
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    minilm = unpack(pull("all-minilm-l6-v2", home=default_home(os.environ), progress=False))
    return {
        "minilm": minilm,
        "cross": write_cross_encoder(minilm, tmp_path_factory.mktemp("cross"), ("LABEL_0",), seed=1),
        "classifier": write_cross_encoder(minilm, tmp_path_factory.mktemp("cls"), ("negative", "neutral", "positive"), seed=2),
    }


@pytest.fixture(scope="module")
def server(shared_taxiway_server, paths: dict[str, Path]):  # type: ignore[no-untyped-def]
    config = f"""
        [[models]]
        name = "minilm"
        backend = "encoder"
        options = {{ model = "{paths["minilm"]}", dtype = "float32" }}

        [[models]]
        name = "reranker"
        backend = "encoder"
        options = {{ model = "{paths["cross"]}", dtype = "float32", truncate = true }}

        [[models]]
        name = "sentiment"
        backend = "encoder"
        options = {{ model = "{paths["classifier"]}", dtype = "float32" }}
    """
    server = shared_taxiway_server(config, startup_timeout=60)
    server.wait_ready(timeout=180)
    return server


def _hf_logits(path: Path, first: list[str], second: list[str] | None = None) -> np.ndarray:
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    with torch.inference_mode():
        enc = tokenizer(first, second, return_tensors="pt", padding=True)
        return model(**enc).logits.numpy()


def _post(server, path: str, body: dict) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(f"{server.base_url.removesuffix('/v1')}{path}", json=body, timeout=60)


def test_rerank_orders_documents_as_the_cross_encoder_scores_them(server, paths) -> None:  # type: ignore[no-untyped-def]
    expected = 1 / (1 + np.exp(-_hf_logits(paths["cross"], [QUERY] * len(DOCS), DOCS)[:, 0]))
    response = _post(server, "/v1/rerank", {"model": "reranker", "query": QUERY, "documents": DOCS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "reranker" and body["usage"]["total_tokens"] > 0
    results = body["results"]
    assert [r["index"] for r in results] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([r["relevance_score"] for r in results], np.sort(expected)[::-1], atol=1e-5)
    assert [r["document"]["text"] for r in results] == [DOCS[r["index"]] for r in results]
    # top_n, documents as objects, no documents back, and the path Jina's and llama.cpp's clients use
    docs = [{"text": d} for d in DOCS]
    short = _post(server, "/rerank", {"model": "reranker", "query": QUERY, "documents": docs, "top_n": 2,
                                      "return_documents": False}).json()  # fmt: skip
    assert [r["index"] for r in short["results"]] == [r["index"] for r in results[:2]]
    assert all("document" not in r for r in short["results"])


def test_score_of_an_embedding_model_is_the_cosine_of_its_vectors(server, paths) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(paths["minilm"]), device="cpu")
    q, d = st.encode([QUERY]), st.encode(DOCS)
    expected = (d @ q.T)[:, 0] / np.linalg.norm(d, axis=1) / np.linalg.norm(q)
    one_to_many = _post(server, "/v1/score", {"model": "minilm", "text_1": QUERY, "text_2": DOCS})
    assert one_to_many.status_code == 200, one_to_many.text
    data = one_to_many.json()["data"]
    assert [x["index"] for x in data] == list(range(len(DOCS))) and data[0]["object"] == "score"
    np.testing.assert_allclose([x["score"] for x in data], expected, atol=1e-5)
    pairwise = _post(server, "/v1/score", {"model": "minilm", "text_1": [QUERY] * 2, "text_2": DOCS[:2]}).json()
    np.testing.assert_allclose([x["score"] for x in pairwise["data"]], expected[:2], atol=1e-5)
    # the cross-encoder serves /v1/score too: the same numbers as its rerank
    cross = _post(server, "/v1/score", {"model": "reranker", "text_1": QUERY, "text_2": DOCS}).json()["data"]
    ranked = _post(server, "/v1/rerank", {"model": "reranker", "query": QUERY, "documents": DOCS}).json()["results"]
    assert {r["index"]: r["relevance_score"] for r in ranked} == pytest.approx({x["index"]: x["score"] for x in cross})


def test_classify_gives_each_texts_label_probabilities(server, paths) -> None:  # type: ignore[no-untyped-def]
    texts = ["I love this!", "This is terrible.", "The train left at noon."]
    logits = _hf_logits(paths["classifier"], texts)
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    response = _post(server, "/v1/classify", {"model": "sentiment", "input": texts})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    np.testing.assert_allclose([x["probs"] for x in data], expected, atol=1e-5)
    labels = ("negative", "neutral", "positive")
    assert [x["label"] for x in data] == [labels[i] for i in expected.argmax(1)]
    assert all(x["num_classes"] == 3 for x in data)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/rerank", {"model": "reranker", "query": QUERY, "documents": []}, "documents"),
        ("/v1/rerank", {"model": "reranker", "query": QUERY, "documents": ["a", ""]}, "documents"),
        ("/v1/rerank", {"model": "reranker", "query": "", "documents": ["a"]}, "query"),
        ("/v1/rerank", {"model": "reranker", "query": QUERY, "documents": ["a"], "top_n": 0}, "top_n"),
        ("/v1/rerank", {"model": "reranker", "documents": ["a"]}, "query"),
        ("/v1/rerank", {"model": "sentiment", "query": QUERY, "documents": ["a"]}, "model"),
        ("/v1/score", {"model": "minilm", "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2"),
        ("/v1/score", {"model": "minilm", "text_1": [], "text_2": "a"}, "text_1"),
        ("/v1/score", {"model": "minilm", "text_1": "a", "text_2": 7}, "text_2"),
        ("/v1/classify", {"model": "minilm", "input": "a"}, "model"),
        ("/v1/classify", {"model": "sentiment", "input": ["a", ""]}, "input"),
        ("/v1/embeddings", {"model": "sentiment", "input": "a"}, "model"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(server, path: str, body: dict, param: str) -> None:  # type: ignore[no-untyped-def]
    response = _post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["message"]


def test_an_over_long_pair_is_a_400_where_the_model_does_not_truncate(server) -> None:  # type: ignore[no-untyped-def]
    long_doc = "word " * 400  # MiniLM: 256 tokens at most
    response = _post(server, "/v1/score", {"model": "minilm", "text_1": QUERY, "text_2": ["short", long_doc]})
    assert response.status_code == 400, response.text
    assert "text pair 1" in response.json()["error"]["message"]
    # the reranker is served with truncate = true: the same pair is cut and scored
    ok = _post(server, "/v1/rerank", {"model": "reranker", "query": QUERY, "documents": ["short", long_doc * 2]})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2
