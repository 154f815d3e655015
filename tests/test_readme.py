"""The README cannot rot: its ```python blocks run as written (each in a fresh
namespace, in a temporary working directory), and the `make` targets and
`mmh-fast` options its shell blocks name exist. A block preceded by the
comment `<!-- no-test -->` is skipped (e.g. loading real Stable Diffusion
weights, which cannot exist on a test machine)."""
from __future__ import annotations

import os
import re
import shlex
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
NO_TEST = "<!-- no-test -->"

_FENCE = re.compile(r"^```(\S*)\s*$")


def _blocks(path=README):
    """[(language, first line number (1-based) of the code, code, skipped)] of every fenced block."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i + 1
        j = start
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"README.md:{i + 1}: unclosed code fence")
        prev = next((lines[p].strip() for p in range(i - 1, -1, -1) if lines[p].strip()), "")
        out.append((lang, start + 1, "\n".join(lines[start:j]) + "\n", prev == NO_TEST))
        i = j + 1
    return out


BLOCKS = _blocks()
PYTHON = [(line, code, skipped) for lang, line, code, skipped in BLOCKS if lang == "python"]
SHELL = [(line, code) for lang, line, code, _ in BLOCKS if lang in ("bash", "sh", "shell", "console")]


def test_readme_opens_with_the_two_commands():
    """Issue 2: the README's first code block is `make demo` then `make test`."""
    lang, _, code, _ = BLOCKS[0]
    cmds = [ln.split("#")[0].strip() for ln in code.splitlines() if ln.split("#")[0].strip()]
    assert lang == "bash" and cmds == ["make demo", "make test"], code


def test_there_are_runnable_python_blocks():
    assert sum(not s for _, _, s in PYTHON) >= 10
    assert any(s for _, _, s in PYTHON), "the real Stable Diffusion example is expected to be marked no-test"


@pytest.mark.parametrize("line,code,skipped", PYTHON, ids=[f"README.md:{ln}" for ln, _, _ in PYTHON])
def test_python_block_runs(line, code, skipped, tmp_path, monkeypatch):
    if skipped:
        pytest.skip("marked <!-- no-test -->")
    monkeypatch.chdir(tmp_path)  # blocks may write files (key tables, ...)
    compiled = compile(code, f"README.md:{line}", "exec")
    namespace = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the blocks' output is for readers; failures are what count
        exec(compiled, namespace)


# --------------------------------------------------------------------------- shell blocks
def _shell_commands():
    """Each logical command line of the shell blocks (continuations joined), comments removed."""
    out = []
    for line, code in SHELL:
        joined = code.replace("\\\n", " ")
        for ln in joined.splitlines():
            ln = ln.split(" #")[0].strip()
            if ln and not ln.startswith("#"):
                out.append((line, ln))
    return out


def _make_targets():
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        text = f.read()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.M))


def test_make_targets_named_in_the_readme_exist():
    targets = _make_targets()
    named = set()
    for line, cmd in _shell_commands():
        words = shlex.split(cmd)
        if words and words[0] == "make":
            named.update((line, w) for w in words[1:] if "=" not in w and not w.startswith("-"))
    assert named, "the README names make targets"
    missing = sorted((ln, t) for ln, t in named if t not in targets)
    assert not missing, f"make targets not in the Makefile: {missing}"


def _subparsers():
    import argparse

    from mmh_fast.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_mmh_fast_commands_and_options_in_the_readme_exist():
    subs = _subparsers()
    checked = 0
    text = open(README, encoding="utf-8").read()
    # options in the shell blocks and in inline `mmh-fast <cmd> ...` spans of the prose
    spans = [(ln, cmd) for ln, cmd in _shell_commands()]
    spans += [(0, s) for s in re.findall(r"`(mmh-fast [^`]+)`", text)]
    for line, cmd in spans:
        words = cmd.split()
        for i, w in enumerate(words):
            if w == "mmh-fast" or (w == "mmh_fast" and i > 0 and words[i - 1] == "-m"):
                if i + 1 >= len(words) or words[i + 1].startswith("-"):
                    continue
                sub = words[i + 1]
                assert sub in subs, f"README.md:{line}: unknown command {sub!r} in {cmd!r}"
                known = {s for a in subs[sub]._actions for s in a.option_strings}
                for opt in words[i + 2:]:
                    if opt.startswith("--"):
                        name = opt.split("=")[0].rstrip(",.;:)")
                        assert name in known, f"README.md:{line}: `mmh-fast {sub}` has no option {name}"
                        checked += 1
    assert checked >= 10


def test_scan_metrics_table_matches_the_registry():
    from mmh_fast.cli.metrics import available_metrics

    text = open(README, encoding="utf-8").read()
    section = text.split("### `mmh-fast scan`", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)
    assert sorted(rows) == sorted(available_metrics())
