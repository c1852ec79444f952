"""Course assignments (minitorch style): a student copy with the key formulas blanked out, hints, and a grader.

The tasks are FIXED in tinybooth/assignments_tasks.json (id, title, file, function, points, depends, nudge):
pytest registers one marker per task from that list (tests/conftest.py), so a task and its tests exist whatever a
student does to the source. In the instructor's copy each solution sits inside its function between

        # BEGIN ASSIGN X.Y
        # HINT: the formula (hint level 2)
        ...solution lines...
        # END ASSIGN X.Y

`student-copy` copies the repository without the instructor-only tests (tests/instructor/) and replaces each
chosen region, markers included, by `raise NotImplementedError("Task X.Y: <nudge>")` at the region's indentation:
the docstring with the paper's equation stays and the package still imports. `grade` runs each task's tests
(public and instructor-only) on a student's package, every other task's function replaced by the reference (so a
task is graded on its own), prints a table and writes Gradescope's results.json.

    python -m tinybooth.assignments list
    python -m tinybooth.assignments student-copy OUT_DIR [--tasks 1.2 3.1]
    python -m tinybooth.assignments hint 2.2 [--level 2]
    python -m tinybooth.assignments grade [--student-dir DIR] [--out results.json] [--points points.json]
"""
import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS_FILE = Path(__file__).resolve().with_name("assignments_tasks.json")
STUDENT_MARK = ".student-copy.json"  # written at the root of a student copy: {"blanked": [task ids]}
BEGIN = re.compile(r"^(?P<indent>[ \t]*)#\s*BEGIN ASSIGN (?P<task>\d+\.\d+)\s*$")
END = re.compile(r"^[ \t]*#\s*END ASSIGN (?P<task>\d+\.\d+)\s*$")
HINT = re.compile(r"^[ \t]*#\s*HINT:\s*(?P<hint>.*)$")
# what a student copy leaves out: version control, outputs, weights, caches, the instructor-only tests
SKIP = {".git", "runs", "weights", "student", "__pycache__", ".ipynb_checkpoints", ".pytest_cache", ".whl", ".gl",
        "instructor"}


class AssignmentError(ValueError):
    """A course-staff or student mistake (unknown task, non-empty output folder, missing package)."""


@dataclass(frozen=True)
class Task:
    id: str           # "2.3"
    title: str
    file: str         # "tinybooth/loss.py", relative to the repository root
    function: str     # qualified name, "DiscreteSchedule.q_sample"
    points: float
    depends: tuple    # tasks whose functions this task's tests also call
    nudge: str        # hint level 1: the failure message of the blank stub
    formula: str = ""  # hint level 2 (student copies carry it here; the instructor's copy reads the HINT line)

    @property
    def marker(self):
        return "task" + self.id.replace(".", "_")


def task_key(task_id):
    return tuple(int(p) for p in task_id.split("."))


def load_tasks(path=TASKS_FILE):
    """{id: Task} in task order, from the fixed list."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["tasks"]
    tasks = {r["id"]: Task(r["id"], r["title"], r["file"], r["function"], r["points"], tuple(r["depends"]),
                           r["nudge"], r.get("formula", "")) for r in rows}
    return dict(sorted(tasks.items(), key=lambda kv: task_key(kv[0])))


def marker_expression(task_ids):
    """The `pytest -m` expression that selects these tasks' tests."""
    return " or ".join("task" + t.replace(".", "_") for t in sorted(task_ids, key=task_key))


# ---------------------------------------------------------------------------------------------------------------
# regions and student copies

def find_regions(source, filename="<source>"):
    """[(task, hint, begin_line, end_line)] of the ASSIGN regions in a source text (0-based line numbers)."""
    regions, open_region, lines = [], None, source.splitlines()
    for i, line in enumerate(lines):
        if m := BEGIN.match(line):
            assert open_region is None, f"{filename}:{i + 1}: ASSIGN {m['task']} opens inside ASSIGN {open_region[0]}"
            open_region = (m["task"], i)
        elif m := END.match(line):
            assert open_region is not None and open_region[0] == m["task"], \
                f"{filename}:{i + 1}: END ASSIGN {m['task']} without a matching BEGIN"
            task, begin = open_region
            hint_match = HINT.match(lines[begin + 1]) if begin + 1 < i else None
            regions.append((task, hint_match["hint"].strip() if hint_match else "", begin, i))
            open_region = None
    assert open_region is None, f"{filename}: ASSIGN {open_region[0]} is never closed"
    return regions


def blank_regions(source, tasks=None, filename="<source>", nudges=None):
    """The source with every region (or only those in `tasks`) replaced by a NotImplementedError whose message is
    the task's nudge (`nudges[task]`; default: point at the docstring)."""
    lines = source.splitlines(keepends=True)
    for task, _, begin, end in reversed(find_regions(source, filename)):
        if tasks is not None and task not in tasks:
            continue
        indent = BEGIN.match(lines[begin].rstrip("\n"))["indent"]
        message = f"Task {task}: {(nudges or {}).get(task, 'implement this step (see the docstring above)')}"
        lines[begin:end + 1] = [f"{indent}raise NotImplementedError({message!r})  # TODO ASSIGN {task}\n"]
    return "".join(lines)


def all_regions(package_dir=ROOT / "tinybooth"):
    """{task: (file:line, formula hint)} over the whole package (the instructor's copy)."""
    found = {}
    for f in sorted(Path(package_dir).rglob("*.py")):
        for task, hint, begin, _ in find_regions(f.read_text(encoding="utf-8"), str(f)):
            assert task not in found, f"task {task} is marked twice ({found.get(task)} and {f})"
            found[task] = (f"{f.relative_to(Path(package_dir).parent)}:{begin + 1}", hint)
    return dict(sorted(found.items(), key=lambda kv: task_key(kv[0])))


def student_copy(out_dir, tasks=None, root=ROOT):
    """Copy the repository to out_dir without the instructor-only tests and blank the chosen tasks (default all)."""
    out_dir, known = Path(out_dir), load_tasks(root / "tinybooth" / TASKS_FILE.name)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AssignmentError(f"'{out_dir}' is not empty; choose a new directory for the student copy")
    unknown = sorted(set(tasks or []) - set(known), key=task_key)
    if unknown:
        raise AssignmentError(f"unknown task(s) {unknown}; the tasks are {list(known)}")
    chosen = sorted(tasks or known, key=task_key)
    regions = all_regions(root / "tinybooth")
    missing = [t for t in chosen if t not in regions]
    if missing:
        raise AssignmentError(f"tasks {missing} have no '# BEGIN ASSIGN' region in {root / 'tinybooth'}; "
                              f"make student copies from the instructor's repository")
    shutil.copytree(root, out_dir, dirs_exist_ok=True, ignore=lambda d, names: [n for n in names if n in SKIP])
    nudges = {t.id: t.nudge for t in known.values()}
    for f in (out_dir / "tinybooth").rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        if "BEGIN ASSIGN" in text:
            f.write_text(blank_regions(text, set(chosen), str(f), nudges), encoding="utf-8")
    # the copy's task list carries the level-2 hints, which leave the source with the regions
    table = json.loads((root / "tinybooth" / TASKS_FILE.name).read_text(encoding="utf-8"))
    for row in table["tasks"]:
        row["formula"] = regions[row["id"]][1]
    (out_dir / "tinybooth" / TASKS_FILE.name).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    (out_dir / STUDENT_MARK).write_text(json.dumps({"blanked": chosen}) + "\n", encoding="utf-8")
    for notebook in (out_dir / "lessons").glob("*.ipynb"):
        hide_source_outputs(notebook)
    return out_dir


def hide_source_outputs(notebook):
    """The lessons' committed outputs stay (what each cell should draw), except those of `show_source(...)` cells:
    they print the instructor's code, solutions included; in the copy that cell prints the student's own."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "show_source(" in "".join(cell["source"]).split("def show_source")[0]:
            cell["outputs"] = [{"output_type": "stream", "name": "stdout",
                                "text": ["(run this cell: it prints your code)\n"]}]
    notebook.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def show_source(*functions):
    """Print each function's code (the lessons put it beside the maths; in a student copy it is the student's)."""
    import inspect
    for f in functions:
        print(inspect.getsource(f))


def hint(task_id, level=1, root=ROOT):
    """Hint `level` for a task: 1 a nudge, 2 the formula, 3 the tasks it builds on and where the code goes."""
    tasks = load_tasks(root / "tinybooth" / TASKS_FILE.name)
    if task_id not in tasks:
        raise AssignmentError(f"unknown task {task_id!r}; the tasks are {list(tasks)}")
    task = tasks[task_id]
    if level == 1:
        return task.nudge
    if level == 2:
        return task.formula or all_regions(root / "tinybooth").get(task_id, ("", ""))[1] or task.nudge
    after = f"; its tests also call tasks {', '.join(task.depends)}" if task.depends else ""
    return f"write it in {task.function} ({task.file}){after}; check with: python -m pytest -m {task.marker}"


# ---------------------------------------------------------------------------------------------------------------
# grading: every task on its own, with the reference standing in for the other tasks

def _find_code(code, qualname):
    """The code object of `qualname` nested in a module's code object (None when absent)."""
    for const in code.co_consts:
        if hasattr(const, "co_qualname"):
            if const.co_qualname == qualname:
                return const
            if (found := _find_code(const, qualname)) is not None:
                return found
    return None


@functools.lru_cache(maxsize=None)
def _compiled(path):
    return compile(Path(path).read_text(encoding="utf-8"), path, "exec")


@contextmanager
def reference_fallbacks(keep, reference_root):
    """While inside, every task's function except those in `keep` runs the reference's code (read from
    reference_root's source, never imported), so a test of task X does not fail on another task's mistake."""
    import importlib
    swapped = []
    try:
        for task in load_tasks().values():
            if task.id in keep:
                continue
            try:  # a student module that does not import fails its own tests; the others still get graded
                obj = importlib.import_module(task.file[:-3].replace("/", "."))
                for part in task.function.split("."):
                    obj = getattr(obj, part)
            except Exception:  # noqa: BLE001
                continue
            path = Path(reference_root) / task.file
            ref = _find_code(_compiled(str(path)), task.function)
            assert ref is not None, f"{task.function} not found in {path}"
            original = obj.__code__
            try:
                obj.__code__ = ref
            except ValueError:  # the student's version is a closure (other free variables): leave it
                continue
            swapped.append((obj, original))
        yield
    finally:
        for fn, code in reversed(swapped):
            fn.__code__ = code


class _PerTaskRunner:
    """pytest plugin: runs each selected test once per task it is tagged with, the other tasks' functions running
    the reference each time; results[task][nodeid] = (outcome, message)."""

    def __init__(self, task_ids, reference_root):
        self.task_ids, self.reference_root = list(task_ids), reference_root
        self.results = {t: {} for t in self.task_ids}

    def pytest_collection(self, session):
        with reference_fallbacks(set(), self.reference_root):  # module-level test data comes from the reference
            session.perform_collect()
        return True

    def pytest_runtest_protocol(self, item, nextitem):
        from _pytest.runner import runtestprotocol
        tags = [t for t in self.task_ids if item.get_closest_marker("task" + t.replace(".", "_"))]
        for i, task_id in enumerate(tags):
            if i:
                item._initrequest()  # a fresh fixture request for the rerun (as pytest-rerunfailures does)
            with reference_fallbacks({task_id}, self.reference_root):
                # before a rerun, tear down the test's own fixtures only (its module's stay): nextitem = its parent
                reports = runtestprotocol(item, nextitem=item.parent if i + 1 < len(tags) else nextitem, log=False)
            failed = [r for r in reports if r.failed]
            skipped = [r for r in reports if r.skipped]
            outcome = "failed" if failed else "skipped" if skipped else "passed"
            message = str((failed or skipped)[0].longrepr)[-1500:] if failed or skipped else ""
            self.results[task_id][item.nodeid] = (outcome, message)
        return True


def run_task_tests(task_ids, report, reference_root):
    """In a grading folder: each task's tests (`pytest -m taskX_Y`), all in one pytest session (torch and the test
    modules load once), the other tasks' functions falling back to the reference; writes
    {task: {nodeid: [outcome, message]}} to `report`."""
    import pytest
    runner = _PerTaskRunner(task_ids, reference_root)
    pytest.main(["-q", "--no-header", "-p", "no:cacheprovider", "-W", "ignore", "--continue-on-collection-errors", "-m",
                 marker_expression(task_ids), "tests"], plugins=[runner])
    Path(report).write_text(json.dumps(runner.results, indent=1), encoding="utf-8")


def grading_folder(student_dir, folder, root=ROOT):
    """The instructor's repository (tests, task list, grader) with the student's package in it: a student's edits
    to tests or task list do not count."""
    student_pkg = Path(student_dir) / "tinybooth"
    if not student_pkg.is_dir():
        raise AssignmentError(f"no tinybooth/ package in '{student_dir}'; pass the student copy with --student-dir")
    skip = (SKIP - {"instructor"}) | {"tinybooth"}
    shutil.copytree(root, folder, dirs_exist_ok=True, ignore=lambda d, names: [n for n in names if n in skip])
    shutil.copytree(student_pkg, folder / "tinybooth", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("tinybooth/assignments.py", f"tinybooth/{TASKS_FILE.name}"):
        shutil.copy2(root / f, folder / f)
    return folder


def score_tasks(tasks, results):
    """Gradescope's results.json: one entry per task, score = points * passed / run tests."""
    entries = []
    for task in tasks:
        outcomes = results.get(task.id, {})
        passed = sum(o == "passed" for o, _ in outcomes.values())
        score = round(task.points * passed / len(outcomes), 3) if outcomes else 0.0
        lines = [f"{passed}/{len(outcomes)} tests passed" if outcomes else
                 "no test ran: a test module could not be imported (does every module of tinybooth import?)"]
        for nodeid, (outcome, message) in outcomes.items():
            if outcome != "passed":
                hidden = "/instructor/" in nodeid
                lines.append(f"- {'a hidden test' if hidden else nodeid}: {outcome}"
                             + ("" if hidden else f"\n{message.strip()[-600:]}"))
        if passed < len(outcomes) or not outcomes:
            lines.append(f"hint: {task.nudge}  (more: python -m tinybooth.assignments hint {task.id} --level 2)")
        entries.append({"name": f"Task {task.id}: {task.title}", "number": task.id, "score": score,
                        "max_score": task.points, "output": "\n".join(lines), "visibility": "visible",
                        "extra_data": {"passed": passed, "run": len(outcomes)}})
    return {"score": round(sum(e["score"] for e in entries), 3), "tests": entries}


def grade(student_dir=ROOT, out=None, points=None, tasks=None, root=ROOT, timeout=1800):
    """Grade a student copy: returns (and with `out`, writes) Gradescope's results.json as a dict.

    points: {task: points} overriding the fixed list's; tasks: only these task ids (default all)."""
    table = load_tasks(root / "tinybooth" / TASKS_FILE.name)
    for task_id, p in (points or {}).items():
        if task_id not in table:
            raise AssignmentError(f"points given for unknown task {task_id!r}; the tasks are {list(table)}")
        table[task_id] = Task(**{**table[task_id].__dict__, "points": p})
    unknown = sorted(set(tasks or []) - set(table))
    if unknown:
        raise AssignmentError(f"unknown task(s) {unknown}; the tasks are {list(table)}")
    chosen = [table[t] for t in (tasks or table)]
    with tempfile.TemporaryDirectory(prefix="tinybooth-grade-") as tmp:
        folder = grading_folder(student_dir, Path(tmp), root)
        report = folder / "report.json"
        proc = subprocess.run([sys.executable, "-m", "tinybooth.assignments", "_run-tests", str(report),
                               str(root), *[t.id for t in chosen]], cwd=folder, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if not report.exists():
            raise AssignmentError(f"the tests did not run on '{student_dir}':\n{proc.stdout[-3000:]}"
                                  f"{proc.stderr[-3000:]}")
        results = score_tasks(chosen, json.loads(report.read_text(encoding="utf-8")))
    if out:
        Path(out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


def format_table(results):
    rows = [f"{'task':<6}{'title':<48}{'points':>7}{'passed':>9}{'score':>8}"]
    for e in results["tests"]:
        rows.append(f"{e['number']:<6}{e['name'].split(': ', 1)[1][:46]:<48}{e['max_score']:>7g}"
                    f"{e['extra_data']['passed']:>5}/{e['extra_data']['run']:<3}{e['score']:>8g}")
    total = sum(e["max_score"] for e in results["tests"])
    rows.append(f"{'total':<54}{total:>7g}{'':>9}{results['score']:>8g}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# the command

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the tasks: points, where the code goes, which tasks each builds on")
    copy = sub.add_parser("student-copy", help="write a copy of the repo with the tasks blanked out")
    copy.add_argument("out_dir")
    copy.add_argument("--tasks", nargs="+", help="only these tasks (e.g. 1.2 3.1); default: all")
    ask = sub.add_parser("hint", help="a hint for a task: level 1 a nudge, 2 the formula, 3 where and what it uses")
    ask.add_argument("task")
    ask.add_argument("--level", type=int, choices=(1, 2, 3), default=1)
    grader = sub.add_parser("grade", help="run every task's tests on a student copy and score them")
    grader.add_argument("--student-dir", default=str(ROOT), help="the student's copy (default: this repository)")
    grader.add_argument("--out", help="write Gradescope's results.json here")
    grader.add_argument("--points", help="a JSON file {task: points} overriding the default points")
    grader.add_argument("--tasks", nargs="+", help="only these tasks (default: all)")
    run = sub.add_parser("_run-tests")  # internal: what `grade` runs inside the grading folder
    run.add_argument("report")
    run.add_argument("reference_root")
    run.add_argument("tasks", nargs="+")
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except AssignmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _command(args):
    if args.command == "list":
        for t in load_tasks().values():
            needs = f"  (tests also use {', '.join(t.depends)})" if t.depends else ""
            print(f"task {t.id:>4}  {t.points:>3g} pt  {t.title:<46} {t.file}: {t.function}{needs}")
    elif args.command == "student-copy":
        out = student_copy(args.out_dir, set(args.tasks) if args.tasks else None)
        blanked = json.loads((out / STUDENT_MARK).read_text())["blanked"]
        print(f"student copy with {len(blanked)} task(s) blanked written to {out}\n"
              f"a student checks their work with:  cd {out} && python -m pytest -m \"{marker_expression(blanked)}\"\n"
              f"grade it with:  python -m tinybooth.assignments grade --student-dir {out} --out results.json")
    elif args.command == "hint":
        print(f"Task {args.task} (hint {args.level}): {hint(args.task, args.level)}")
    elif args.command == "grade":
        points = json.loads(Path(args.points).read_text()) if args.points else None
        if args.points is not None and not isinstance(points, dict):
            raise AssignmentError(f"{args.points} must hold a JSON object {{task: points}}")
        results = grade(args.student_dir, args.out, points, args.tasks)
        print(format_table(results))
        if args.out:
            print(f"results written to {args.out}")
    else:
        run_task_tests(args.tasks, args.report, args.reference_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
