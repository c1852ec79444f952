"""The student-copy tool: regions blank correctly, every task has tests, and a student copy fails exactly there."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tinybooth.assignments import all_regions, blank_regions, find_regions, student_copy

from conftest import ROOT

SOURCE = '''
def q_sample(x, alpha_t, sigma_t, eps):
    """z_t = alpha_t x + sigma_t eps."""
    # BEGIN ASSIGN 9.8
    # HINT: z_t = alpha_t * x + sigma_t * eps
    z_t = alpha_t * x + sigma_t * eps
    return z_t
    # END ASSIGN 9.8


def double(x):
    # BEGIN ASSIGN 9.9
    return 2 * x
    # END ASSIGN 9.9
'''


def run_python(args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_blank_regions_keeps_docstring_and_raises_with_hint():
    blanked = blank_regions(SOURCE)
    assert '"""z_t = alpha_t x + sigma_t eps."""' in blanked, "the docstring with the equation must survive"
    assert "z_t = alpha_t * x + sigma_t * eps\n    return" not in blanked, "the solution must be gone"
    namespace = {}
    exec(compile(blanked, "<student>", "exec"), namespace)
    with pytest.raises(NotImplementedError, match=r"Task 9\.8: z_t = alpha_t \* x \+ sigma_t \* eps"):
        namespace["q_sample"](1.0, 0.5, 0.5, 0.1)
    with pytest.raises(NotImplementedError, match=r"Task 9\.9: implement this step"):
        namespace["double"](3)


def test_blank_regions_only_selected_tasks():
    namespace = {}
    exec(compile(blank_regions(SOURCE, tasks={"9.9"}), "<student>", "exec"), namespace)
    assert namespace["q_sample"](2.0, 0.5, 1.0, 0.25) == 1.25, "task 9.8 was not selected and must keep its solution"
    with pytest.raises(NotImplementedError):
        namespace["double"](3)


@pytest.mark.parametrize("broken", [
    "    # BEGIN ASSIGN 1.1\n    x = 1\n",                                    # never closed
    "    # BEGIN ASSIGN 1.1\n    x = 1\n    # END ASSIGN 1.2\n",              # wrong END
    "    # BEGIN ASSIGN 1.1\n    # BEGIN ASSIGN 1.2\n    # END ASSIGN 1.2\n    # END ASSIGN 1.1\n",  # nested
])
def test_malformed_regions_are_refused(broken):
    with pytest.raises(AssertionError, match="ASSIGN"):
        find_regions(broken)


def collect_markers(root, tmp_path, extra=()):
    report = tmp_path / "markers.json"
    proc = run_python(["-m", "pytest", "--collect-only", "-q", *extra], cwd=root,
                      env={"TINYBOOTH_MARKER_REPORT": str(report)})
    assert report.exists(), f"collection failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(report.read_text())


def test_every_marked_task_selects_at_least_one_test(tmp_path):
    tasks = all_regions()
    assert tasks, "no '# BEGIN ASSIGN X.Y' regions found in tinybooth/"
    markers = collect_markers(ROOT, tmp_path)
    used = {m for ms in markers.values() for m in ms}
    untested = [t for t in tasks if f"task{t.replace('.', '_')}" not in used]
    assert not untested, (f"tasks {untested} have solution regions but no test tagged @pytest.mark.task<X>_<Y>; "
                          f"`pytest -m` would select nothing (exit 5) for them")


@pytest.mark.slow
def test_student_copy_imports_and_each_task_fails_on_its_own_region(tmp_path):
    copy = student_copy(tmp_path / "student")
    modules = sorted(p.stem for p in (copy / "tinybooth").glob("*.py") if p.stem not in ("__init__", "__main__"))
    proc = run_python(["-c", "import importlib\nfor m in %r: importlib.import_module('tinybooth.' + m)" % modules],
                      cwd=copy)
    assert proc.returncode == 0, f"the student copy must import with every task blanked:\n{proc.stderr[-3000:]}"

    tasks = all_regions()
    expression = " or ".join(f"task{t.replace('.', '_')}" for t in tasks)
    junit = tmp_path / "junit.xml"
    proc = run_python(["-m", "pytest", "-q", "-m", expression, f"--junitxml={junit}"],
                      cwd=copy)
    assert proc.returncode == 1, f"pytest on the student copy should fail (exit 1), got {proc.returncode}"
    passed, messages = [], {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        problems = list(case.iter("failure")) + list(case.iter("error"))
        if not problems and not list(case.iter("skipped")):
            passed.append(f"{case.get('classname')}::{case.get('name')}")
        if problems:
            messages[f"{case.get('classname')}::{case.get('name')}"] = " ".join(
                (p.get("message") or "") + (p.text or "") for p in problems)
    assert not passed, f"these task tests pass on the blanked student copy, so they cannot grade anything: {passed}"
    # a task's tests may first hit a region they build on (DDIM uses Task 1.3's x_from_eps), but they must fail
    # because code is blanked, not for some unrelated reason
    unrelated = [name for name, text in messages.items() if "NotImplementedError" not in text or "Task " not in text]
    assert not unrelated, f"these task tests fail on the student copy for another reason than a blanked task: " \
                          f"{unrelated[:10]}"


@pytest.mark.slow
def test_student_copy_of_one_task_fails_that_task_only(tmp_path):
    tasks = list(all_regions())
    chosen, other = tasks[0], tasks[-1]
    copy = student_copy(tmp_path / "student", tasks={chosen})
    marker = lambda t: f"task{t.replace('.', '_')}"  # noqa: E731
    failing = run_python(["-m", "pytest", "-q", "-m", marker(chosen)], cwd=copy)
    assert failing.returncode == 1, f"pytest -m {marker(chosen)} must fail when task {chosen} is blank:\n" \
                                    f"{failing.stdout[-2000:]}"
    passing = run_python(["-m", "pytest", "-q", "-m", marker(other)], cwd=copy)
    assert passing.returncode == 0, f"pytest -m {marker(other)} must still pass when only task {chosen} is blank:\n" \
                                    f"{passing.stdout[-2000:]}"
