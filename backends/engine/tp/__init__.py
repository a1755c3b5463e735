"""Tensor parallelism over torch.distributed: the TP engine, sharding, step messages, ranks."""
