"""One engine step on the model: scheduler output to tensors, the forward, batched sampling."""
