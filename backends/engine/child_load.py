"""Loading a model in a child process, for loads that run beside a model already serving.

A load (read the file, decode and requantize every tensor, pack the native layouts) is seconds
of CPU work, much of it in Python. On a thread of the serving process it shares the GIL with the
event loop and the step thread: at the lowest CPU priority the load thread is descheduled while
holding the GIL, and every request waits (``taxiway bench swap``, 2 cores: p99 latency during a
swap 4.5x steady with the load on a nice-19 thread). In a child process (at ``load_niceness``,
7 by default) it competes for CPU alone, at a priority the scheduler weighs against serving's.

The child (spawned: no fork of a threaded process) loads the model and tokenizer, drops its
handles on the native kernels (a loaded library cannot travel) and sends the rest through a pipe:
torch moves every tensor into shared memory, and the parent maps the same pages, so no weight is
copied twice. The parent attaches its own kernels to the modules that held them, and the child
exits once the parent has the tensors.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from backends.engine.builder import EngineOptions
    from backends.engine.model.loader import LoadedModel
    from backends.engine.native.ckernels import Kernels
    from backends.engine.text.tokenizer import Tokenizer

#: Seconds the parent waits for the child to exit once the tensors are received.
EXIT_WAIT_S = 30.0


class ChildLoadError(RuntimeError):
    """The child failed and its own error could not travel: the message is that error as text,
    with the child's traceback. (An error that can travel is raised as itself, the child's
    traceback in its notes.)"""


class ChildStartError(ChildLoadError):
    """The child died before answering: it could not start (e.g. a main script without the
    ``if __name__ == "__main__"`` guard, which a spawned child imports) or was killed."""


@contextlib.contextmanager
def thread_niceness(niceness: int) -> Iterator[None]:
    """This thread at ``niceness`` for the block (``build_engine`` wraps a child load in it). A
    load thread runs at nice 19 (``async_engine.LOAD_NICENESS``): a child it spawned started there,
    and under full load its interpreter start and ``import torch`` alone took minutes, then this
    thread's part starved too (``taxiway bench swap``, 16 streams on 2 cores: B never ready in 100
    s). Lowering a niceness needs CAP_SYS_NICE; without it both stay at this thread's."""
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, before)


def _child(path: str, options_json: bytes, conn: Any) -> None:  # the spawned process
    try:
        import torch
        import torch.multiprocessing  # noqa: F401 - registers the tensor reductions (shared memory)

        from backends.engine.builder import EngineOptions, load_kernels
        from backends.engine.model.loader import load_model
        from backends.engine.text.tokenizer import Tokenizer

        options = msgspec.json.decode(options_json, type=EngineOptions)
        kernels = load_kernels(options)
        dtype = torch.bfloat16 if options.dtype == "bfloat16" else torch.float32
        loaded = load_model(
            path, quantization=options.quantization, dtype=dtype, device=options.device, threads=options.threads,
            kernels=kernels,
        )  # fmt: skip
        held = [name for name, mod in loaded.model.named_modules() if getattr(mod, "kernels", None) is not None]
        for name in held:
            loaded.model.get_submodule(name).kernels = None
        conn.send((loaded, Tokenizer.load(path), held))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        exc.add_note(f"in the load process:\n{traceback.format_exc()}")
        try:  # the error itself, so the parent reports it as an in-process load would
            conn.send(exc)
        except Exception:  # noqa: BLE001 - an error that cannot travel goes as text
            conn.send(ChildLoadError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    conn.recv()  # the parent has mapped the tensors: the shared pages may now lose this owner


def load_in_child(path: Path, options: EngineOptions, kernels: Kernels | None) -> tuple[LoadedModel, Tokenizer]:
    """``load_model`` and ``Tokenizer.load`` of ``path`` in a spawned child (at this thread's priority); the
    modules that held the child's native kernels get ``kernels`` (the parent's)."""
    import multiprocessing

    import torch.multiprocessing  # noqa: F401 - registers the tensor reductions

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(str(path), msgspec.json.encode(options), child), daemon=True,
                       name="taxiway-engine-load")  # fmt: skip
    proc.start()  # at this thread's priority: build_engine runs a child load in thread_niceness
    child.close()
    try:
        try:
            message = parent.recv()
        except (EOFError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - an error whose class cannot be rebuilt here
            message = ChildLoadError(f"the load process sent what cannot be read: {exc}")
        with contextlib.suppress(OSError):
            parent.send("received")
    except EOFError:
        proc.join(EXIT_WAIT_S)
        raise ChildStartError(f"the load process exited with code {proc.exitcode} before sending the model") from None
    finally:
        proc.join(EXIT_WAIT_S)
        if proc.is_alive():
            proc.kill()
        parent.close()
    if isinstance(message, BaseException):
        raise message
    loaded, tokenizer, held = message
    for name in held:
        loaded.model.get_submodule(name).kernels = kernels
    return loaded, tokenizer
