"""The model: its config, the Llama-family forward, attention over the paged cache, weight-only
quantized linears, and the loaders that build it from GGUF or safetensors files."""
