"""Course assignments: turn tinybooth into a student copy with the key formulas blanked out (minitorch style).

Every solution region in tinybooth/ is marked inside a function body:

        # BEGIN ASSIGN X.Y     (X.Y = task number, e.g. 1.2)
        # HINT: z_t = alpha_t * x + sigma_t * eps   (optional; becomes the error message)
        ...solution lines...
        # END ASSIGN X.Y

`student-copy` copies the repository and replaces each region (markers included) by

        raise NotImplementedError("Task X.Y: z_t = alpha_t * x + sigma_t * eps")  # TODO ASSIGN X.Y

at the region's indentation (the trailing comment keeps the task's pytest marker registered), so the docstring
with the paper's equation stays, the module still imports, and only the tests tagged `@pytest.mark.taskX_Y` need the missing code. Graders then run `pytest -m taskX_Y` per task.

    python -m tinybooth.assignments list
    python -m tinybooth.assignments student-copy OUT_DIR [--tasks 1.2 3.1]
"""
import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"^(?P<indent>[ \t]*)#\s*BEGIN ASSIGN (?P<task>\d+\.\d+)\s*$")
END = re.compile(r"^[ \t]*#\s*END ASSIGN (?P<task>\d+\.\d+)\s*$")
HINT = re.compile(r"^[ \t]*#\s*HINT:\s*(?P<hint>.*)$")
# what a student copy leaves out: version control, outputs, downloaded weights, caches
SKIP = {".git", "runs", "weights", "student", "__pycache__", ".ipynb_checkpoints", ".pytest_cache", ".whl", ".gl"}


def find_regions(source, filename="<source>"):
    """[(task, hint, begin_line, end_line)] of the ASSIGN regions in a source text (0-based line numbers)."""
    regions, open_region = [], None
    for i, line in enumerate(source.splitlines()):
        if m := BEGIN.match(line):
            assert open_region is None, f"{filename}:{i + 1}: ASSIGN {m['task']} opens inside ASSIGN {open_region[0]}"
            open_region = (m["task"], i)
        elif m := END.match(line):
            assert open_region is not None and open_region[0] == m["task"], \
                f"{filename}:{i + 1}: END ASSIGN {m['task']} without a matching BEGIN"
            task, begin = open_region
            hint_match = HINT.match(source.splitlines()[begin + 1]) if begin + 1 < i else None
            hint = hint_match["hint"].strip() if hint_match else "implement this step (see the docstring above)"
            regions.append((task, hint, begin, i))
            open_region = None
    assert open_region is None, f"{filename}: ASSIGN {open_region[0]} is never closed"
    return regions


def blank_regions(source, tasks=None, filename="<source>"):
    """The source with every region (or only those in `tasks`) replaced by a NotImplementedError."""
    lines = source.splitlines(keepends=True)
    for task, hint, begin, end in reversed(find_regions(source, filename)):
        if tasks is not None and task not in tasks:
            continue
        indent = BEGIN.match(lines[begin].rstrip("\n"))["indent"]
        message = f"Task {task}: {hint}"
        lines[begin:end + 1] = [f"{indent}raise NotImplementedError({message!r})  # TODO ASSIGN {task}\n"]
    return "".join(lines)


def all_regions(package_dir=ROOT / "tinybooth"):
    """{task: (file, hint)} over the whole package."""
    found = {}
    for f in sorted(Path(package_dir).rglob("*.py")):
        for task, hint, begin, _ in find_regions(f.read_text(encoding="utf-8"), str(f)):
            assert task not in found, f"task {task} is marked twice ({found.get(task)} and {f})"
            found[task] = (f"{f.relative_to(package_dir.parent)}:{begin + 1}", hint)
    return dict(sorted(found.items(), key=lambda kv: tuple(int(p) for p in kv[0].split("."))))


def student_copy(out_dir, tasks=None, root=ROOT):
    """Copy the repository to out_dir and blank the chosen ASSIGN regions (all of them by default)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"'{out_dir}' is not empty; choose a new directory for the student copy")
    known = all_regions(root / "tinybooth")
    unknown = sorted(set(tasks or []) - set(known))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the marked tasks are {sorted(known)}")
    shutil.copytree(root, out_dir, dirs_exist_ok=True, ignore=lambda d, names: [n for n in names if n in SKIP])
    for f in (out_dir / "tinybooth").rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        if "BEGIN ASSIGN" in text:
            f.write_text(blank_regions(text, tasks, str(f)), encoding="utf-8")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the marked tasks")
    copy = sub.add_parser("student-copy", help="write a copy of the repo with the tasks blanked out")
    copy.add_argument("out_dir")
    copy.add_argument("--tasks", nargs="*", help="only these tasks (e.g. 1.2 3.1); default: all")
    args = parser.parse_args(argv)
    if args.command == "list":
        for task, (where, hint) in all_regions().items():
            print(f"task {task:>5}  {where:<40} {hint}")
    else:
        out = student_copy(args.out_dir, set(args.tasks) if args.tasks else None)
        n = len(args.tasks) if args.tasks else len(all_regions())
        print(f"student copy with {n} task(s) blanked written to {out}\n"
              f"grade one task with:  cd {out} && python -m pytest -m task1_1")


if __name__ == "__main__":
    sys.exit(main())
