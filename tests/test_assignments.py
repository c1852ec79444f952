"""The assignment tool: regions blank correctly, every task of the fixed list has tests, hints come in levels,
mistakes end in one `error:` line. (The student-copy and grading round trip is instructor-only:
tests/instructor/test_grading.py.)"""
import json
import os
import subprocess
import sys

import pytest

from tinybooth.assignments import blank_regions, find_regions, hint, load_tasks, main, marker_expression, score_tasks

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


def test_blank_regions_keeps_docstring_and_raises_with_the_nudge():
    blanked = blank_regions(SOURCE, nudges={"9.8": "the forward process"})
    assert '"""z_t = alpha_t x + sigma_t eps."""' in blanked, "the docstring with the equation must survive"
    assert "z_t = alpha_t * x + sigma_t * eps\n    return" not in blanked, "the solution must be gone"
    namespace = {}
    exec(compile(blanked, "<student>", "exec"), namespace)
    assert "alpha_t * x + sigma_t * eps" not in blanked.split('"""')[-1], "the formula (hint 2) must not be in the stub"
    with pytest.raises(NotImplementedError, match=r"Task 9\.8: the forward process"):
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


def test_every_task_selects_at_least_one_test(tmp_path):
    tasks = load_tasks()
    assert tasks, "tinybooth/assignments_tasks.json lists no task"
    markers = collect_markers(ROOT, tmp_path)
    used = {m for ms in markers.values() for m in ms}
    untested = [t.id for t in tasks.values() if t.marker not in used]
    assert not untested, (f"tasks {untested} have no test tagged @pytest.mark.task<X>_<Y>; "
                          f"`pytest -m` would select nothing (exit 5) for them")


def test_task_list_is_complete_and_dependencies_exist():
    tasks = load_tasks()
    for task in tasks.values():
        assert task.points > 0 and task.nudge and task.title, f"task {task.id} needs a title, points and a nudge"
        assert (ROOT / task.file).exists(), f"task {task.id}: {task.file} does not exist"
        unknown = set(task.depends) - set(tasks)
        assert not unknown, f"task {task.id} depends on unknown tasks {unknown}"
    assert marker_expression(["8.3", "2.3", "3.2"]) == "task2_3 or task3_2 or task8_3"


def test_hints_come_in_levels():
    nudge, formula = hint("2.2", 1), hint("2.2", 2)
    assert nudge == load_tasks()["2.2"].nudge and formula != nudge, "level 1 is the nudge, level 2 the formula"
    assert "python -m pytest -m task2_2" in hint("2.2", 3), "level 3 says where the code goes and how to check it"


@pytest.mark.parametrize("argv, says", [(["hint", "2.9"], "unknown task '2.9'"),
                                        (["grade", "--tasks", "2.9"], "unknown task(s) ['2.9']"),
                                        (["grade", "--student-dir", "/nonexistent"], "no tinybooth/ package")])
def test_mistakes_end_in_one_error_line(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err, err


def test_scores_are_points_times_the_share_of_passed_tests():
    task = load_tasks()["2.3"]
    results = {"2.3": {"tests/test_loss.py::a": ("passed", ""), "tests/test_loss.py::b": ("failed", "E  wrong"),
                       "tests/instructor/test_x.py::c": ("failed", "E  the hidden expectation")}}
    entry = score_tasks([task], results)["tests"][0]
    assert entry["score"] == pytest.approx(task.points / 3) and entry["max_score"] == task.points
    assert "tests/test_loss.py::b" in entry["output"] and "E  wrong" in entry["output"], "public failures are shown"
    assert "hidden expectation" not in entry["output"], "an instructor-only test's message stays hidden"
    assert task.nudge in entry["output"], "a task short of full marks gets its nudge"


def test_points_file_must_name_known_tasks(tmp_path, capsys):
    points = tmp_path / "points.json"
    points.write_text('{"2.9": 5}')
    assert main(["grade", "--points", str(points)]) == 2
    assert "points given for unknown task '2.9'" in capsys.readouterr().err
