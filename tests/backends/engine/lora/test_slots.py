"""``LoRASlots`` + ``LoRAProjection``: every row of a step gets exactly its own adapter's term,
whether it sits in a long run of one adapter (computed on that adapter's columns) or among the
short rows of the masked product, and a base row gets none; checked against a per-row float64
reference on random adapters of different ranks and kinds."""

from __future__ import annotations

import pytest
import torch

from backends.engine.lora.adapter import LoRAAdapter
from backends.engine.lora.layers import LoRAProjection
from backends.engine.lora.slots import MIN_RUN, LoRASlots

IN, OUT = 24, 40


def _adapter(lora_id: int, ranks: dict[str, int], gen: torch.Generator) -> LoRAAdapter:
    layer = {kind: (torch.randn(r, IN, generator=gen), torch.randn(r, OUT, generator=gen)) for kind, r in ranks.items()}
    return LoRAAdapter(f"a{lora_id}", None, lora_id, ranks, [layer])  # type: ignore[arg-type]


def _expected(x: torch.Tensor, y: torch.Tensor, rows: list[LoRAAdapter | None], kind: str) -> torch.Tensor:
    out = y.double().clone()
    for t, adapter in enumerate(rows):
        if adapter is not None and kind in adapter.ranks:
            a, bt = adapter.layers[0][kind]
            out[t] += (x[t].double() @ a.double().t()) @ bt.double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_and_masked_rows_each_get_their_own_term(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    adapters = [_adapter(1, {"qkv": 4}, gen), _adapter(2, {"qkv": 8, "o": 2}, gen), _adapter(3, {"o": 16}, gen)]
    one, two, three = adapters
    slots = LoRASlots(1, max_loras=3, dtype=torch.float32)
    # a prompt chunk of one (a run), decode rows of every kind, base rows, a chunk of two, a short
    # run of two just under MIN_RUN (masked), a chunk of three (adapts no qkv: adds nothing there)
    rows = [one] * (MIN_RUN + 3) + [None, two, three, None, one] + [two] * MIN_RUN + [three] * (MIN_RUN - 1) + [None] * 2 + [three] * 20
    slots.prepare(rows)
    terms = slots.batch.terms
    assert [(s, e) for s, e, _, _ in terms["qkv"].runs] == [(0, MIN_RUN + 3), (MIN_RUN + 8, 2 * MIN_RUN + 8)]
    assert terms["qkv"].rows is not None and len(terms["o"].runs) == 2  # two's chunk adapts o too; three's last chunk
    for kind in ("qkv", "o"):
        x = torch.randn(len(rows), IN, generator=gen).to(dtype)
        for y_dtype in (dtype, torch.float32):  # a projection's output, and the float32 residual
            y = torch.randn(len(rows), OUT, generator=gen).to(y_dtype)
            want = _expected(x, y, rows, kind)
            LoRAProjection(slots, 0, kind).add_to(x, y)
            tol = 1e-4 if y_dtype == torch.float32 else 2e-2
            torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * 10)
            base = [t for t, a in enumerate(rows) if a is None or kind not in a.ranks]
            assert torch.equal(y[base].double(), _expected(x, y, [None] * len(rows), kind)[base])


def test_only_runs_and_only_short_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    one, two = _adapter(1, {"qkv": 4}, gen), _adapter(2, {"qkv": 8}, gen)
    slots = LoRASlots(1, max_loras=2, dtype=torch.float32)
    for rows in ([one] * MIN_RUN + [two] * (2 * MIN_RUN), [one, two, None, two, one]):
        slots.prepare(rows)
        x, y = torch.randn(len(rows), IN, generator=gen), torch.randn(len(rows), OUT, generator=gen)
        want = _expected(x, y, rows, "qkv")
        LoRAProjection(slots, 0, "qkv").add_to(x, y)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-3)
