"""Networks that misbehave on purpose: out of memory above a batch size, NaN or
huge outputs on chosen rows. Shared by the batching tests of the estimators."""
import torch


class OOMAbove(torch.nn.Module):
    """Wraps a network; raises torch.OutOfMemoryError (as CUDA does) when called
    on more than ``limit`` rows, and records the row counts it ran."""

    def __init__(self, net, limit: int):
        super().__init__()
        self.net, self.limit, self.calls = net, int(limit), []

    def forward(self, x, t, **kw):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} rows (fake)")
        self.calls.append(int(x.shape[0]))
        return self.net(x, t, **kw)


class CorruptRows(torch.nn.Module):
    """Wraps a network; rows whose input mean exceeds ``above`` get their output
    replaced by ``value`` (NaN) or multiplied by ``scale`` (overflow)."""

    def __init__(self, net, *, above: float = 0.0, value: float | None = float("nan"), scale: float | None = None):
        super().__init__()
        self.net, self.above, self.value, self.scale = net, above, value, scale

    def forward(self, x, t, **kw):
        out = self.net(x, t, **kw)
        out = out.sample if hasattr(out, "sample") else out
        hit = (x.reshape(x.shape[0], -1).mean(1) > self.above).reshape(-1, *[1] * (x.dim() - 1))
        if self.scale is not None:
            return torch.where(hit, out * self.scale, out)
        return torch.where(hit, torch.full_like(out, self.value), out)
