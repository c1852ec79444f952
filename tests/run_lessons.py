"""Execute every notebook in lessons/ top to bottom (CI runs this after pytest), so lessons never rot.

Usage: python tests/run_lessons.py [lessons/03_samplers.ipynb ...]
"""
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

LESSONS = Path(__file__).resolve().parent.parent / "lessons"
# the lessons' models are tiny: one thread per kernel avoids thread-synchronisation stalls on 2 busy cores
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(LESSONS)}})
    client.execute()


def main(paths):
    paths = [Path(p) for p in paths] or sorted(LESSONS.glob("*.ipynb"))
    failed = []
    for p in paths:
        start = time.time()
        try:
            run(p)
            print(f"ok      {p.name}  ({time.time() - start:.0f} s)", flush=True)
        except Exception as e:  # report every notebook, then fail
            print(f"FAILED  {p.name}: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
            failed.append(p.name)
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
