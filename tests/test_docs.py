"""Docs that run: every repository path and every ``protoclr ...`` / ``python ...`` command line that README.md,
docs/, examples/, the benchmarks' docstrings and the config headers show a user exists and parses.

A command is parsed by the argparse parser its own code builds (``ArgumentParser.parse_args`` is intercepted the
moment the command or script calls it, so nothing runs), then: ``--config`` and ``key=value`` overrides go through
``protoclr.config.load_config``; a sweep file through ``protoclr.sweep.build_sweep`` and ``expand`` (its grid,
``--grid`` and ``--set`` validated); ``protoclr views`` names a known dataset, preset and modifiers. A synopsis
(``[--knn]``, ``a|b``, ``...``, placeholders such as ``RUN_DIR``, ``N``, ``<copy>``, ``$images``) is checked for its
flags and literal choices only. Paths under runs/ and data/ (made by the commands) and URLs are not paths here.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from protoclr.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
TOP = ("configs", "docs", "examples", "benchmarks", "src", "tests")
PATH_RE = re.compile(rf"(?<![\w./-])((?:\.\./)*(?:{'|'.join(TOP)})/[\w./*-]*[\w*/])")
CMD_RE = re.compile(rf"(?<![\w./-])(?:(?:\.venv/bin/)?python3? (?!-m )\S+\.py"
                    rf"|protoclr (?:{'|'.join(COMMANDS)})(?![\w:]))")  # not "protoclr demo: ..." (its output)
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
# in a synopsis: a one-letter or OVERRIDES-like value, "key=value", "KEY=V1,V2", "..."; other placeholders (RUN_DIR,
# <copy>, "$images") stand where any string parses, so those commands are checked in full
SYNOPSIS_RE = re.compile(r"^[A-Z](?:\.[a-z]+)?$|^OVERRIDES$|^key=value$|^KEY=|\.\.|^\[|\]$|\|")


def doc_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "examples").iterdir()),
             *sorted((REPO / "benchmarks").glob("*.py")), *sorted((REPO / "configs").rglob("*.yaml"))]
    return [f for f in files if f.name != "report.md"]  # docs/results/*/report.md is protoclr report's output


@dataclass
class Snippet:
    where: str  # file:line
    text: str  # the command, as shown (comments and trailing prose cut)


def _documentation_text(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, is_code) pieces of the file a reader sees as documentation: markdown prose (with inline
    code spans) and fenced code lines; a script's docstring and comments; a config's comment lines."""
    lines = path.read_text().splitlines()
    if path.suffix == ".md":
        out, fenced = [], False
        for i, line in enumerate(lines, 1):
            if line.startswith("```"):
                fenced = not fenced
                continue
            out.append((i, line, fenced))
        return out
    if path.suffix == ".yaml":
        return [(i, line.lstrip("# "), True) for i, line in enumerate(lines, 1) if line.startswith("#")]
    if path.suffix == ".sh":  # comments and the commands themselves
        return [(i, line.lstrip("# "), True) for i, line in enumerate(lines, 1)]
    doc = path.read_text().split('"""')[1] if '"""' in path.read_text() else ""  # a script's module docstring
    first = path.read_text().split('"""')[0].count("\n") + 1
    return [(first + i, line.replace("\\\\", "\\"), True) for i, line in enumerate(doc.splitlines())]


def _cut(cmd: str) -> str:
    """A command without what follows it on its line: a comment, a parenthesized remark, the prose after ' / '."""
    for stop in ("  #", " # ", "  (", " / ", "; ", " ;;", "`"):
        cmd = cmd.split(stop)[0]
    if cmd.count(")") > cmd.count("("):  # "(check first: protoclr pretrain ... --dry-run)"
        cmd = cmd[: cmd.index(")")]
    return cmd.strip().rstrip(".,:")


def snippets() -> list[Snippet]:
    found = []
    for path in doc_files():
        rel = path.relative_to(REPO)
        pieces = _documentation_text(path)
        # code lines, with their backslash continuations joined
        k = 0
        while k < len(pieces):
            i, line, code = pieces[k]
            while code and line.rstrip().endswith("\\") and k + 1 < len(pieces):
                k += 1
                line = line.rstrip()[:-1] + " " + pieces[k][1].strip()
            if code:
                for m in CMD_RE.finditer(line):
                    if line[m.end():m.end() + 1] == "`":  # ``protoclr export`` names the command in prose
                        continue
                    found.append(Snippet(f"{rel}:{i}", _cut(line[m.start():])))
            k += 1
        # inline code spans of prose, which may wrap across lines
        prose = "\n".join(f"\x00{i}\x00{line}" for i, line, code in pieces if not code)
        for span in re.finditer(r"`([^`]+)`", prose):
            text = re.sub(r"\x00\d+\x00", "", span.group(1)).replace("\n", " ")
            line_no = re.findall(r"\x00(\d+)\x00", prose[: span.start()])[-1]
            m = CMD_RE.match(text)
            if m and text.strip() != m.group(0):  # `protoclr export` alone names the command; it is not a call
                found.append(Snippet(f"{rel}:{line_no}", _cut(text)))
    return found


def doc_paths() -> list[tuple[str, str]]:
    """(file:line, path relative to the repository root) of every repository path and relative link."""
    found = []
    for path in doc_files():
        rel = path.relative_to(REPO)
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in LINK_RE.finditer(line):
                target = m.group(1).split("#")[0]
                if target and "://" not in target and not target.startswith("mailto:"):
                    found.append((f"{rel}:{i}", str((path.parent / target).resolve().relative_to(REPO))))
            for m in PATH_RE.finditer(line):
                p = m.group(1)
                if "<" in line[m.end():m.end() + 1] or "://" in line[max(0, m.start() - 12):m.start()]:
                    continue  # configs/<name>.yaml, or part of a URL
                if p.startswith("../"):
                    continue  # beside the repository (a dataset copy, a worktree)
                found.append((f"{rel}:{i}", p))
    return found


class _Reached(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


@contextlib.contextmanager
def _intercept_parse_args(monkeypatch):
    """The first ``parse_args`` a command calls raises ``_Reached(parser)`` instead of parsing."""

    def reached(self, args=None, namespace=None):
        raise _Reached(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", reached)
        yield


def command_parser(words: list[str], monkeypatch) -> argparse.ArgumentParser:
    """The parser the command ``words`` builds, without running the command."""
    with _intercept_parse_args(monkeypatch), pytest.raises(_Reached) as reached:
        if words[0] == "protoclr":
            module, func, _ = COMMANDS[words[1]]
            getattr(importlib.import_module(module), func)([])
        else:
            script = REPO / words[1]
            monkeypatch.setattr(sys, "argv", [str(script)])
            monkeypatch.syspath_prepend(str(script.parent))
            runpy.run_path(str(script), run_name="__main__")
    return reached.value.parser


def _words(cmd: str) -> list[str]:
    cmd = re.sub(r"<[^>]*>", "<placeholder>", cmd)  # "<the grid's --out>" is one placeholder, not a flag
    words = shlex.split(cmd)
    if words[0].startswith((".venv/bin/python", "python")):
        words[0] = "python"
    return [w for w in words if w != "$@"]


def _is_synopsis(args: list[str]) -> bool:
    return any(SYNOPSIS_RE.search(a) for a in args)


def check_synopsis(parser: argparse.ArgumentParser, args: list[str]) -> None:
    """Every flag of a synopsis exists; a literal value after a flag with choices is one of them."""
    actions = parser._option_string_actions
    for k, a in enumerate(args):
        flag = a.strip("[]").split("=")[0]
        if not flag.startswith("--"):
            continue
        assert flag in actions, f"{flag} is not an option of {parser.prog}"
        choices = actions[flag].choices
        if choices and k + 1 < len(args):
            for value in args[k + 1].strip("[]").split("|"):  # "cached|augmented]": each alternative
                if not _is_synopsis([value]):
                    assert value in choices, f"{flag} {value}: not one of {sorted(choices)}"


def check_full(words: list[str], parser: argparse.ArgumentParser) -> None:
    from protoclr.config import load_config

    err = io.StringIO()
    parser.allow_abbrev = False  # a doc spells every flag in full: "--worker" must not pass as "--workers"
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(words[2:])
    except SystemExit:
        pytest.fail(f"{parser.prog} rejects {' '.join(words[2:])!r}: {err.getvalue().strip().splitlines()[-1]}")
    if words[:2] == ["protoclr", "sweep"] and ns.config:
        from protoclr.sweep import build_sweep, expand

        assert expand(build_sweep(ns), extra=ns.set)
    elif words[:2] == ["protoclr", "views"]:
        from protoclr import data, views

        assert ns.dataset in data.DATASETS and ns.preset in views.PRESETS
        assert set(ns.modifier) <= set(views.MODIFIERS), ns.modifier
    elif getattr(ns, "overrides", None) is not None and hasattr(ns, "config"):
        load_config(ns.config, ns.overrides)


SNIPPETS = snippets()


def test_the_docs_show_the_commands_this_test_reads():
    # a scan that silently finds nothing would pass whatever the docs say
    where = {s.where.split(":")[0] for s in SNIPPETS}
    assert {"README.md", "docs/training.md", "docs/experiments.md", "configs/cpu/balance.yaml",
            "examples/train_image_folder.sh", "benchmarks/time_to_accuracy.py"} <= where
    assert len(SNIPPETS) > 60


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.where for s in SNIPPETS])
def test_documented_command_parses(snippet, monkeypatch):
    words = _words(snippet.text)
    if words[0] == "python":
        assert (REPO / words[1]).is_file(), f"{snippet.where}: {words[1]} does not exist"
        words = ["python", *words[1:]]
    parser = command_parser(words, monkeypatch)
    if _is_synopsis(words[2:]):
        check_synopsis(parser, words[2:])
    else:
        check_full(words, parser)


@pytest.mark.parametrize("where,path", doc_paths(), ids=[f"{w}:{p}" for w, p in doc_paths()])
def test_documented_path_exists(where, path):
    matches = list(REPO.glob(path)) if "*" in path else [REPO / path]
    assert matches and all(m.exists() for m in matches), f"{where} names {path}, which does not exist"
