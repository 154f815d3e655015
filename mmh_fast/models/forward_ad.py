"""Making diffusers networks usable under forward-mode AD (torch.func.jvp).

Two things break forward AD in diffusers UNets on a CPU torch (NOTES, measured):
the fused scaled-dot-product-attention kernels have no forward-AD formula, and
group_norm's forward-AD formula views its tangent, which fails when the
tangent arriving from an attention block is not contiguous. Inside
:func:`forward_ad_safe` attention runs on the math SDPA backend and every
GroupNorm input is made contiguous (primal and tangent) by a temporary
pre-hook; outside it the model is untouched.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["forward_ad_safe"]


def _contiguous_input(module, args):
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(memory_format=torch.contiguous_format),) + tuple(args[1:])
    return None


@contextlib.contextmanager
def forward_ad_safe(model):
    """Context in which ``model`` (a torch module or any callable) can be
    differentiated with torch.func.jvp where torch has the formulas."""
    hooks = []
    if isinstance(model, torch.nn.Module):
        hooks = [m.register_forward_pre_hook(_contiguous_input) for m in model.modules()
                 if isinstance(m, torch.nn.GroupNorm)]
    try:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ctx = sdpa_kernel(SDPBackend.MATH)
        except ImportError:  # older torch: no backend selection, nothing to force
            ctx = contextlib.nullcontext()
        with ctx:
            yield
    finally:
        for h in hooks:
            h.remove()
