"""``mmh-fast lab``: build (or reuse) the memorization lab, verify its ground
truth by generation and measure every detector on it (mmh_fast.lab)."""
from __future__ import annotations

import argparse


def add_lab_parser(sub) -> None:
    from . import _positive_int  # the parser's own check, as every other command's counts

    p = sub.add_parser(
        "lab", help="build the memorization lab and measure every detector on it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train (or reuse) a small diffusers StableDiffusionPipeline on scikit-learn's digits with\n"
        "planted DD-Mem and OD-Mem (mmh_fast.lab.build), verify which prompts really copy a training\n"
        "image by generating from them (calibrated l2 < 1/3), then measure the detectors, the token\n"
        "attributions and the mitigations against that verified label. Writes DIR/lab.json, Parquet\n"
        "tables, DIR/report.md and DIR/report.html (figures as PNG). A rerun resumes: finished sections\n"
        "with the same settings are read back from DIR/lab.json (--fresh measures them again).")
    p.add_argument("--out", required=True, metavar="DIR", help="the lab directory (reused when it exists)")
    p.add_argument("--quick", action="store_true", help="the small lab the tests use")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the stream (default: 0)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads for training (default: 1; more threads than free cores is slower)")
    for name, what in (("detection", "detection (every planted prompt kept, the others evenly spaced)"),
                       ("attribution", "attribution (memorized trigger prompts)"),
                       ("mitigation", "mitigation (verified-memorized prompts)")):
        p.add_argument(f"--max-{name}", type=_positive_int, metavar="N",
                       help=f"at most N prompts in the {what}; default: all")
    p.add_argument("--no-partial", action="store_true",
                   help="skip the partial-copy variant (trained in DIR/partial: the memorization maps' "
                   "localisation against pasted regions)")
    p.add_argument("--no-keyed", action="store_true",
                   help="skip the keyed (SolidMark) variant (mmh_fast.lab.keyed, trained in DIR/keyed at the "
                   "lab's size)")
    p.add_argument("--fresh", action="store_true",
                   help="measure every section again (default: a rerun on the same built lab reuses the finished "
                   "sections of DIR/lab.json whose settings match, so an interrupted run resumes)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_lab)


def _cmd_lab(args) -> int:
    from ..lab.run import run_lab

    run_lab(args.out, size="quick" if args.quick else "full", seed=args.seed, threads=args.threads,
            progress=not args.quiet, max_detection=args.max_detection, max_attribution=args.max_attribution,
            max_mitigation=args.max_mitigation, partial=not args.no_partial,
            keyed=not args.no_keyed, fresh=args.fresh)
    return 0
