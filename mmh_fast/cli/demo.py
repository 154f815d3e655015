"""``mmh-fast demo``: checks the native kernels on embedded data.

This first version exercises the Hutchinson kernel on the closed-form score of
a Gaussian on a subspace; the full memorization demo on scikit-learn's digits
replaces it as the estimators land.
"""
from __future__ import annotations

import os

import torch

from .. import backend_info, ops


def run_demo(out: str = "mmh_demo", quick: bool = False) -> None:
    os.makedirs(out, exist_ok=True)
    info = backend_info()
    print(f"mmh_fast {info['version']} (native={info['native']}, cuda={info['cuda']})")
    d, k, sigma2 = 32, 5, 0.01
    basis = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))[0]
    P = basis @ basis.T
    # Score Jacobian of N(0, P) + sigma^2 I noise: -(P/(1 + s2) + (I - P)/s2).
    J = -(P / (1 + sigma2) + (torch.eye(d, dtype=torch.float64) - P) / sigma2)
    x = torch.zeros(8, d, dtype=torch.float64)
    tr = ops.hutchinson_trace(lambda v: v @ J.T, x, n_probes=64 if quick else 512, probe="gaussian")
    lid = d + sigma2 * tr  # FLIPD at the mean: d + sigma^2 tr(grad s), |s|^2 = 0
    print(f"FLIPD of a {k}-dim Gaussian in R^{d} at its mean, per sample: {lid.numpy().round(2)}")
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(f"flipd_mean {float(lid.mean()):.4f} exact {k / (1 + sigma2) :.4f}\n")
