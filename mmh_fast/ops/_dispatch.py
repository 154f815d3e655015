"""Backend choice: one place that maps (kernel name, device) to a native function."""
from __future__ import annotations

import torch

from .._native import native

__all__ = ["kernel"]


def kernel(name: str, device: torch.device):
    """The compiled ``{name}_cpu`` or ``{name}_cuda`` for ``device``.

    Raises a clear error when the extension is missing or when a CUDA tensor
    reaches an extension built without CUDA kernels."""
    mod = native()
    kind = torch.device(device).type
    if kind == "cpu":
        return getattr(mod, f"{name}_cpu")
    if kind == "cuda":
        fn = getattr(mod, f"{name}_cuda", None)
        if fn is None:
            raise RuntimeError(
                f"mmh_fast was built without CUDA kernels, so {name} cannot run on {device}; "
                "rebuild on a machine with nvcc and a CUDA torch (FORCE_CUDA=1 pip install "
                "--no-build-isolation -e .) or move the input to the CPU"
            )
        return fn
    raise ValueError(f"{name}: unsupported device {device}; expected cpu or cuda")
