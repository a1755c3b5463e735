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
    """Download a catalogue model into the model cache (or list the catalogue).

    Prints the cached file's path on stdout; returns the exit code."""
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
    """Generate text from a prompt on the engine alone, no server (timings on stderr)."""
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
        kernels = load_kernels(EngineOptions(model=source, home=str(home)))
        if first:
            outcome = "ready" if kernels is not None else "unavailable: torch's ops instead (see the log)"
            print(f"taxiway: native kernels {outcome} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    aliases = ["default"] if backend == "engine" else ["embed"]
    return {"name": name, "aliases": aliases, "backend": backend, "options": {"model": source}}


def configure_show(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``taxiway show MODEL``."""
    parser.description = (
        "Describe a model from its file's header, without loading it: architecture, parameters, "
        "how the weights are stored, context length, layers, vocabulary."
    )
    parser.add_argument("model", metavar="MODEL", help="a pulled catalogue name, a .gguf file or a model directory")
    parser.add_argument("--home", type=Path, default=None, help="Taxiway home (default: $TAXIWAY_HOME or ~/.cache/taxiway)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")


def run_show(args: argparse.Namespace) -> int:
    """Describe a model: architecture, parameters, storage, context length (no loading)."""
    import collections
    import json

    from backends.engine.catalogue import CATALOGUE, cached_path, default_home
    from backends.engine.memory import read_header

    home = args.home if args.home is not None else default_home(os.environ)
    entry = CATALOGUE.get(args.model)
    path = cached_path(entry, home) if entry is not None else Path(args.model).expanduser()
    if not path.exists():
        hint = f"pull it first: taxiway pull {args.model}" if entry is not None else "no such file or directory"
        print(f"taxiway show: {args.model!r} is not here ({hint})", file=sys.stderr)
        return 1
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    info: dict[str, object] = {"model": args.model, "path": str(path), "bytes": size,
                               "backend": entry.backend if entry is not None else "engine"}  # fmt: skip
    if entry is not None:
        info["description"] = entry.description
    if info["backend"] == "engine":
        try:
            config, tensors = read_header(path)
        except (ConfigError, ValueError, OSError) as exc:
            print(f"taxiway show: {exc}", file=sys.stderr)
            return 1
        kinds = collections.Counter(t.kind for t in tensors)
        info |= {
            "architecture": config.architecture, "parameters": sum(t.rows * t.cols for t in tensors),
            "tensors": dict(kinds.most_common()), "context_length": config.max_position_embeddings,
            "layers": config.num_layers, "hidden_size": config.hidden_size, "heads": config.num_heads,
            "kv_heads": config.num_kv_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
        }  # fmt: skip
    if args.json:
        print(json.dumps(info))
        return 0
    rows = [("path", f"{path} ({size / 2**20:,.0f} MiB)"), ("backend", str(info["backend"]))]
    if "architecture" in info:
        rows += [
            ("architecture", str(info["architecture"])),
            ("parameters", f"{int(info['parameters']) / 1e6:,.1f}M"),  # type: ignore[call-overload]
            ("tensors", ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())),
            ("context length", f"{config.max_position_embeddings:,}"),
            ("layers", f"{config.num_layers} (hidden {config.hidden_size}, {config.num_heads} heads, "
                       f"{config.num_kv_heads} KV heads of {config.head_dim})"),
            ("vocabulary", f"{config.vocab_size:,}"),
        ]  # fmt: skip
    if entry is not None and entry.description:
        rows.append(("description", entry.description))
    print(args.model)
    for key, value in rows:
        print(f"  {key:<15}{value}")
    return 0


def configure_rm(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``taxiway rm NAME``."""
    parser.description = "Delete pulled catalogue models from the model cache (they are pulled again on next use)."
    parser.add_argument("names", nargs="+", metavar="NAME", help="catalogue model names (see `taxiway pull --list`)")
    parser.add_argument("--home", type=Path, default=None, help="Taxiway home (default: $TAXIWAY_HOME or ~/.cache/taxiway)")


def run_rm(args: argparse.Namespace) -> int:
    """Delete pulled catalogue models from the model cache."""
    import shutil

    from backends.engine.catalogue import cached_path, default_home, lookup

    home = args.home if args.home is not None else default_home(os.environ)
    code = 0
    for name in args.names:
        try:
            folder = cached_path(lookup(name), home).parent  # models/NAME: the file and anything extracted from it
        except ConfigError as exc:
            print(f"taxiway rm: {exc}", file=sys.stderr)
            code = 1
            continue
        if not folder.is_dir():
            print(f"taxiway rm: {name} is not pulled", file=sys.stderr)
            code = 1
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder)
        print(f"deleted {name} ({size / 2**20:,.0f} MiB)")
    return code
