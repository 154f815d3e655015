"""Array interchange for the public ops: torch tensors, numpy arrays and
(when installed) cupy arrays come in; results go back as the kind that came in.
cupy goes through DLPack without a copy."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

__all__ = ["as_tensor", "restore", "check_finite", "check_floating"]


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def as_tensor(x: Any, name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Return ``(tensor, back)`` where ``back`` converts a result tensor to the
    caller's array kind. Raises TypeError naming ``name`` for anything else."""
    if isinstance(x, torch.Tensor):
        return x, lambda t: t
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got dtype=object")
        return torch.from_numpy(np.ascontiguousarray(x)), lambda t: t.detach().cpu().numpy()
    if _is_cupy(x):
        import cupy  # noqa: F401  (present since x is a cupy array)

        return torch.from_dlpack(x), lambda t: cupy.from_dlpack(t.detach())
    raise TypeError(
        f"{name} must be a torch.Tensor, numpy.ndarray or cupy.ndarray, got {type(x).__name__}"
    )


def restore(back: Callable[[torch.Tensor], Any], *tensors: torch.Tensor):
    out = tuple(back(t) for t in tensors)
    return out if len(out) > 1 else out[0]


def check_floating(t: torch.Tensor, name: str) -> None:
    if not (t.is_floating_point()):
        raise TypeError(f"{name} must hold floating-point values, got dtype {t.dtype}")


def check_finite(t: torch.Tensor, name: str) -> None:
    # fast path: a sum is finite iff every entry is, unless it overflows;
    # summed in the tensor's own dtype (a float64 sum of float32 data made a
    # float64 copy of it: twice the data's memory)
    if not t.numel():
        return
    if t.is_floating_point() and bool(torch.isfinite(t.sum())):
        return
    flat = t.reshape(-1)
    step = 1 << 24  # the exact count, a bounded slice at a time
    bad = sum(int((~torch.isfinite(flat[i:i + step])).sum()) for i in range(0, flat.numel(), step))
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or inf value(s); clean or drop them first")
