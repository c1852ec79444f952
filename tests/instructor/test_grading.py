"""Instructor-only (never in a student copy): the course round trip.

A student copy is made, every task filled in the form a student would (the stub line and the BEGIN/END/HINT
comments gone, the reference solution in their place), and graded: full marks. Then one task is left blank and one
wrong variant per task group is put in: zero on the blank task, the wrong ones lose points on their own tests, and
every other task keeps full marks (the grader stands the reference in for the tasks a test builds on).
"""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tinybooth.assignments import (STUDENT_MARK, all_regions, find_regions, grade, load_tasks, marker_expression,
                                   student_copy)

ROOT = Path(__file__).resolve().parents[2]
TODO = re.compile(r"^[ \t]*raise NotImplementedError\(.*\)  # TODO ASSIGN (?P<task>\d+\.\d+)\n", re.M)

# one plausible mistake per task group: (task, text of the reference solution, what the student wrote instead)
WRONG = [("1.3", "return (z_t - sigma_t * eps) / alpha_t", "return (z_t - sigma_t * eps) * alpha_t"),
         ("2.2", "return alpha_t ** 2 / sigma_t ** 2", "return alpha_t / sigma_t"),
         ("3.3", "guided = out_uncond[:, :channels] + scale", "guided = out_cond[:, :channels] + scale"),
         ("4.5", ".tril()", ".triu()"),
         ("5.2", 'return "".join(candidates[:k])', 'return "".join(candidates[1:k + 1])'),
         ("6.1", "[cos, sin] if flip_sin_to_cos else [sin, cos]", "[sin, cos] if flip_sin_to_cos else [cos, sin]"),
         ("7.3", "return self.mean + self.std * noise", "return self.mean + noise"),
         ("8.3", "(x.shape[0],)", "(1,)"),  # one step t for the whole batch
         ("9.3", "F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1).mean()",
          "cosine_matrix(image_embeds, text_embeds).mean()")]  # all pairs instead of image i with prompt i
UNTAGGED = "tests/test_cascade.py::test_table_step_is_continuous_cosine_one_step_later"  # its fixture needs 1.1
BLANK = "1.2"  # 7.1 and 8.3 build on it: they must keep full marks
ALSO_GRADED = ["1.1", "3.1", "5.1", "6.5", "7.1"]  # tasks whose tests call a blank or wrong task


def solution_lines(task, root=ROOT):
    """The reference solution of a task as a student would type it: the region without BEGIN, HINT and END."""
    path = root / load_tasks()[task].file
    source = path.read_text(encoding="utf-8")
    (begin, end), = [(b, e) for t, _, b, e in find_regions(source, str(path)) if t == task]
    return "".join(line for line in source.splitlines(keepends=True)[begin + 1:end] if "# HINT:" not in line)


def fill_in(copy, tasks, wrong=()):
    """Replace each task's stub in the copy by its solution; `wrong`: (task, old, new) edits on top."""
    edits = {task: (old, new) for task, old, new in wrong}
    for f in (copy / "tinybooth").rglob("*.py"):
        text = f.read_text(encoding="utf-8")

        def solve(m):
            if m["task"] not in tasks:
                return m[0]
            body = solution_lines(m["task"])
            if m["task"] in edits:
                old, new = edits[m["task"]]
                assert body.count(old) == 1, f"the wrong variant of {m['task']} does not apply: {old!r}"
                body = body.replace(old, new)
            return body
        new_text = TODO.sub(solve, text)
        if new_text != text:
            f.write_text(new_text, encoding="utf-8")


@pytest.fixture
def copy(tmp_path):
    return student_copy(tmp_path / "student")


def test_task_table_names_each_region(copy):
    """Every task of the fixed list has exactly one region, inside the function the list names."""
    tasks, regions = load_tasks(), all_regions()
    assert sorted(tasks) == sorted(regions), f"tasks {set(tasks) ^ set(regions)} are in only one of " \
                                             "assignments_tasks.json and the BEGIN ASSIGN regions"
    for task in tasks.values():
        module = importlib.import_module(task.file[:-3].replace("/", "."))
        obj = module
        for part in task.function.split("."):
            obj = getattr(obj, part)
        lines, first = inspect.getsourcelines(obj)
        line = int(regions[task.id][0].rsplit(":", 1)[1])
        assert first <= line < first + len(lines), f"task {task.id}'s region is not inside {task.function}"
    assert not (copy / "tests" / "instructor").exists(), "instructor-only tests must stay out of the student copy"
    assert json.loads((copy / STUDENT_MARK).read_text())["blanked"] == list(tasks)
    assert not all_regions(copy / "tinybooth"), "a student copy keeps no solution region"
    leaks = [p.name for p in (copy / "lessons").glob("*.ipynb") if "BEGIN ASSIGN" in p.read_text(encoding="utf-8")]
    assert not leaks, f"the committed outputs of {leaks} print solution regions into the student copy"


def test_grade_round_trip_full_marks_on_every_task(copy, tmp_path):
    fill_in(copy, set(load_tasks()))
    out = tmp_path / "results.json"
    results = grade(copy, out=out)
    short = {e["number"]: (e["score"], e["max_score"]) for e in results["tests"] if e["score"] != e["max_score"]}
    assert not short, f"a correct student lost points on {short}"
    assert json.loads(out.read_text())["score"] == sum(t.points for t in load_tasks().values())
    entry = results["tests"][0]
    assert {"name", "score", "max_score", "output", "visibility"} <= set(entry), "Gradescope's fields"


def test_grade_blank_task_gets_zero_and_wrong_variants_lose_points(copy):
    tasks = set(load_tasks())
    fill_in(copy, tasks - {BLANK}, WRONG)
    graded = sorted({BLANK, *ALSO_GRADED, *(t for t, _, _ in WRONG)})
    results = {e["number"]: e for e in grade(copy, tasks=graded)["tests"]}
    assert results[BLANK]["score"] == 0, f"blank task {BLANK} scored {results[BLANK]['score']}"
    assert "hint:" in results[BLANK]["output"], "a failed task's output carries the nudge"
    for task, _, _ in WRONG:
        assert results[task]["score"] < results[task]["max_score"], \
            f"the wrong variant of task {task} passes all its tests:\n{results[task]['output']}"
    for task in ALSO_GRADED:
        assert results[task]["score"] == results[task]["max_score"], \
            f"task {task} is correct but lost points on a task it builds on:\n{results[task]['output']}"


@pytest.mark.parametrize("test, old, new", [
    ("test_each_sample_gets_its_own_step_t",  # one t drawn and shared by the whole batch
     "(x.shape[0],)", "(1,)"),
    ("test_super_resolution_feeds_z_t_joined_with_the_conditioning",  # SR conditioning not concatenated
     "model_in = z_t if x_cond is None else torch.cat([z_t, x_cond], dim=1)", "model_in = z_t")])
def test_dreambooth_loss_tests_catch_the_two_mistakes(test, old, new, monkeypatch):
    import test_dreambooth_loss
    task = load_tasks()["8.3"]
    fn = test_dreambooth_loss.denoising_losses
    source = inspect.getsource(fn)
    assert source.count(old) == 1, f"the mistake no longer applies to {task.file}"
    source = source.replace(old, new)
    namespace = dict(fn.__globals__)
    exec(compile(source, task.file, "exec"), namespace)
    monkeypatch.setattr(fn, "__code__", namespace[fn.__name__].__code__)
    with pytest.raises(AssertionError):
        getattr(test_dreambooth_loss, test)()


def test_student_copy_fails_exactly_its_blank_tasks_and_pytest_ends(copy, tmp_path):
    """In a copy with every task blank, no task test passes, each fails on a blank stub; untagged tests that
    reach a stub are skipped (checked on one file); `student-copy --tasks` prints the right -m expression."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", marker_expression(load_tasks()),
                           f"--junitxml={junit}"], cwd=copy, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, f"pytest on the student copy should fail (exit 1), got {proc.returncode}"
    passed, unrelated = [], []
    for case in ET.parse(junit).getroot().iter("testcase"):
        problems = list(case.iter("failure")) + list(case.iter("error"))
        name = f"{case.get('classname')}::{case.get('name')}"
        if not problems and not list(case.iter("skipped")):
            passed.append(name)
        text = " ".join((p.get("message") or "") + (p.text or "") for p in problems)
        if problems and not re.search(r"NotImplementedError.*Task \d+\.\d+", text, re.S):
            unrelated.append(name)
    assert not passed, f"these task tests pass on the blanked student copy, so they cannot grade anything: {passed}"
    assert not unrelated, f"these fail for another reason than a blank task: {unrelated[:10]}"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", UNTAGGED], cwd=copy, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0 and re.search(r"SKIPPED .*needs task \d+\.\d+, which is blank", proc.stdout), \
        f"an untagged test that reaches a blank task must be skipped, naming the task:\n{proc.stdout[-2000:]}"


def test_student_copy_command_prints_the_right_marker_expression(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinybooth.assignments", "student-copy", str(tmp_path / "s"),
                           "--tasks", "2.3", "3.2", "8.3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '-m "task2_3 or task3_2 or task8_3"' in proc.stdout, proc.stdout
