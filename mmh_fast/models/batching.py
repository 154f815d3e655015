"""Chunked network calls: default chunk sizes, halving on out-of-memory, and
checks that network outputs are finite.

Every estimator that runs a network over a user's batch (FLIPD, normal
bundle, the text-side detectors, SolidMark) goes through these helpers, so that

- a user passing 64 images of 512 x 512 is not hit by an out-of-memory error:
  the default chunk size comes from :func:`default_batch_size`, and
  :func:`run_chunked` halves it and retries the same chunk on OOM (as
  ``mmh-fast scan`` does);
- a NaN or inf coming out of a network never reaches a result silently:
  :func:`check_finite` raises :class:`NonFiniteOutputError` naming the output
  and the affected sample positions.

Callers key their randomness per sample (probes by (seed, sample id, index)),
so results do not depend on the chunking.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch

__all__ = ["is_oom", "NonFiniteOutputError", "check_finite", "default_batch_size", "run_chunked",
           "CPU_BUDGET_BYTES", "CUDA_FREE_FRACTION", "ACTIVATION_FACTOR", "BACKWARD_FACTOR",
           "per_sample_bytes"]

#: activation-memory budget of one chunk on CPU (bytes): a fixed 4 GiB, so that a
#: chunk stays well inside the RAM of a laptop / CI runner beside the weights
#: (an SD-1.5 pipeline in float32 holds about 4 GiB of weights itself)
CPU_BUDGET_BYTES = 4 << 30
#: on CUDA, a chunk may use this fraction of the memory free when it is sized
#: (torch.cuda.mem_get_info), leaving room for the allocator's fragmentation
CUDA_FREE_FRACTION = 0.5
#: activation memory of one forward pass without a graph, in elements per
#: (input element x sqrt(parameter count)); see :func:`default_batch_size`
ACTIVATION_FACTOR = 0.5
#: a pass that keeps its graph for a backward pass needs about 3x a forward's
#: memory (the saved activations, then the backward's own temporaries)
BACKWARD_FACTOR = 3

_OOM_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error: ``torch.OutOfMemoryError`` (CUDA), or a
    RuntimeError whose message says so (MPS "MPS backend out of memory", the CPU
    allocator's "DefaultCPUAllocator: not enough memory" / "can't allocate memory")."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


class NonFiniteOutputError(ValueError, FloatingPointError):
    """A network output (or a result computed from it) holds NaN or inf.

    A ValueError (bad values for this input) and a FloatingPointError (the
    arithmetic produced them), so callers catching either see it.

    Attributes:
        what: the output, e.g. "the UNet's noise prediction at t0=0.05".
        positions: sorted positions (in the caller's input) of the affected samples.
    """

    def __init__(self, what: str, positions):
        self.what = str(what)
        self.positions = sorted(int(p) for p in positions)
        shown = ", ".join(str(p) for p in self.positions[:8])
        more = f", ... ({len(self.positions)} in all)" if len(self.positions) > 8 else ""
        super().__init__(f"{self.what} is not finite (NaN or inf) for {len(self.positions)} sample(s) at "
                         f"position(s) {shown}{more}: the network or its weights produce non-finite values "
                         "there, so no LID/score can be computed for them")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.what, self.positions))


def check_finite(t: torch.Tensor, *, what: str, offset: int = 0, dim: int = 0, index=None) -> None:
    """Raise :class:`NonFiniteOutputError` if any sample of ``t`` (index along
    ``dim``) holds a NaN or inf; positions are reported as ``offset + index``,
    or as ``index[i]`` when ``index`` (an integer tensor with one entry per
    sample, e.g. the point each noisy copy belongs to) is given.

    Cost: one reduction over ``t`` when everything is finite (the sum of finite
    values can only overflow to inf, which then takes the exact per-sample path)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return
    if bool(torch.isfinite(t.detach().sum())):
        return
    flat = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1)
    bad = (~torch.isfinite(flat)).any(dim=1).nonzero().reshape(-1)
    if bad.numel():
        pos = torch.as_tensor(index).reshape(-1).cpu()[bad.cpu()] if index is not None else bad.cpu() + int(offset)
        raise NonFiniteOutputError(what, torch.unique(pos).tolist())


def _n_params(net) -> int:
    fn = getattr(net, "parameters", None)
    if fn is None:
        return 0
    try:
        return sum(p.numel() for p in fn())
    except TypeError:
        return 0


def _budget(device) -> int:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * CUDA_FREE_FRACTION)
    return CPU_BUDGET_BYTES


def per_sample_bytes(net, sample_shape, *, passes: int = 1, backward: bool = False) -> int:
    """The activation-memory estimate of :func:`default_batch_size` for one sample (bytes)."""
    numel = math.prod(int(s) for s in sample_shape) if len(sample_shape) else 1
    width = math.sqrt(max(_n_params(net), 1))
    dt = getattr(net, "dtype", None)
    elem = torch.empty((), dtype=dt).element_size() if isinstance(dt, torch.dtype) else 4
    est = ACTIVATION_FACTOR * numel * width * elem * max(int(passes), 1)
    if backward:
        est *= BACKWARD_FACTOR
    return max(int(est), 1)


def default_batch_size(net, sample_shape, *, passes: int = 1, backward: bool = False, device=None) -> int:
    """Samples per network call that fit the memory budget.

    Formula (bytes of activations for one sample):

        A = ACTIVATION_FACTOR (0.5) x numel(sample) x sqrt(n_params) x bytes per element
            x passes (2 under classifier-free guidance) x (BACKWARD_FACTOR = 3 with a backward pass)

    batch = max(1, budget // A), where budget is ``CUDA_FREE_FRACTION`` (0.5) of the
    free CUDA memory on a CUDA device and ``CPU_BUDGET_BYTES`` (4 GiB) elsewhere.
    sqrt(n_params) stands for the channel width (parameters grow with width^2
    at fixed depth; activations with width x pixels).

    Measured (CPU, float32, torch 2.13, diffusers 0.42; activation bytes per sample
    / (numel x sqrt(n_params) x 4)): the graph saved for backward (parameters
    excluded, counted with ``torch.autograd.graph.saved_tensors_hooks``) is 0.39 for
    a 25M-parameter UNet2DModel at 32x32 and 64x64, 1.04 / 0.99 for the SD-1.5-sized
    UNet2DConditionModel (860M) at 16x16 / 32x32 latents; the peak RSS growth of a
    whole forward + backward is 0.55-0.78 (25M UNet) and 1.57 (SD-1.5 UNet, 32x32),
    of a forward without graph 0.14-0.26 and 0.36. So 0.5 bounds a forward and
    1.5 a backward pass at these sizes. On an 80 GB GPU an SD-1.5 UNet in float16
    at 64x64 latents (512 x 512 images) gets 1.44 GB per sample with a backward
    pass: about 26 samples per chunk, 13 under CFG; on this CPU (float32, 4 GiB)
    1 sample with a backward pass, 4 without.

    Args:
        net: the network (its parameters are counted; a callable without
            parameters counts as 1).
        sample_shape: the shape of one sample in the network's space, e.g. (4, 64, 64).
        passes: network passes per sample in one call (2 under CFG).
        backward: True when a graph is kept for a backward pass.
        device: where the network runs (default: CPU budget).

    Returns:
        an int >= 1, non-increasing in the network's size, the sample size and ``passes``.
    """
    per = per_sample_bytes(net, sample_shape, passes=passes, backward=backward)
    return max(1, _budget(device) // per)


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_chunked(fn: Callable[[int, int], Any], n: int, *, batch_size: int, what: str,
                log: Callable[[str], None] | None = None) -> list:
    """Call ``fn(start, stop)`` over consecutive chunks of [0, n) of at most
    ``batch_size`` items; returns the per-chunk results in order.

    On an out-of-memory error (:func:`is_oom`) the CUDA cache is freed, the chunk
    size halved and the same chunk retried; a chunk of 1 that still runs out of
    memory re-raises the original error. Any other error propagates unchanged.
    When halving happened, one ``UserWarning`` names ``what`` and the final size
    (and ``log``, if given, is called at each halving)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = int(n)
    out = []
    size, halved, start = batch_size, False, 0
    while start < n:
        stop = min(n, start + size)
        try:
            r = fn(start, stop)
        except Exception as e:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not is_oom(e) or stop - start <= 1:
                raise
            del e
            _free_cache()
            size = max(1, (stop - start) // 2)
            halved = True
            if log is not None:
                log(f"out of memory in {what}: chunk size halved to {size}")
            continue
        out.append(r)
        start = stop
    if halved:
        warnings.warn(f"{what}: out of memory at the requested chunk size {batch_size}; ran in chunks of "
                      f"{size} (pass batch_size={size} to skip the retries)", stacklevel=2)
    return out
