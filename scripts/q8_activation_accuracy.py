"""What 8-bit activations would cost in accuracy: SmolLM2 Q4_1 vs HF, the figures of
tests/backends/engine/model/test_smollm2_accuracy.py, with every int4 matmul's input rounded to int8 per
32-column group (symmetric, as llama.cpp's Q8 quantises activations for its integer dot
products). A simulation in torch, no kernel: it answers whether that route is open at all.

    python scripts/q8_activation_accuracy.py          # from the repository root, ~1 min
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' helpers

from backends.engine.model import quant  # noqa: E402
from backends.engine.model.loader import load_model  # noqa: E402
from backends.engine.catalogue import default_home, pull  # noqa: E402


def q8(x: Tensor) -> Tensor:
    """``x`` rounded to symmetric int8 per 32 columns, back in its dtype."""
    m, k = x.shape
    g = x.float().view(m, k // 32, 32)
    d = g.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, (g / d).round().clamp(-127, 127), torch.zeros_like(g))
    return (q * d).view(m, k).to(x.dtype)


def main() -> None:
    from tests.backends.engine.model import test_smollm2_accuracy as acc
    from tests.backends.engine.engine_helpers import default_kernels

    plain = quant.Int4Linear.forward

    def forward(self: quant.Int4Linear, x: Tensor) -> Tensor:
        return plain(self, q8(x) if x.dtype == torch.bfloat16 else x)

    quant.Int4Linear.forward = forward  # type: ignore[method-assign]
    # without the fuse step: the fused layer calls the kernels directly, not forward
    acc.load_fused = lambda path, **kw: load_model(path, kernels=default_kernels(), **kw)
    path = pull("smollm2-135m-instruct", home=default_home(os.environ), progress=False)
    ref = acc.reference.__wrapped__(path)
    print("bfloat16, int4 matmul inputs as int8:", acc.figures(ref, torch.bfloat16, path))


if __name__ == "__main__":
    main()
