"""`taxiway bench embeddings`: the encoder's throughput against sentence-transformers, one run.

One workload — ``--sentences`` texts of ``--min-tokens``–``--max-tokens`` tokens (uniform; special
tokens included), made of random whole words of the model's own vocabulary, seeded — measured
three ways, one after the other on the same CPU threads, in this one command:

- **sentence-transformers**: ``SentenceTransformer.encode(texts, batch_size=32)`` in-process (it
  sorts the texts by length and pads each batch to its longest);
- **engine**: the same texts tokenized and handed to the engine's step thread all at once
  (``EncoderEngine``: its token budget and length grouping choose the steps), in-process;
- **http**: a ``taxiway serve`` subprocess with the same model, one text per ``POST
  /v1/embeddings``, ``--concurrency`` clients in flight (httpx), from the first send to the last
  answer.

All three run with the same OpenMP wait policy, ``--omp-wait-policy`` (default ``passive``: set
before torch loads, and inherited by the server): with two cores, torch's OpenMP threads
spinning after each parallel region take the CPU that the server's event loop and the client
need — on this project's 2-core machine the HTTP side took 28.2 s spinning vs 9.3 s passive for
the same 200 sentences, and the engine alone 11.1 vs 7.0 s.

Each reports sentences/s and tokens/s; the ratios divide by sentence-transformers'. Each side
warms up first (a few batches). The HTTP vectors are checked against sentence-transformers'
(worst cosine), so a fast wrong answer cannot pass. ``--json`` writes the figures.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from argparse import ArgumentParser, Namespace
from pathlib import Path
from typing import TextIO

import msgspec

from bench.report import add_json_flag, human, write_json


class Side(msgspec.Struct):
    name: str
    wall_s: float
    sentences_per_s: float
    tokens_per_s: float
    ratio: float = 0.0  # sentences/s over sentence-transformers'


class Report(msgspec.Struct):
    model: str
    quantization: str
    dtype: str
    sentences: int
    tokens: int
    min_tokens: int
    max_tokens: int
    concurrency: int
    batch_size: int
    threads: int
    sides: list[Side]
    worst_cosine_http: float
    omp_wait_policy: str
    date: str


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--model", default="all-minilm-l6-v2", help="catalogue name, model directory or .zip")
    parser.add_argument("--quantization", choices=("none", "int8"), default="none", help="the engine's weights")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the engine's matmuls (auto: bfloat16 where the CPU has it, as served)")  # fmt: skip
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP clients in flight")
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers' encode batch size")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="the engine's step budget (default: its own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", default=None, help="model cache (default $TAXIWAY_HOME or ~/.cache/taxiway)")
    add_json_flag(parser)
    parser.add_argument(
        "--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
        help="OMP_WAIT_POLICY for all three sides (inherit: leave the environment as it is)",
    )  # fmt: skip


def run(args: Namespace) -> int:
    """Sentences/s of the encoder, alone and over HTTP, against sentence-transformers."""
    if args.omp_wait_policy != "inherit":
        if "torch" in sys.modules:
            print("warning: torch is already loaded; --omp-wait-policy cannot apply", file=sys.stderr)
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # read when libgomp loads
    import torch

    from backends.engine.catalogue import default_home, pull
    from backends.engine.encoder.loader import load_encoder, unpack

    path = Path(args.model).expanduser()
    if not path.exists():
        home = Path(args.home).expanduser() if args.home else default_home(os.environ)
        path = pull(args.model, home=home, progress=True)
    model_dir = unpack(path)
    model = load_encoder(model_dir, quantization=args.quantization, dtype=args.dtype)
    texts = make_texts(model, args.sentences, args.min_tokens, args.max_tokens, args.seed)
    token_counts = [len(ids) for ids in model.tokenize(texts)]
    num_tokens = sum(token_counts)
    threads = torch.get_num_threads()
    print(f"{len(texts)} sentences, {num_tokens} tokens ({min(token_counts)}-{max(token_counts)} each), "
          f"{threads} threads", file=sys.stderr)  # fmt: skip

    st_side, reference = _sentence_transformers(model_dir, texts, args.batch_size, num_tokens)
    engine_side = _engine(model, texts, num_tokens, args.max_batch_tokens)
    dtype = model.dtype
    del model  # the server loads its own
    http_side, vectors = _http(path, args, texts, num_tokens)
    worst = float(torch.nn.functional.cosine_similarity(torch.tensor(vectors), torch.tensor(reference)).min())

    sides = [st_side, engine_side, http_side]
    for side in sides:
        side.ratio = side.sentences_per_s / st_side.sentences_per_s
    report = Report(
        model=str(args.model), quantization=args.quantization, dtype=dtype, sentences=len(texts), tokens=num_tokens,
        min_tokens=args.min_tokens, max_tokens=args.max_tokens, concurrency=args.concurrency,
        batch_size=args.batch_size, threads=threads, sides=sides, worst_cosine_http=worst,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )  # fmt: skip
    _print(report, human(args.json))
    write_json(args.json, report)
    return 0


# ---------------------------------------------------------------------------------------------
# the workload


def make_texts(model, n: int, min_tokens: int, max_tokens: int, seed: int) -> list[str]:  # type: ignore[no-untyped-def]
    """``n`` texts whose token counts (special tokens included) are uniform in
    ``[min_tokens, max_tokens]``: random whole words of the model's vocabulary, added until the
    count is reached (BERT's tokenizer splits on spaces, so a text's count is its words' sum)."""
    rng = random.Random(seed)
    vocab = sorted(w for w in model.tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
    special = model.num_special_tokens
    texts = []
    for _ in range(n):
        target = rng.randint(min_tokens, max_tokens) - special
        words: list[str] = []
        count = 0
        while count < target:
            word = rng.choice(vocab)
            cost = len(model.tokenizer.encode(word, add_special_tokens=False).ids)
            if count + cost > target:
                continue
            words.append(word)
            count += cost
        texts.append(" ".join(words))
    return texts


# ---------------------------------------------------------------------------------------------
# the three sides


def _sentence_transformers(model_dir: Path, texts: list[str], batch_size: int, num_tokens: int):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    st.encode(texts[: 2 * batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    vectors = st.encode(texts, batch_size=batch_size)
    wall = time.perf_counter() - start
    del st
    print(f"sentence-transformers: {wall:.1f} s", file=sys.stderr)
    return Side("sentence-transformers", wall, len(texts) / wall, num_tokens / wall), vectors


def _engine(model, texts: list[str], num_tokens: int, max_batch_tokens: int | None) -> Side:  # type: ignore[no-untyped-def]
    from backends.engine.encoder.backend import EncoderOptions
    from backends.engine.encoder.engine import EncoderEngine

    options = EncoderOptions()
    engine = EncoderEngine(
        model, max_batch_tokens=max_batch_tokens or options.max_batch_tokens, max_batch_size=options.max_batch_size
    )
    engine.start()

    async def embed_all(batch: list[str]) -> None:
        ids = model.tokenize(batch)
        await asyncio.gather(*(engine.embed([x]) for x in ids))

    try:
        asyncio.run(embed_all(texts[:64]))  # warm-up
        start = time.perf_counter()
        asyncio.run(embed_all(texts))
        wall = time.perf_counter() - start
    finally:
        engine.stop()
    print(f"engine: {wall:.1f} s ({engine.num_steps} steps)", file=sys.stderr)
    return Side("engine", wall, len(texts) / wall, num_tokens / wall)


def _http(path: Path, args: Namespace, texts: list[str], num_tokens: int) -> tuple[Side, list[list[float]]]:
    import httpx

    from bench.swap import _server

    budget = f", max_batch_tokens = {args.max_batch_tokens}" if args.max_batch_tokens else ""
    config = (
        f'[[models]]\nname = "embed"\nbackend = "encoder"\n'
        f'options = {{ model = "{path}", quantization = "{args.quantization}", dtype = "{args.dtype}"{budget} }}\n'
    )
    vectors: list[list[float]] = [[] for _ in texts]

    async def load(url: str, indices: list[int]) -> None:
        queue = list(reversed(indices))
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:

            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    response = await client.post("/v1/embeddings", json={"model": "embed", "input": texts[i]})
                    response.raise_for_status()
                    vectors[i] = response.json()["data"][0]["embedding"]

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))

    with tempfile.TemporaryDirectory(prefix="taxiway-bench-embeddings-") as tmp:
        config_path = Path(tmp) / "config.toml"
        config_path.write_text(config, encoding="utf-8")
        with _server(config_path, Path(tmp) / "server.log", ready_timeout=300) as (url, _proc):
            asyncio.run(load(url, list(range(min(64, len(texts))))))  # warm-up
            start = time.perf_counter()
            asyncio.run(load(url, list(range(len(texts)))))
            wall = time.perf_counter() - start
    print(f"http: {wall:.1f} s", file=sys.stderr)
    return Side("http", wall, len(texts) / wall, num_tokens / wall), vectors


def _print(report: Report, out: TextIO) -> None:
    print(f"{report.sentences} sentences ({report.min_tokens}-{report.max_tokens} tokens, {report.tokens} in all), "
          f"{report.threads} threads, OMP_WAIT_POLICY {report.omp_wait_policy}, weights {report.quantization}, math {report.dtype}; "
          f"{report.date}", file=out)  # fmt: skip
    print(f"{'side':<24}{'wall s':>9}{'sent/s':>10}{'tok/s':>10}{'ratio':>8}", file=out)
    for s in report.sides:
        print(f"{s.name:<24}{s.wall_s:>9.1f}{s.sentences_per_s:>10.1f}{s.tokens_per_s:>10.0f}{s.ratio:>7.2f}x", file=out)
    print(f"worst cosine, http vs sentence-transformers: {report.worst_cosine_http:.6f}", file=out)
