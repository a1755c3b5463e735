"""The encoder's step thread with the real model: concurrent jobs batched and equal to alone,
a cancelled job's inputs dropped, a stop failing what waits with a 503."""

from __future__ import annotations

import asyncio

import pytest
import torch

from backends.engine.encoder.engine import EncoderEngine
from gateway.errors import ServiceUnavailableError
from tests.backends.engine.encoder.conftest import BASE_SENTENCES


async def test_concurrent_jobs_share_steps_and_match_alone(minilm) -> None:  # type: ignore[no-untyped-def]
    ids = minilm.tokenize(BASE_SENTENCES)
    alone = minilm.embed(ids[:1])
    engine = EncoderEngine(minilm, max_batch_tokens=4096, max_batch_size=64)
    engine.start()
    try:
        results = await asyncio.gather(*(engine.embed([x]) for x in ids), engine.embed(ids))
    finally:
        engine.stop()
    assert engine.num_inputs == 2 * len(ids) and engine.num_steps < len(ids)
    together = torch.cat(results[:-1])
    torch.testing.assert_close(results[-1], together, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(together[:1], alone, atol=2e-6, rtol=1e-5)


async def test_a_cancelled_job_leaves_the_queue_and_stop_fails_what_waits(minilm) -> None:  # type: ignore[no-untyped-def]
    ids = minilm.tokenize(BASE_SENTENCES) * 8
    engine = EncoderEngine(minilm, max_batch_tokens=64, max_batch_size=4)  # many small steps
    engine.start()
    try:
        job = asyncio.ensure_future(engine.embed(ids))
        await asyncio.sleep(0.05)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await asyncio.sleep(0)
        assert engine.num_waiting == 0 and engine.num_inputs < len(ids)
        waiting = asyncio.ensure_future(engine.embed(ids))
        await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(engine.stop)
    with pytest.raises(ServiceUnavailableError):
        await waiting
