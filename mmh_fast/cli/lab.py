"""``mmh-fast lab``: build (or reuse) the memorization lab, verify its ground
truth by generation and measure every detector on it (mmh_fast.lab)."""
from __future__ import annotations

import argparse


def add_lab_parser(sub) -> None:
    p = sub.add_parser(
        "lab", help="build the memorization lab and measure every detector on it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train (or reuse) a small diffusers StableDiffusionPipeline on scikit-learn's digits with\n"
        "planted DD-Mem and OD-Mem (mmh_fast.lab.build), verify which prompts really copy a training\n"
        "image by generating from them (calibrated l2 < 1/3), then measure the detectors, the token\n"
        "attributions and the mitigations against that verified label. Writes DIR/lab.json, Parquet\n"
        "tables, DIR/report.md and DIR/report.html (figures as PNG).")
    p.add_argument("--out", required=True, metavar="DIR", help="the lab directory (reused when it exists)")
    p.add_argument("--quick", action="store_true", help="the small lab the tests use")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the stream (default: 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for training (default: 1; more threads than free cores is slower)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_lab)


def _cmd_lab(args) -> int:
    from ..lab.run import run_lab
    from .errors import UserError

    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    run_lab(args.out, size="quick" if args.quick else "full", seed=args.seed, threads=args.threads,
            progress=not args.quiet)
    return 0
