"""``POST /v1/score``, ``/v1/rerank`` and ``/v1/classify``: the encoder endpoints beside embeddings.

Their shapes are the ones clients already send: vLLM's ``/v1/score`` (``text_1`` against
``text_2``) and ``/v1/classify``, and the rerank API of Cohere and Jina that vLLM and llama.cpp's
server also serve (``query``, ``documents``, ``top_n``). Score and rerank are one backend call,
``Backend.score`` over text pairs: a cross-encoder reads each pair as one input, an embedding
model scores the cosine of the pair's two vectors. Like ``/v1/embeddings`` each is answered whole.
"""

from __future__ import annotations

import time
from typing import Any

from gateway import wire
from gateway.endpoints import Endpoint
from gateway.errors import InvalidRequestError, UnsupportedParameterError
from gateway.interface import Capabilities, ClassifyRequest, ClassifyResult, ScoreRequest, ScoreResult, Usage
from gateway.render import encode

# ---------------------------------------------------------------------------------------------
# requests: the wire request -> the backend's


def score_request(req: wire.ScoreRequest, *, request_id: str, model: str, caps: Capabilities) -> ScoreRequest:
    """``text_1`` x ``text_2``: one string (or a list of one) against each of the other side's,
    else two lists of one length, pairwise."""
    _check_scores(caps, model)
    first, second = _texts(req.text_1, "text_1"), _texts(req.text_2, "text_2")
    if len(first) == 1:
        pairs = [(first[0], text) for text in second]
    elif len(second) == 1:
        pairs = [(text, second[0]) for text in first]
    elif len(first) == len(second):
        pairs = list(zip(first, second, strict=True))
    else:
        raise InvalidRequestError(
            f"'text_1' has {len(first)} items and 'text_2' {len(second)}: give lists of one length, "
            f"or one text on either side",
            param="text_2",
        )
    _check_count(len(pairs), caps, "text_2")
    return ScoreRequest(request_id=request_id, model=model, pairs=tuple(pairs), user=req.user)


def rerank_request(req: wire.RerankRequest, *, request_id: str, model: str, caps: Capabilities) -> ScoreRequest:
    _check_scores(caps, model)
    if not req.query:
        raise InvalidRequestError("'query' must not be empty", param="query")
    if not req.documents:
        raise InvalidRequestError("'documents' must not be empty", param="documents")
    docs = [doc if isinstance(doc, str) else doc.text for doc in req.documents]
    for i, doc in enumerate(docs):
        if not doc:
            raise InvalidRequestError(f"'documents[{i}]' is an empty text", param="documents")
    if req.top_n is not None and req.top_n < 1:
        raise InvalidRequestError("'top_n' must be at least 1", param="top_n")
    _check_count(len(docs), caps, "documents")
    return ScoreRequest(request_id=request_id, model=model, pairs=tuple((req.query, d) for d in docs), user=req.user)


def classify_request(req: wire.ClassifyRequest, *, request_id: str, model: str, caps: Capabilities) -> ClassifyRequest:
    if not caps.classify:
        raise UnsupportedParameterError(f"The model '{model}' is not a classification model", param="model")
    texts = _texts(req.input, "input")
    _check_count(len(texts), caps, "input")
    return ClassifyRequest(request_id=request_id, model=model, inputs=tuple(texts), user=req.user)


def _check_scores(caps: Capabilities, model: str) -> None:
    if not caps.score:
        raise UnsupportedParameterError(
            f"The model '{model}' does not score text pairs (serve a cross-encoder or an embedding model)",
            param="model",
        )


def _texts(raw: str | list[str], field: str) -> list[str]:
    texts = [raw] if isinstance(raw, str) else raw
    if not texts:
        raise InvalidRequestError(f"'{field}' must not be empty", param=field)
    for i, text in enumerate(texts):
        if not text:
            raise InvalidRequestError(f"'{field}[{i}]' is an empty text", param=field)
    return texts


def _check_count(count: int, caps: Capabilities, field: str) -> None:
    if count > caps.max_embedding_inputs:
        raise InvalidRequestError(
            f"'{field}' makes {count} inputs; this model takes at most {caps.max_embedding_inputs} per request",
            param=field,
        )


SCORE = Endpoint("score", wire.ScoreRequest, score_request)
RERANK = Endpoint("rerank", wire.RerankRequest, rerank_request)
CLASSIFY = Endpoint("classify", wire.ClassifyRequest, classify_request)


# ---------------------------------------------------------------------------------------------
# responses: the backend's result -> the wire body


def score_body(result: ScoreResult, req: wire.ScoreRequest, model: str, request_id: str) -> bytes:
    data = [wire.ScoreData(index=i, score=score) for i, score in enumerate(result.scores)]
    usage = wire.EmbeddingsUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return encode(wire.ScoreResponse(id=f"score-{request_id}", created=int(time.time()), model=model, data=data, usage=usage))


def rerank_body(result: ScoreResult, req: wire.RerankRequest, model: str, request_id: str) -> bytes:
    """The documents by descending score (ties in the order sent), the ``top_n`` first."""
    order = sorted(range(len(result.scores)), key=lambda i: -result.scores[i])[: req.top_n]
    results = [
        wire.RerankResult(
            index=i,
            relevance_score=result.scores[i],
            document=_document(req.documents[i]) if req.return_documents else None,
        )
        for i in order
    ]
    usage = wire.RerankUsage(total_tokens=result.prompt_tokens)
    return encode(wire.RerankResponse(id=f"rerank-{request_id}", model=model, results=results, usage=usage))


def _document(doc: str | wire.RerankDocument) -> wire.RerankDocument:
    return wire.RerankDocument(text=doc) if isinstance(doc, str) else doc


def classify_body(result: ClassifyResult, req: wire.ClassifyRequest, model: str, request_id: str) -> bytes:
    data = []
    for i, probs in enumerate(result.probs):
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append(wire.ClassifyData(index=i, label=result.labels[best], probs=list(probs), num_classes=len(probs)))
    usage = wire.EmbeddingsUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return encode(
        wire.ClassifyResponse(id=f"classify-{request_id}", created=int(time.time()), model=model, data=data, usage=usage)
    )


class ScoringEndpoints:
    """The three routes, for ``pipeline.Gateway``: each admitted like ``/v1/embeddings`` and
    answered whole through ``Gateway._whole_answer``."""

    _admitted: Any
    _whole_answer: Any

    async def score(self, scope: Any, receive: Any, send: Any) -> None:
        await self._admitted(SCORE, scope, receive, send, self._scored)

    async def rerank(self, scope: Any, receive: Any, send: Any) -> None:
        await self._admitted(RERANK, scope, receive, send, self._scored)

    async def classify(self, scope: Any, receive: Any, send: Any) -> None:
        await self._admitted(CLASSIFY, scope, receive, send, self._scored)

    async def _scored(
        self, endpoint: Endpoint, ctx: Any, req: Any, attempts: Any, _receive: Any, send: Any
    ) -> None:
        if endpoint is CLASSIFY:
            await self._whole_answer(ctx, attempts, send, _classify, lambda r: classify_body(r, req, ctx.model or "", ctx.request_id))
        else:
            render = score_body if endpoint is SCORE else rerank_body
            await self._whole_answer(ctx, attempts, send, _score, lambda r: render(r, req, ctx.model or "", ctx.request_id))


async def _score(route: Any, request: ScoreRequest) -> tuple[ScoreResult, Usage]:
    result = await route.backend.score(request)
    return result, Usage(prompt_tokens=result.prompt_tokens, completion_tokens=0)


async def _classify(route: Any, request: ClassifyRequest) -> tuple[ClassifyResult, Usage]:
    result = await route.backend.classify(request)
    return result, Usage(prompt_tokens=result.prompt_tokens, completion_tokens=0)
