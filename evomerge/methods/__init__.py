"""Merge kernels (plain torch functions) and the method registry, the interface the rest uses."""
