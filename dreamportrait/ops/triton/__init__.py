"""Triton kernels of the ops, one module per op.

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is
imported), which is how they are tested on machines without a GPU.
"""
