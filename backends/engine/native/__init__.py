"""Native CPU kernels (C sources in ``csrc/``, built on first use) and the step that swaps them in."""
