"""Execute every notebook in lessons/ top to bottom (CI runs this after pytest), so lessons never rot.

Usage: python tests/run_lessons.py [--write] [lessons/03_samplers.ipynb ...]

--write stores the executed outputs in the notebooks (what a student sees before running anything, and what a
student copy with blank tasks should look like once they are filled in); progress bars and other stderr streams
and the execution timestamps are left out, so a re-run changes only what the code prints and draws.
"""
import argparse
import base64
import io
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
    return nb


def small_image(data):
    """A figure's PNG (base64) re-encoded small: at most 1000 px wide, a 128-colour palette PNG for plots, a JPEG
    where that stays large (noise strips compress badly). Returns (mime type, base64 data)."""
    from PIL import Image
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    if image.width > 1000:  # wide strips of small pictures: 1000 px still shows every pixel of a 64 px sample
        image = image.resize((1000, round(image.height * 1000 / image.width)), Image.LANCZOS)
    png, jpeg = io.BytesIO(), io.BytesIO()
    image.quantize(colors=128).save(png, format="PNG", optimize=True)
    if png.tell() <= 40_000:
        return "image/png", base64.b64encode(png.getvalue()).decode("ascii")
    image.save(jpeg, format="JPEG", quality=80)
    best = min((png, "image/png"), (jpeg, "image/jpeg"), key=lambda b: b[0].tell())
    return best[1], base64.b64encode(best[0].getvalue()).decode("ascii")


def keep_outputs(nb):
    """The notebook with its outputs, minus stderr streams and execution timestamps, figures palette-encoded."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
        for o in cell.outputs:
            if "data" in o and "image/png" in o["data"]:
                mime, data = small_image(o["data"].pop("image/png"))
                o["data"][mime] = data
    nb.metadata.pop("widgets", None)
    return nb


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="store the executed outputs in the notebooks")
    parser.add_argument("paths", nargs="*")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.paths] or sorted(LESSONS.glob("*.ipynb"))
    failed = []
    for p in paths:
        start = time.time()
        try:
            nb = run(p)
            note = ""
            if args.write:
                nbformat.write(keep_outputs(nb), p)
                note = f", outputs written: {p.stat().st_size / 1024:.0f} KiB"
            print(f"ok      {p.name}  ({time.time() - start:.0f} s{note})", flush=True)
        except Exception as e:  # report every notebook, then fail
            print(f"FAILED  {p.name}: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
            failed.append(p.name)
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
