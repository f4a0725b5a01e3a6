"""Mutation testing of the pure functions: does a small change to one of them fail a test?

    python tests/mutation.py core       # agent.py's decisions (CI: tests/unit/test_mutation.py)
    python tests/mutation.py metrics    # lab/experiments.py's and lab/bench.py's figures
    python tests/mutation.py all        # both; -j N workers (default: the CPU count)

Each mutant changes one thing in one of the named functions (the AST, not the text):
an arithmetic operator (+ -, * /, // /), a comparison (< <=, > >=, == !=, is / is not,
in / not in), a boolean operator (and or) or one operand of it dropped (a guard removed), a
`not` removed, a number plus one, True/False swapped, a string that is a name rather than prose
(no space in it: an action, a key, an event) replaced, max/min swapped. A forked child of this
process replaces the module with the mutated one in memory (the source is never touched) and
runs the named test files with pytest -x -q; the mutant is killed when they fail (or time
out).

Every surviving mutant must be listed in tests/mutation_survivors.md with a one-line reason
(an equivalent mutant, a figure only printed, ...); the run fails on a survivor that is not
listed and on a listed one that no longer survives (the list must stay true)."""
import argparse
import ast
import importlib
import os
import re
import signal
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SURVIVORS = REPO / "tests" / "mutation_survivors.md"

DECISIONS = ["check_timing", "promote_window", "View.changed", "_age", "desired_sync_names",
             "lease_extension", "standby_heard", "decide_db", "_decide_db",
             "_decide_as_primary", "decide_grant", "paused_refusal", "decide_pause",
             "decide_resume_ack", "decide_resume", "decide_eligibility", "decide_handover",
             "decide_settle", "bootstrap_action", "newer_view"]
FIGURES = ["acked", "lost", "first_event", "count_events", "seconds_since", "longest_silence",
           "longest_gap", "median", "slowest_minute_tps", "tps_timeline", "verdict",
           "_term_unchanged", "failover_metrics", "standby_loss_metrics", "switchover_metrics",
           "jitter_metrics", "pingpong_metrics"]
SUITES = {  # name: ([(file, functions)], the test files that must kill their mutants)
    "core": ([("agent.py", DECISIONS)],
             ["tests/unit/test_decisions.py", "tests/unit/test_decision_invariants.py"]),
    "metrics": ([("lab/experiments.py", FIGURES), ("lab/bench.py", ["missed_goals", "summarize"])],
                ["tests/unit/test_experiment_metrics.py", "tests/unit/test_experiment_figures.py",
                 "tests/unit/test_bench_metrics.py", "tests/unit/test_figure_edges.py"]),
}
SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
         ast.FloorDiv: ast.Div, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
         ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot,
         ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or,
         ast.Or: ast.And}


@dataclass
class Mutant:
    file: str
    function: str
    line: int
    before: str
    after: str
    source: str  # the whole mutated file
    occurrence: int = 1

    @property
    def key(self):
        suffix = f" #{self.occurrence}" if self.occurrence > 1 else ""
        return f"{self.file}::{self.function} `{self.before}` → `{self.after}`{suffix}"


def _short(node):
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 90 else text[:87] + "..."


def _changes(node):
    """The one-step changes of a node: (a label for the change, a function that applies it to a
    copy of the node and returns the node to put in its place)."""
    if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
        yield lambda n: setattr(n, "op", SWAPS[type(n.op)]()) or n
    if isinstance(node, ast.BoolOp):
        for i in range(len(node.values)):  # drop one operand: a guard removed
            yield lambda n, i=i: (ast.BoolOp(n.op, n.values[:i] + n.values[i + 1:])
                                  if len(n.values) > 2 else n.values[1 - i])
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAPS:
                yield lambda n, i=i: n.ops.__setitem__(i, SWAPS[type(n.ops[i])]()) or n
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield lambda n: n.operand
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            yield lambda n: ast.Constant(not n.value)
        elif isinstance(value, (int, float)):
            yield lambda n: ast.Constant(n.value + 1)
        elif isinstance(value, str) and " " not in value:
            yield lambda n: ast.Constant(n.value + "XX")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id in ("max", "min"):
        yield lambda n: setattr(n.func, "id", "min" if n.func.id == "max" else "max") or n


def _functions(tree, names):
    """The named function definitions of a module ("f" or "Class.f"), with their names."""
    for top in tree.body:
        if isinstance(top, ast.FunctionDef) and top.name in names:
            yield top.name, top
        if isinstance(top, ast.ClassDef):
            for item in top.body:
                name = f"{top.name}.{item.name}" if isinstance(item, ast.FunctionDef) else None
                if name in names:
                    yield name, item


def _mutable_nodes(function):
    """The function's nodes in a fixed order, its docstring and f-strings left out (prose)."""
    skip = set()
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        skip.add(id(body[0].value))
    for node in ast.walk(function):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(n) for n in ast.walk(node))
    return [n for n in ast.walk(function) if id(n) not in skip and n is not function]


def mutants(file, names):
    """Every mutant of the named functions of `file` (a path relative to the repository)."""
    text = (REPO / file).read_text()
    lines = text.splitlines(keepends=True)
    found = []
    for name, function in _functions(ast.parse(text), names):
        nodes = _mutable_nodes(function)
        for index, node in enumerate(nodes):
            for change in _changes(node):
                tree = ast.parse(text)  # a fresh copy to change
                fresh = dict(_functions(tree, [name]))[name]
                target = _mutable_nodes(fresh)[index]
                parents = {id(c): p for p in ast.walk(fresh) for c in ast.iter_child_nodes(p)}
                show = _context(target, parents)
                before = show(target)
                replacement = change(target)
                if replacement is not target:
                    _replace(parents[id(target)], target, replacement)
                after = show(replacement)
                ast.fix_missing_locations(fresh)
                indent = " " * fresh.col_offset
                start = (fresh.decorator_list[0].lineno if fresh.decorator_list
                         else fresh.lineno) - 1
                new = "".join(indent + line + "\n" for line in ast.unparse(fresh).splitlines())
                source = "".join(lines[:start]) + new + "".join(lines[fresh.end_lineno:])
                found.append(Mutant(file, name, node.lineno, before, after, source))
    seen = {}
    for m in found:  # the same change twice in one function: number them
        seen[(m.function, m.before, m.after)] = m.occurrence = \
            seen.get((m.function, m.before, m.after), 0) + 1
    return found


def _context(node, parents):
    """How to show a change of `node`: the node itself, or for a constant or a call its parent
    (a constant means little alone) -- for an entry of a dict literal, that entry alone."""
    parent = parents.get(id(node))
    if isinstance(parent, ast.Dict):
        i = next(i for i, (k, v) in enumerate(zip(parent.keys, parent.values))
                 if node is k or node is v)
        return lambda _: _short(parent.keys[i]) + ": " + _short(parent.values[i])
    if isinstance(node, (ast.Constant, ast.Call)) and parent is not None:
        return lambda _: _short(parent)
    return _short


def _replace(parent, old, new):
    for field, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, field, new)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    value[i] = new


def _child(m, tests):
    """In a forked process: the mutated module replaces the real one, then pytest runs."""
    name = m.file[:-3].replace("/", ".")
    module = types.ModuleType(name)
    module.__file__ = str(REPO / m.file)
    sys.modules[name] = module
    if "." in name:
        package, leaf = name.rsplit(".", 1)
        setattr(importlib.import_module(package), leaf, module)
    exec(compile(m.source, module.__file__, "exec"), module.__dict__)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    return pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                        *[str(REPO / t) for t in tests]])


def run_all(todo, tests, jobs, timeout):
    """{mutant key: True when the tests passed}. Each mutant runs in a child forked from this
    process (pytest and hypothesis are imported once); a child past `timeout` is killed and
    counts as a failure (killed)."""
    passed, running, todo = {}, {}, list(todo)
    while todo or running:
        while todo and len(running) < jobs:
            m = todo.pop(0)
            pid = os.fork()
            if pid == 0:  # the child
                try:
                    code = _child(m, tests)
                except BaseException:  # noqa: BLE001 -- the child exits, whatever happened
                    code = 3
                os._exit(int(code))
            running[pid] = (m, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            m, _ = running.pop(pid)
            passed[m.key] = os.waitstatus_to_exitcode(status) == 0
            continue
        for pid, (_, since) in list(running.items()):
            if time.monotonic() - since > timeout:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    return passed


def listed_survivors():
    """The keys listed in tests/mutation_survivors.md: `- <key> — <reason>` lines."""
    keys = set()
    for line in SURVIVORS.read_text().splitlines():
        match = re.match(r"- (.+?) — \S", line)
        if match:
            keys.add(match.group(1))
    return keys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=[*SUITES, "all"])
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    for heavy in ("hypothesis", "psycopg2"):  # imported once, here, for every child
        importlib.import_module(heavy)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    listed, survivors, failed = listed_survivors(), [], False
    for suite in suites:
        targets, tests = SUITES[suite]
        started = time.monotonic()
        originals = [Mutant(file, "-", 0, "-", "-", (REPO / file).read_text())
                     for file, _ in targets]
        if not all(run_all(originals[:1], tests, 1, timeout=600).values()):
            print(f"{suite}: the tests fail without any mutant: {' '.join(tests)}")
            return 2
        timeout = max(30.0, 5 * (time.monotonic() - started))
        todo = [m for file, names in targets for m in mutants(file, names)]
        passed = run_all(todo, tests, args.jobs, timeout)
        lived = [m for m in todo if passed[m.key]]
        survivors += lived
        print(f"{suite}: {len(todo) - len(lived)} of {len(todo)} mutants killed "
              f"({100 * (len(todo) - len(lived)) / max(1, len(todo)):.1f} %), "
              f"{len(lived)} survived, in {time.monotonic() - started:.0f} s", flush=True)
    keys = {m.key for m in survivors}
    for m in survivors:
        if m.key not in listed:
            failed = True
            print(f"NOT LISTED (kill it with a test, or list it with a reason): line {m.line}\n"
                  f"- {m.key} — ")
    files = {file for suite in suites for file, _ in SUITES[suite][0]}
    for key in sorted(listed - keys):
        if key.split("::")[0] in files:
            failed = True
            print(f"LISTED BUT KILLED OR GONE (remove it from {SURVIVORS.name}): {key}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
