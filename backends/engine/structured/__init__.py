"""Constrained decoding: ``SamplingParams.structured`` (a JSON schema, maybe wrapped as tool calls)
compiled by llguidance into a grammar (``grammar.py``), one matcher per sequence advanced with each
sampled token, its token mask applied to that sequence's row in the batched sampler
(``matchers.py``)."""
