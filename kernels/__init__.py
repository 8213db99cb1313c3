"""Triton kernels and their launchers, installed as `apollo_fast.kernels`.

Kernels do no validation: the public API in `apollo_fast` checks shapes, dtypes and devices
before it calls a launcher here. Nothing in this package is imported unless a Triton backend is
selected, so `import apollo_fast` never imports triton.
"""
