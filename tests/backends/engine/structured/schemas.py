"""Random JSON schemas within what constrained decoding enforces (llguidance's subset): objects
(properties, required, additionalProperties false), arrays (items, minItems, maxItems), strings
(maxLength, enum, simple patterns), integers and numbers (bounds), booleans, null, enum, const,
anyOf, $ref to $defs. Seeded: the same seed, the same schemas."""

from __future__ import annotations

import random
from typing import Any

_WORDS = ["name", "age", "city", "tags", "score", "active", "id", "items", "note", "kind", "count", "price"]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "anyOf"]
    if depth < 2:
        kinds += ["object", "object", "array"]
    kind = rng.choice(kinds)
    if kind == "object":
        names = rng.sample(_WORDS, rng.randint(1, 4))
        props = {n: random_schema(rng, depth + 1) for n in names}
        required = [n for n in names if rng.random() < 0.7]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    if kind == "array":
        schema: dict[str, Any] = {"type": "array", "items": random_schema(rng, depth + 1)}
        low = rng.randint(0, 2)
        schema["minItems"] = low
        schema["maxItems"] = low + rng.randint(0, 3)
        return schema
    if kind == "string":
        choice = rng.random()
        if choice < 0.3:
            return {"type": "string", "maxLength": rng.randint(1, 16)}
        if choice < 0.5:
            return {"type": "string", "pattern": rng.choice(["^[a-z]{2,6}$", "^[0-9]{3}-[0-9]{2}$", "^(yes|no)$"])}
        if choice < 0.6:
            return {"type": "string", "minLength": 2, "maxLength": 10}
        return {"type": "string"}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": 0} if rng.random() < 0.5 else {"type": "number"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["fixed", 42, False])}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(rng.randint(2, 3))]}
    return {"type": kind}


def random_schemas(count: int, seed: int = 17) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        schema = random_schema(rng)
        if i % 10 == 0:  # some through $defs / $ref
            schema = {"$defs": {"part": schema}, "type": "object", "properties": {"part": {"$ref": "#/$defs/part"}},
                      "required": ["part"], "additionalProperties": False}  # fmt: skip
        out.append(schema)
    return out
