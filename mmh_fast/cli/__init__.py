"""The ``mmh-fast`` command line (also ``python -m mmh_fast``)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported without a traceback, exit code 2."""


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmh-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the memorization analysis end to end on embedded data")
    d.add_argument("--out", default="mmh_demo", help="output directory (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="smaller settings (under a minute)")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"mmh-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
