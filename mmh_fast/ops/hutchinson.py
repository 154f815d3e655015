"""Hutchinson trace estimation with counter-based probes.

tr(A) = E[v^T A v] for probes with E[v v^T] = I (Hutchinson 1989). Probes are
keyed by (seed, sample id, probe index), so a sample's probes, and hence its
estimate, do not depend on the batch it is in. Since v^T A v = (A^T v) . v, a
matvec through a VJP serves as well as one through a JVP.
"""
from __future__ import annotations

import math
import operator
from typing import Callable

import torch

from ._arrays import as_tensor
from ._dispatch import kernel

__all__ = ["hutchinson_probes", "hutchinson_trace", "PROBE_KINDS", "PROBE_INDEX_LIMIT", "PROBE_NUMEL_LIMIT"]

PROBE_KINDS = {"rademacher": 0, "gaussian": 1}
#: probe indices must be < 2**34 and a probe may have at most 2**32 elements:
#: with the whole 64-bit seed and sample id, that is all the 192 input bits of
#: Philox4x32 hold (csrc/kernels/philox.h), so larger keys are refused rather
#: than truncated into another probe's stream
PROBE_INDEX_LIMIT = 1 << 34
PROBE_NUMEL_LIMIT = 1 << 32


def _probe_kind(probe: str) -> int:
    if probe not in PROBE_KINDS:
        raise ValueError(f"probe must be one of {sorted(PROBE_KINDS)}, got {probe!r}")
    return PROBE_KINDS[probe]


def _integer(value, name: str) -> int:
    """``value`` as an int; a float (even 2.0), bool or other non-integer is refused,
    not truncated: int(1.5) would silently select another probe stream."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer (a probe counter or key), got {value!r} of type "
                        f"{type(value).__name__}") from None


def _check_counter_range(probe_begin: int, n_probes: int, numel: int) -> None:
    if probe_begin < 0:
        raise ValueError(f"probe_begin must be >= 0, got {probe_begin}")
    if probe_begin + n_probes > PROBE_INDEX_LIMIT:
        raise ValueError(f"probe indices [probe_begin, probe_begin + n_probes) = [{probe_begin}, "
                         f"{probe_begin + n_probes}) must be < 2**34 (PROBE_INDEX_LIMIT), the probe counter's range")
    if numel > PROBE_NUMEL_LIMIT:
        raise ValueError(f"a probe has {numel} elements per sample; at most 2**32 (PROBE_NUMEL_LIMIT) have a "
                         "probe counter")


def _sample_ids(sample_ids, batch: int, device) -> torch.Tensor:
    if sample_ids is None:
        return torch.arange(batch, dtype=torch.int64, device=device)
    ids = torch.as_tensor(sample_ids, dtype=torch.int64, device=device).reshape(-1)
    if ids.numel() != batch:
        raise ValueError(f"sample_ids has {ids.numel()} entries but the batch has {batch} samples")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("sample_ids must be non-negative")
    return ids


def hutchinson_probes(shape, n_probes: int = 1, *, probe: str = "rademacher", seed: int = 0,
                      sample_ids=None, probe_begin: int = 0, dtype=torch.float32,
                      device="cpu") -> torch.Tensor:
    """Probe vectors for a batch.

    Args:
        shape: batch shape ``(B, *sample_shape)``.
        n_probes: number of probes per sample.
        probe: ``"rademacher"`` (+-1) or ``"gaussian"`` (standard normal).
        seed: 64-bit key of the counter-based generator.
        sample_ids: [B] non-negative ids (default ``arange(B)``); a sample's
            probes depend only on (seed, its id, probe index).
        probe_begin: index of the first probe (to continue a stream of probes);
            probe indices must stay below ``PROBE_INDEX_LIMIT`` = 2**34 and a
            sample may have at most ``PROBE_NUMEL_LIMIT`` = 2**32 elements
            (ValueError otherwise: larger keys have no counter of their own).

    Returns:
        Tensor [n_probes, B, *sample_shape] of ``dtype`` on ``device``.
    """
    shape = tuple(_integer(s, "shape entries") for s in shape)
    if len(shape) < 1:
        raise ValueError("shape must include the batch dimension")
    n_probes, probe_begin, seed = _integer(n_probes, "n_probes"), _integer(probe_begin, "probe_begin"), \
        _integer(seed, "seed")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    B = shape[0]
    numel = math.prod(shape[1:]) if len(shape) > 1 else 1
    _check_counter_range(probe_begin, n_probes, numel)
    device = torch.device(device)
    ids = _sample_ids(sample_ids, B, device)
    fn = kernel("hutchinson_probes", device)
    out = fn(ids, numel, probe_begin, n_probes, seed, _probe_kind(probe), dtype)
    return out.reshape((n_probes,) + shape)


def hutchinson_trace(matvec: Callable[[torch.Tensor], torch.Tensor], x, n_probes: int = 1, *,
                     probe: str = "rademacher", seed: int = 0, return_stderr: bool = False,
                     sample_ids=None, probe_begin: int = 0):
    """Per-sample Hutchinson estimate of tr(A_b) for a batch of linear operators.

    Args:
        matvec: maps a batch of probes shaped like ``x`` [B, ...] to ``A v`` of
            the same shape (a JVP or VJP of a network, or any linear operator).
            Called once per probe.
        x: tensor (or numpy / cupy array) [B, ...] fixing batch, shape, dtype, device.
        n_probes: probes per sample (>= 1; >= 2 when ``return_stderr``).
        probe: ``"rademacher"`` or ``"gaussian"``.
        seed, sample_ids, probe_begin: see :func:`hutchinson_probes`.
        return_stderr: also return the standard error of each estimate.

    Returns:
        trace [B] (float64 for float64 ``x``, else float32), and with
        ``return_stderr`` the standard errors [B].
    """
    xt, back = as_tensor(x, "x")
    if xt.dim() < 1 or xt.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(xt.shape)}")
    if not xt.is_floating_point():
        raise TypeError(f"x must be floating point, got {xt.dtype}")
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    if return_stderr and n_probes < 2:
        raise ValueError("return_stderr needs n_probes >= 2 (a standard error from one probe is undefined)")
    kind = _probe_kind(probe)
    if not bool(torch.isfinite(xt).all()):
        raise ValueError("x contains NaN or inf values")
    B = xt.shape[0]
    numel = xt[0].numel()
    probe_begin, seed = _integer(probe_begin, "probe_begin"), _integer(seed, "seed")
    _check_counter_range(probe_begin, n_probes, numel)
    ids = _sample_ids(sample_ids, B, xt.device)
    gen = kernel("hutchinson_probes", xt.device)
    reduce = kernel("hutchinson_reduce", xt.device)
    dots = []
    for p in range(n_probes):
        v = gen(ids, numel, probe_begin + p, 1, seed, kind, xt.dtype).reshape(xt.shape)
        av = matvec(v)
        if not isinstance(av, torch.Tensor) or av.shape != xt.shape:
            got = tuple(av.shape) if isinstance(av, torch.Tensor) else type(av).__name__
            raise ValueError(f"matvec must return a tensor shaped like x {tuple(xt.shape)}, got {got}")
        if av.device != xt.device or av.dtype != xt.dtype:
            raise ValueError(f"matvec must return a tensor on x's device and dtype ({xt.device}, {xt.dtype}), "
                             f"got ({av.device}, {av.dtype})")
        _, _, d = reduce(av.detach().reshape(1, B, numel), ids, probe_begin + p, seed, kind)
        dots.append(d)
    dots = torch.cat(dots, 0)  # [P, B] float64
    bad = ~torch.isfinite(dots).all(0)
    if bool(bad.any()):  # one [B] check, not one per element of A v: a NaN never passes silently
        rows = torch.nonzero(bad).reshape(-1)[:8].tolist()
        raise ValueError(f"matvec returned NaN or inf values (samples {rows}{'...' if int(bad.sum()) > 8 else ''}); "
                         "check x and the operator")
    out_dtype = torch.float64 if xt.dtype == torch.float64 else torch.float32
    est = dots.mean(0).to(out_dtype)
    if not return_stderr:
        return back(est)
    se = (dots.std(0, unbiased=True) / math.sqrt(n_probes)).to(out_dtype)
    return back(est), back(se)
