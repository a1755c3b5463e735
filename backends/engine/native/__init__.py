"""Native CPU kernels: the C sources (``csrc/``, one ABI in ``csrc/abi.h``), their build and
binding (``ckernels``, ``abi``), and the step that swaps them into a built model (``fuse.fuse``)."""
