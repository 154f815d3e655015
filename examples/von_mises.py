"""The MMH paper's von Mises experiment (Sec. 4.1, Fig. 4), on a CPU.

100 training points in R^2 from a mixture of a von Mises distribution on the
unit circle (LID_* = 1) and a point mass at the origin (LID_* = 0); one of the
circle points sits alone in the low-density region opposite the mode (in the
paper it got there by chance; here it is placed there so that the run is
reproducible). A small MLP diffusion model is trained on them, samples are drawn
by DDIM, and FLIPD estimates LID_theta of every sample:

- copies of the origin: FLIPD ~ 0 = LID_* (DD-Mem: the data itself is 0-dimensional);
- samples along the circle: FLIPD ~ 1 = LID_*;
- copies of the isolated training point: FLIPD ~ 0 < LID_* = 1 (OD-Mem: the model
  overfits there).

Run: ``python examples/von_mises.py [--steps N] [--out von_mises.png]``
(about a minute or two on two CPU cores).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import mmh_fast
from mmh_fast.models.sampling import ddim_sample
from mmh_fast.models.training import MLPDenoiser, train_denoiser

ORIGIN, CIRCLE, ISOLATED, OTHER = 0, 1, 2, 3
NAMES = {ORIGIN: "origin copies", CIRCLE: "circle", ISOLATED: "isolated-point copies", OTHER: "other"}


def make_data(n: int = 100, *, weight_origin: float = 0.2, kappa: float = 4.0, mu: float = math.pi / 2,
              seed: int = 0):
    """(points [n, 2] float32, labels [n] with ORIGIN / CIRCLE / ISOLATED, the isolated point [2])."""
    rng = np.random.default_rng(seed)
    m = n - 1
    origin = rng.random(m) < weight_origin
    theta = rng.vonmises(mu, kappa, size=m)
    pts = np.stack([np.cos(theta), np.sin(theta)], 1) * (~origin)[:, None]
    iso = np.array([math.cos(mu + math.pi), math.sin(mu + math.pi)])
    X = np.concatenate([pts, iso[None]]).astype(np.float32)
    labels = np.concatenate([np.where(origin, ORIGIN, CIRCLE), [ISOLATED]])
    return torch.from_numpy(X), torch.from_numpy(labels), torch.from_numpy(iso.astype(np.float32))


def classify(x: torch.Tensor, iso: torch.Tensor, tol: float = 0.1) -> torch.Tensor:
    """Label generated points: near the origin, near the isolated training point,
    on the circle elsewhere, or other."""
    r = x.norm(dim=1)
    lab = torch.full((x.shape[0],), OTHER, dtype=torch.long)
    lab[(r - 1).abs() < tol] = CIRCLE
    lab[(x - iso).norm(dim=1) < 2 * tol] = ISOLATED
    lab[r < tol] = ORIGIN
    return lab


def run(*, steps: int = 2500, lr: float = 2e-3, n_samples: int = 300, t0: float = 0.05, seed: int = 0,
        num_steps: int = 100, verbose: bool = True):
    """Train, sample, estimate. Returns a dict with the data, the model, the samples,
    their FLIPD values and labels, and FLIPD at the training points.

    The recipe: a residual MLP with 32 random Fourier features of the input (a small
    MLP alone needs many more steps to learn the sharp point masses), training times
    drawn with more weight near 0 (t = u^2), DDPM's linear-beta schedule, FLIPD at
    t0 = 0.05 (the paper's default) with the exact trace (d = 2)."""
    from diffusers import DDPMScheduler

    X, labels, iso = make_data(seed=seed)
    sched = DDPMScheduler()
    torch.manual_seed(seed)
    model = MLPDenoiser((2,), hidden=128, depth=3, fourier=32, fourier_scale=1.0, seed=seed)
    t = time.time()
    losses = train_denoiser(model, X, scheduler=sched, steps=steps, batch_size=512, lr=lr, t_power=2.0, seed=seed)
    train_s = time.time() - t
    samples = ddim_sample(model, n_samples, sample_shape=(2,), scheduler=sched, num_steps=num_steps, seed=seed)
    lid = mmh_fast.flipd(model, samples, t0, scheduler=sched)
    lid_train = mmh_fast.flipd(model, X, t0, scheduler=sched)
    lab = classify(samples, iso)
    if verbose:
        print(f"trained {steps} steps in {train_s:.1f} s (final loss {np.mean(losses[-100:]):.3f})")
        for k in (ORIGIN, CIRCLE, ISOLATED, OTHER):
            sel = lab == k
            if sel.any():
                print(f"  {NAMES[k]:>22}: {int(sel.sum()):4d} samples, FLIPD median {float(lid[sel].median()):+.2f}")
        for k in (ORIGIN, CIRCLE, ISOLATED):
            sel = labels == k
            print(f"  training {NAMES[k]:>13}: FLIPD median {float(lid_train[sel].median()):+.2f}")
    return dict(data=X, labels=labels, isolated=iso, model=model, samples=samples, flipd=lid, sample_labels=lab,
                flipd_train=lid_train, losses=losses, train_seconds=train_s, scheduler=sched)


def plot(result, path: str) -> None:
    """Fig. 4 style: ground truth (top) and samples coloured by FLIPD (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, lab = result["data"].numpy(), result["labels"].numpy()
    S, lid = result["samples"].numpy(), result["flipd"].numpy()
    fig, ax = plt.subplots(1, 2, figsize=(10, 5.4))
    th = np.linspace(0, 2 * np.pi, 400)
    for a in ax:
        a.plot(np.cos(th), np.sin(th), color="0.85", lw=1, zorder=0)
        a.set_aspect("equal")
        a.set_xlim(-1.4, 1.4)
        a.set_ylim(-1.4, 1.4)
    ax[0].scatter(X[lab == CIRCLE, 0], X[lab == CIRCLE, 1], s=14, c="tab:blue", label="von Mises (LID* = 1)")
    ax[0].scatter(X[lab == ORIGIN, 0], X[lab == ORIGIN, 1], s=60, c="tab:red", marker="x",
                  label=f"point mass, {int((lab == ORIGIN).sum())} copies (LID* = 0)")
    ax[0].scatter(X[lab == ISOLATED, 0], X[lab == ISOLATED, 1], s=60, c="tab:green", marker="*",
                  label="isolated training point")
    ax[0].legend(loc="upper left", bbox_to_anchor=(0.0, -0.08), fontsize=8, ncol=1)
    ax[0].set_title("training data")
    sc = ax[1].scatter(S[:, 0], S[:, 1], c=np.clip(lid, -0.5, 2.0), cmap="viridis", s=16, vmin=-0.5, vmax=2.0)
    fig.colorbar(sc, ax=ax[1], label="FLIPD (LID estimate)")
    ax[1].set_title(f"{len(S)} generated samples coloured by FLIPD")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--t0", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="von_mises.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a tiny MLP: threads only add overhead
    res = run(steps=args.steps, n_samples=args.samples, t0=args.t0, seed=args.seed)
    plot(res, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
