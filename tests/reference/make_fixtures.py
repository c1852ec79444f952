"""Regenerate every reference fixture in tests/fixtures/ with the reference libraries (diffusers, transformers).

The test suite never imports those libraries; it only reads the small files these scripts write. To regenerate:

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 diffusers transformers sentencepiece tokenizers safetensors protobuf
    /tmp/refvenv/bin/python tests/reference/make_fixtures.py            # all stages
    /tmp/refvenv/bin/python tests/reference/make_fixtures.py unet text  # some stages

Each stage's script (make_<stage>_fixtures.py) seeds everything and writes tests/fixtures/<stage>/meta.json with
the library versions it used. Commit the regenerated files together with the code change that needed them.
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(stages):
    scripts = sorted(HERE.glob("make_*_fixtures.py"))
    if stages:
        scripts = [s for s in scripts if s.stem[len("make_"):-len("_fixtures")] in stages]
        if not scripts:
            sys.exit(f"no fixture script for {stages}; available: "
                     f"{[s.stem[5:-9] for s in sorted(HERE.glob('make_*_fixtures.py'))]}")
    for script in scripts:
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script)], check=True, cwd=HERE.parent.parent)


if __name__ == "__main__":
    main(sys.argv[1:])
