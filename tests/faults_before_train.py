"""Before/after table of the train fault battery (issue 14): every case of tests/test_train_faults.py CASES, run as a
real `python -m tinybooth.train` subprocess through two checkouts, printed as Markdown rows for tests/FAULTS.md.

    PYTHONPATH=tests:. python tests/faults_before_train.py --before /work/wt/baseline --after .

The tiny IF cascade and the photos are built once with the test module's own builders (tests/test_train.py); each
checkout then makes its own finished run with the flags of the test's `finished_run` fixture, using its own code
(a run the old code made is what a user of the old code has). Every case runs in a fresh folder `<work>`, next to
that finished run, which is restored from a pristine copy before each case and hashed (sha256) before and after it.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import test_train
from test_train_faults import CASES, Ctx, snapshot


class _Factory:  # the one method of pytest's tmp_path_factory that the fixtures call
    def __init__(self, root):
        self.root, self.n = Path(root), 0

    def mktemp(self, name):
        self.n += 1
        path = self.root / f"{name}{self.n}"
        path.mkdir()
        return path


def train_command(checkout, argv, work):
    """Run `python -m tinybooth.train argv` in checkout; return (exit status, stderr lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout), "TINYBOOTH_CACHE": str(work / "cache")}
    r = subprocess.run([sys.executable, "-m", "tinybooth.train", *argv], cwd=checkout, env=env, capture_output=True,
                       text=True, timeout=300)
    return r.returncode, r.stderr.strip().splitlines()


def cell(code, err, changed, replace):
    """FAULTS.md's cell: exit status, traceback or line count, changed files, and the first line a user reads: the
    `error:` line, else the exception's first line, else the last stderr line."""
    text = "\n".join(err)
    errors = [line for line in err if line.startswith("error:")]
    shown = errors[0] if errors else (err[-1] if err else "(nothing on stderr)")
    if "Traceback" in text:  # the exception's first line: its message may run over several lines
        last = max(i for i, line in enumerate(err) if line.startswith("Traceback"))
        shown = next(line for line in err[last + 1:] if not line.startswith(" "))
    if code == 0:
        shown = "no error: the run went on and finished"  # its last stderr line is a progress bar
    for path, name in replace:
        shown = shown.replace(path, name)
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    kind = ", traceback" if "Traceback" in text else (f", {len(err)} lines" if len(err) > 1 and code else "")
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    noun = "file" if len(changed) == 1 else "files"
    files = f", **{len(changed)} {noun} of the finished run changed: {', '.join(changed[:3])}{more}**" if changed \
        else ""
    return f"exit {code}{kind}{files}: `{shown}`", {"traceback": "Traceback" in text, "changed": bool(changed),
                                                      "exit2": code == 2,
                                                      "one_error": len(errors) == 1}


def run_case(checkout, case, shared, run, pristine, index):
    name, setup, flags, _ = case
    shutil.rmtree(run)
    shutil.copytree(pristine, run)
    work = shared.parent / f"{checkout.name}-case{index:02d}"
    work.mkdir()
    values = setup(Ctx(work, run, shared["photos"], shared["tiny_if"]))
    argv = test_train._if_args(shared["tiny_if"], shared["photos"], work / "out",
                               "--max-steps", "2", "--sr-steps", "1", "--num-samples", "0")
    argv += [f.format(**values) for f in flags]
    before = snapshot(run)
    code, err = train_command(checkout, argv, work)
    after = snapshot(run)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    replace = [(str(work), "<work>"), (str(run), "<run>"), (str(shared.parent), "<tmp>")]
    return cell(code, err, changed, replace)


class Shared(dict):
    parent = None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="train_faults_"))
    factory = _Factory(tmp)
    shared = Shared(tiny_if=test_train.tiny_if.__wrapped__(factory), photos=test_train.photos.__wrapped__(factory))
    shared.parent = tmp
    runs = {}
    for label, checkout in (("before", args.before.resolve()), ("after", args.after.resolve())):
        run = tmp / label / "run"
        run.parent.mkdir()
        code, err = train_command(checkout, test_train._if_args(shared["tiny_if"], shared["photos"], run, "--max-steps",
                                  "2", "--sr-steps", "1", "--num-samples", "0"), run.parent)
        assert code == 0, f"the finished run of {checkout} failed: {err[-5:]}"
        shutil.copytree(run, tmp / label / "pristine")
        runs[label] = (checkout, run, tmp / label / "pristine")
    totals = {"before": [], "after": []}
    print("| case | before (03985b9) | after (branch faults2) |\n|---|---|---|")
    for i, case in enumerate(CASES):
        cells = []
        for label, (checkout, run, pristine) in runs.items():
            text, facts = run_case(checkout, case, shared, run, pristine, i)
            totals[label].append(facts)
            cells.append(text)
        print(f"| {case[0]} | {cells[0]} | {cells[1]} |", flush=True)
    for label, facts in totals.items():
        print(f"{label}: {sum(f['traceback'] for f in facts)} tracebacks, "
              f"{sum(f['changed'] for f in facts)} cases changed files of the finished run, "
              f"{sum(f['exit2'] for f in facts)} of {len(facts)} exit 2, "
              f"{sum(f['one_error'] for f in facts)} with exactly one `error:` line")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
