"""Fused CuPy LNCC kernels: not built yet."""


def available():
    """Whether the CuPy kernels can run here, and why not."""
    return False, "the CuPy kernels are not implemented yet"
