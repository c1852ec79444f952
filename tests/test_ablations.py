"""lessons/08_ablations.py: a row's summary over seeds, and --reuse reading only a run of the same settings."""
import importlib.util
import json
from pathlib import Path

import pytest

from tinybooth import train

SCRIPT = Path(__file__).resolve().parent.parent / "lessons" / "08_ablations.py"


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_row_is_summarised_by_mean_min_and_max_over_its_seeds(ablations):
    runs = [{"subject_probability": 0.9, "class_DIV": 0.2}, {"subject_probability": 0.6, "class_DIV": 0.1},
            {"subject_probability": 0.3}]
    summary = ablations.summarise(runs)
    assert summary["subject_probability"] == {"mean": 0.6, "min": 0.3, "max": 0.9}
    assert summary["class_DIV"] == {"mean": 0.15, "min": 0.1, "max": 0.2}, "a run without the score is left out"
    assert "sr_psnr_db" not in summary


def test_reuse_reads_a_finished_run_only_when_its_settings_are_the_same(ablations, tmp_path):
    s = train.parse(["--output-dir", str(tmp_path / "DreamBooth_s1"), "--seed", "1"])
    done = tmp_path / "elsewhere" / "metrics.json"
    assert not ablations.same_settings(s, done), "no run there yet"
    done.parent.mkdir()
    record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()}
    done.write_text(json.dumps({"settings": dict(record, output_dir=str(done.parent), identifier="fw")}))
    assert ablations.same_settings(s, done), "where it was written and the identifier found are not settings"
    done.write_text(json.dumps({"settings": dict(record, max_steps=record["max_steps"] + 1)}))
    assert not ablations.same_settings(s, done), "a run of other settings is trained again, not read"
