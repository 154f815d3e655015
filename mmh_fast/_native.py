"""Loading of the compiled extension ``mmh_fast._C``.

Importing mmh_fast never fails because the extension is missing; every native
call then raises :class:`NativeExtensionError` with instructions to build it.
"""
from __future__ import annotations

import torch

__all__ = ["NativeExtensionError", "native", "backend_info", "has_native"]

try:  # pragma: no cover - exercised by whether the build ran
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: BaseException | None = None
except ImportError as exc:  # pragma: no cover
    _C = None
    _IMPORT_ERROR = exc


class NativeExtensionError(RuntimeError):
    """The compiled extension mmh_fast._C is not available."""


_BUILD_HINT = (
    "mmh_fast's native extension (mmh_fast._C) is not built. Build it from the "
    "source tree with `pip install torch==2.13.0 pybind11 ninja setuptools wheel && "
    "pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`); "
    "set FORCE_CUDA=1 to insist on the CUDA kernels."
)


def has_native() -> bool:
    return _C is not None


def native():
    """Return the loaded extension module or raise a clear error."""
    if _C is None:
        raise NativeExtensionError(f"{_BUILD_HINT} (import error: {_IMPORT_ERROR})")
    return _C


def backend_info() -> dict:
    """What this installation can run.

    Returns a dict with ``native`` (the compiled extension is loaded),
    ``cuda`` (CUDA kernels compiled in), ``cuda_available`` (a CUDA device is
    usable now), ``version``, ``torch`` and ``parallel`` (ATen's thread
    settings as reported by the extension), plus ``error`` when the
    extension failed to load.
    """
    from . import __version__

    info = {
        "native": _C is not None,
        "cuda": bool(_C is not None and _C.cuda_compiled()),
        "cuda_available": torch.cuda.is_available(),
        "version": __version__,
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
    }
    if _C is not None:
        info["parallel"] = _C.parallel_info()
    else:
        info["error"] = str(_IMPORT_ERROR)
    return info
