"""cuda_ext: 1-bit convolution kernels behind ``torch.library`` ops, and the packed model format.

``cuda_ext.ops`` loads the compiled extension (C++ always; CUDA when it was built);
``cuda_ext.reference`` is the pure-torch reference of every op; ``cuda_ext.packed`` exports a
``bireal_core`` checkpoint to a really-1-bit artifact and runs it (``PackedBiReal``).
Format of the packed tensors: ``docs/packed_format.md``.
"""
