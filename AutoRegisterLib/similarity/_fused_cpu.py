"""Fused CPU LNCC kernel (numba): not built yet."""


def available():
    """Whether the fused CPU kernel can run here, and why not."""
    return False, "the fused CPU kernel is not implemented yet"
