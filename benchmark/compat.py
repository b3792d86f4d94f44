"""Import torchvision on CPU torch (DEPENDENCIES.md "Torch").

The pinned torchvision 0.28 wheel is a CUDA build: on CPU torch its ``_meta_registrations`` registers fake kernels
for ``torchvision::nms``/``qnms`` before checking that the C++ ops loaded, and the import fails with
``RuntimeError: operator torchvision::nms does not exist``. Defining the two schemas first, only on that exact
error, makes models, transforms and ``lpips`` work (``torchvision.ops`` stays unusable; we do not use it).
Call ``import_torchvision()`` before anything else imports torchvision.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

# Kept alive for the process: dropping the Library object would unregister the schemas.
_TORCHVISION_LIB: torch.library.Library | None = None


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, defining the missing op schemas first when needed."""
    global _TORCHVISION_LIB
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        if _TORCHVISION_LIB is None:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TORCHVISION_LIB = lib
        import torchvision
    return torchvision
