"""Engine subcommands for the ``taxiway`` CLI (registered in ``backends.engine``).

Kept free of torch: building the CLI imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gateway.errors import ConfigError


def configure_pull(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``taxiway pull NAME``."""
    from backends.engine.catalogue import CATALOGUE

    parser.description = "Download a catalogue model into the model cache and print its path."
    parser.add_argument(
        "name", nargs="?", help=f"catalogue model name (one of: {', '.join(sorted(CATALOGUE))})"
    )
    parser.add_argument(
        "--home", type=Path, default=None, help="Taxiway home (default: $TAXIWAY_HOME or ~/.cache/taxiway)"
    )
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run_pull(args: argparse.Namespace) -> int:
    """Pull ``args.name``; print the cached file's path on stdout. Returns the exit code."""
    from backends.engine.catalogue import CATALOGUE, PullError, cached_path, default_home, pull

    # The command's configuration: its arguments, else the environment (``default_home``).
    home = args.home if args.home is not None else default_home(os.environ)
    if args.list or not args.name:
        for entry in CATALOGUE.values():
            state = "cached" if cached_path(entry, home).is_file() else "not pulled"
            print(f"{entry.name}\t{state}\t{entry.description}")
        return 0 if args.list else 2
    try:
        path = pull(args.name, home=home, progress=not args.quiet)
    except (ConfigError, PullError) as exc:
        print(f"taxiway pull: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def configure_generate(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``taxiway generate``."""
    parser.description = "Stream a completion from the engine alone, without a server."
    parser.add_argument("prompt", help="the prompt (with --chat: the user message)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name, .gguf file or HF directory")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--quantization", choices=["int4", "int8", "none"], default=None)
    parser.add_argument("--home", type=Path, default=None, help="Taxiway home (model cache)")


def run_generate(args: argparse.Namespace) -> int:
    """Load the model, stream the completion to stdout; timings to stderr."""
    import time

    import msgspec

    from backends.engine.builder import EngineOptions, build_engine
    from backends.engine.catalogue import PullError
    from backends.engine.text.chat_template import ChatTemplate
    from gateway.errors import TaxiwayError
    from gateway.interface import ChatMessage, Delta, SamplingParams
    from gateway.logs import configure_logging

    configure_logging("warning", stream=sys.stderr)
    try:
        options = EngineOptions(
            model=args.model, dtype=args.dtype, quantization=args.quantization, threads=args.threads,
            max_num_seqs=1, kv_cache_tokens=max(1024, args.max_tokens + 4096),
            home=str(args.home) if args.home else None,
        )  # fmt: skip
        sampling = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=args.seed,
        )  # fmt: skip
        started = time.perf_counter()
        engine = build_engine(options, progress=True)
        loaded = time.perf_counter()
        tokenizer = engine.tokenizer
        if args.chat:
            messages = [ChatMessage(role="system", content=args.system)] if args.system else []
            messages.append(ChatMessage(role="user", content=args.prompt))
            prompt_ids = tokenizer.encode(ChatTemplate.from_tokenizer(tokenizer).render(messages), add_special_tokens=False)
        else:
            prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True)
        engine.check_request(len(prompt_ids), sampling, param="prompt")
        engine.add_request("generate", prompt_ids, sampling)
        first = 0.0
        num_tokens = 0
        while engine.has_unfinished():
            for output in engine.step():
                for item in output.items:
                    if isinstance(item, Delta):
                        first = first or time.perf_counter()
                        num_tokens += len(item.token_ids)
                        sys.stdout.write(item.text)
                        sys.stdout.flush()
        done = time.perf_counter()
    except (ConfigError, PullError, TaxiwayError, msgspec.ValidationError, ValueError) as exc:
        print(f"taxiway generate: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    decode_rate = (num_tokens - 1) / (done - first) if num_tokens > 1 and done > first else 0.0
    print(
        f"[load {loaded - started:.1f} s · prompt {len(prompt_ids)} tokens, first token after "
        f"{first - loaded:.2f} s · {num_tokens} tokens at {decode_rate:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def model_entry(model: str, home: Path, *, progress: bool) -> dict[str, object] | None:
    """``taxiway serve MODEL``'s ``[[models]]`` table for a catalogue name, a ``.gguf`` file or a
    model directory (``config.json``: an encoder's ``model_type`` is served by ``encoder``); None
    for anything else. Downloads a catalogue model now, and builds the native kernels, so that
    their progress shows on the terminal rather than in the server's log."""
    import json
    import time

    from backends.engine.catalogue import CATALOGUE, resolve_model
    from backends.engine.encoder.loader import MODEL_TYPES as ENCODER_MODEL_TYPES

    path = Path(model).expanduser()
    if model not in CATALOGUE and not path.exists():
        return None
    resolved = resolve_model(model, home, progress=progress)
    if model in CATALOGUE:
        name, backend, source = model, CATALOGUE[model].backend, model
    else:
        config = resolved / "config.json" if resolved.is_dir() else None
        model_type = json.loads(config.read_text()).get("model_type") if config is not None else None
        name = resolved.stem.lower() if resolved.is_file() else resolved.name
        backend = "encoder" if model_type in ENCODER_MODEL_TYPES else "engine"
        source = str(resolved.resolve())
    if backend == "engine":
        from backends.engine.builder import EngineOptions, load_kernels

        kernels_dir = home / "kernels"
        first = progress and not any(kernels_dir.glob("taxiway_kernels-*.so"))
        if first:
            print("taxiway: building the native kernels for this machine (once)…", file=sys.stderr, flush=True)
        started = time.perf_counter()
        load_kernels(EngineOptions(model=source, home=str(home)))
        if first:
            print(f"taxiway: native kernels ready ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    aliases = ["default"] if backend == "engine" else ["embed"]
    return {"name": name, "aliases": aliases, "backend": backend, "options": {"model": source}}
