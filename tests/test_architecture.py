"""The shape of the package: no import cycles, no package-internal imports hidden in functions, the loop short
enough to read top to bottom, torch.distributed touched by one module."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "protoclr"
MODULES = sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__")


def _internal(node: ast.AST) -> list[str]:
    """The protoclr modules an import statement names."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "protoclr":
        parts = node.module.split(".")
        return [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("protoclr.")]
    return []


def _top_level_imports(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # annotations only, never executed
        out.update(_internal(node))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: _top_level_imports(ast.parse((SRC / f"{m}.py").read_text())) & set(MODULES) for m in MODULES}


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append([*path[path.index(d):], d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"
    assert "train" in graph["sweep"] and "sweep" not in graph["train"]  # the graph is read, not empty


def test_no_package_import_inside_a_function():
    hidden = []
    for m in MODULES:
        tree = ast.parse((SRC / f"{m}.py").read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{m}.{fn.name} imports {d}" for node in ast.walk(fn) for d in _internal(node)]
    assert not hidden, hidden


def test_pretrain_fits_on_a_page_and_one_module_touches_torch_distributed():
    tree = ast.parse((SRC / "train.py").read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "pretrain"]
    assert fn.end_lineno - fn.lineno + 1 <= 160
    users = [m for m in MODULES if "torch.distributed" in (SRC / f"{m}.py").read_text()]
    assert users == ["distributed"], users


# STYLE.md: a loop body nests at most about four levels. A level is a compound statement (if/elif chain, for,
# while, with, try, match, a nested def or class); the step lives in a function of its own when it needs more.
COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match, ast.FunctionDef,
            ast.AsyncFunctionDef, ast.ClassDef)
MAX_DEPTH = 4


def _depth(stmts: list[ast.stmt]) -> int:
    """The deepest nesting of compound statements in a statement list (no compound statement: 0); an ``elif``
    is a level of its ``if``, not one more."""
    best = 0
    for node in stmts:
        if not isinstance(node, COMPOUND):
            continue
        orelse = getattr(node, "orelse", [])
        is_elif = isinstance(node, ast.If) and len(orelse) == 1 and isinstance(orelse[0], ast.If)
        blocks = [node.body, getattr(node, "finalbody", []), *(h.body for h in getattr(node, "handlers", [])),
                  *(c.body for c in getattr(node, "cases", [])), [] if is_elif else orelse]
        best = max(best, 1 + max(map(_depth, blocks)), _depth(orelse) if is_elif else 0)
    return best


def test_depth_counts_compound_statements():
    code = textwrap.dedent("""
        try:
            for a in b:
                if c:
                    pass
                elif d:
                    while e:
                        pass
        except E:
            pass
        """)
    assert _depth(ast.parse(code).body) == 4
    assert _depth(ast.parse("x = 1\ndef f():\n    with g:\n        return 2\n").body) == 2


def test_the_training_loop_nests_at_most_four_levels():
    """pretrain's body and every function of train.py (the step it calls included) nest at most MAX_DEPTH levels."""
    tree = ast.parse((SRC / "train.py").read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    deep = {fn.name: _depth(fn.body) for fn in functions if _depth(fn.body) > MAX_DEPTH}
    assert not deep, f"nesting deeper than {MAX_DEPTH} levels: {deep}"
    assert "pretrain" in {fn.name for fn in functions}


# A metric key is built in protoclr.measure only (STYLE.md: one owner per metric-key set, a key's name says its
# protocol): no other module spells a key's prefix, suffix or name; tests and docs may.
METRIC_KEY_SPELLINGS = ('"eval_', "'eval_", '"diag_', "'diag_", '"knn_top1"', "'knn_top1'", '"probe_top1"',
                        "'probe_top1'", '_last_good"', "_last_good'")


def test_metric_keys_are_spelled_in_measure_only():
    spelled = [f"{m}.py:{i}: {s}" for m in MODULES if m != "measure"
               for i, line in enumerate((SRC / f"{m}.py").read_text().splitlines(), 1)
               for s in METRIC_KEY_SPELLINGS if s in line]
    assert not spelled, spelled
    assert any(s in (SRC / "measure.py").read_text() for s in METRIC_KEY_SPELLINGS)  # the rule reads the owner


# The run folder's layout belongs to protoclr.runs (RunDir, and the results database's file name): no other module
# spells a run file's name in code (a string literal equal to it or ending in "/<name>"); docstrings, help and
# messages that mention a file by name are prose, not paths.
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "meta.json", "config.yaml", "runs.db")


def _spelled_run_files(module: str) -> list[str]:
    tree = ast.parse((SRC / f"{module}.py").read_text())
    return [f"{module}.py:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            for name in RUN_FILES if node.value == name or node.value.endswith("/" + name)]


def test_run_file_names_are_spelled_in_runs_only():
    spelled = [s for m in MODULES if m != "runs" for s in _spelled_run_files(m)]
    assert not spelled, spelled
    assert len(_spelled_run_files("runs")) == len(RUN_FILES)  # the rule reads the owner, each name once
