"""Small building blocks shared by several test modules."""
import torch


class DoubleWithoutForwardAD(torch.autograd.Function):
    """x -> 2x with a backward rule but no forward-mode (jvp) rule: a stand-in
    for the operations that break torch.func.jvp inside real networks."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad
