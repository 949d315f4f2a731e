"""The similarity operator: LNCC² (the scorer and a training loss), local/global ZNCC, Mattes MI.

Public API (a contract other code depends on):

* ``lncc(fixed, moving, window=9, mask=None, reduction="mean", boundary="valid", engine="auto")``
* ``zncc_map(...)`` and ``zncc(fixed, moving, mask=None)``
* ``local_std(image, window=9)`` — a ``torch.autograd.Function``
* ``LNCCLoss`` — ``nn.Module`` returning −mean(cc)
* ``mutual_information(fixed, moving, mask=None, bins=32)``
* ``box_filter`` and the engine names in ``ENGINES``
* ``compile_kernels()`` — fills numba's on-disk cache once (``make install`` runs it)

See ``lncc.py`` for the formula, the numerics and the boundary rules.
"""

from ._inputs import FLAT_VARIANCE, ZEROS_EPS
from .box import box_filter
from .global_metrics import mutual_information, zncc
from .lncc import ENGINES, LNCCLoss, compile_kernels, lncc, zncc_map
from .local_std import STD_FLOOR, LocalStd, local_std

__all__ = [
    "lncc", "zncc_map", "zncc", "LNCCLoss", "mutual_information", "box_filter", "local_std", "LocalStd",
    "ENGINES", "FLAT_VARIANCE", "ZEROS_EPS", "STD_FLOOR", "compile_kernels",
]
