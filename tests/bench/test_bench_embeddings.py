"""`taxiway bench embeddings`'s workload: token counts uniform in the asked range (the run itself
is a command, never a timed test)."""

from __future__ import annotations

from backends.engine.encoder.loader import load_encoder
from bench.embeddings import make_texts
from tests.backends.engine.encoder.conftest import minilm_path  # noqa: F401 - the fixture


def test_the_texts_have_the_asked_token_counts(minilm_path) -> None:  # type: ignore[no-untyped-def]
    model = load_encoder(minilm_path)
    texts = make_texts(model, 60, 8, 256, seed=0)
    counts = [len(ids) for ids in model.tokenize(texts)]
    assert min(counts) >= 8 and max(counts) <= 256
    assert min(counts) < 40 and max(counts) > 220  # spread over the range
    assert make_texts(model, 5, 8, 256, seed=0) == texts[:5]  # seeded
