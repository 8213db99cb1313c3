"""Triton kernels and their launchers (no validation: the API in `apollo_fast` checks inputs first); the
top-level `kernels/` folder is installed as `apollo_fast.kernels`, and only a Triton backend imports it."""
