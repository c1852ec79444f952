"""python -m tinybooth.evaluate: prompt sets, the image-folder layout, and scoring end to end on tiny encoders."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tinybooth import evaluate, toyworld
from tinybooth.lpips import CONFIG, LPIPS


def test_paper_prompt_lists_are_chosen_by_class_noun():
    live, obj = evaluate.prompt_templates("dog"), evaluate.prompt_templates("backpack")
    assert len(live) == 25 and len(obj) == 25, "the paper evaluates 25 prompts per subject"
    assert "a {identifier} {class_noun} wearing a santa hat" in live, "cats and dogs get the live-subject list"
    assert "a {identifier} {class_noun} on top of a mirror" in obj, "objects get the object list"
    assert live[:10] == obj[:10] and live[20:] == obj[20:], "the two lists share recontextualisation and properties"
    assert evaluate.paper_prompts()["subjects"]["dog8"] == "dog"


def test_clip_t_text_drops_the_identifier():
    (p,) = evaluate.build_prompts(["a {identifier} {class_noun} in the snow"], "sks", "dog")
    assert p == {"prompt": "a sks dog in the snow", "text": "a dog in the snow"}


def test_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\na {identifier} {class_noun} on the moon\n\na red {identifier} {class_noun}  # colour\n")
    assert evaluate.prompt_templates("dog", f) == ["a {identifier} {class_noun} on the moon",
                                                   "a red {identifier} {class_noun}"]
    with pytest.raises(ValueError, match="neither"):
        evaluate.prompt_templates("dog", tmp_path / "missing.txt")


def make_folder(root, prompts, n=2, side=64):
    """An image folder in evaluate's layout, filled with toy-world pictures (64 px: LPIPS needs >= 64)."""
    evaluate.write_layout(root, prompts, "a star")
    rng = np.random.default_rng(0)
    for sub in [f"{i:02d}" for i in range(len(prompts))] + ["prior"]:
        (root / sub).mkdir()
        for k in range(n):
            Image.fromarray(toyworld.render(toyworld.random_spec(rng), side)).save(root / sub / f"{k}.png")


@pytest.fixture
def weights_dir(tmp_path, request):
    """clip-vit-base-patch32 / dino-vits16 / lpips-alex stand-ins: the tiny random fixture encoders and a random
    LPIPS (public weights cannot be downloaded in tests)."""
    fx = request.config.rootpath / "tests" / "fixtures" / "vit"
    w = tmp_path / "weights"
    shutil.copytree(fx / "clip", w / "clip-vit-base-patch32")
    shutil.copytree(fx / "dino", w / "dino-vits16")
    LPIPS.from_config(CONFIG).save_pretrained(w / "lpips-alex")
    return w


def test_missing_encoder_weights_name_the_download_command(tmp_path):
    with pytest.raises(Exception, match="weights_download.py dino-vits16"):
        evaluate.PaperScorer(tmp_path)


def test_read_layout_explains_a_bad_folder(tmp_path):
    with pytest.raises(ValueError, match="prompts.json"):
        evaluate.read_layout(tmp_path)


@pytest.fixture
def tiny_cascade(request, monkeypatch):
    """The tiny random IF stage I (8 px) of tests/fixtures/cascade, with the text side replaced
    by a fixed embedding per prompt (as tests/test_sample.py does; tests/test_cascade.py covers encode_prompts)."""
    from tinybooth import cascade

    def encode(texts, model_dir, family, **kw):
        c = torch.stack([torch.randn(5, 16, generator=torch.Generator().manual_seed(len(t))) for t in texts])
        return c, torch.ones(len(texts), 5, dtype=torch.long)
    monkeypatch.setattr(cascade, "encode_prompts", encode)
    return request.config.rootpath / "tests" / "fixtures" / "cascade"


def test_cli_generates_scores_and_writes_json_and_sheets(tiny_cascade, weights_dir, tmp_path, request):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {identifier} {class_noun} in the snow\na red {identifier} {class_noun}\n")
    subject = request.config.rootpath / "tests" / "data" / "dreambooth" / "dog"
    out = tmp_path / "eval"
    code = evaluate.main(["--model", str(tiny_cascade / "if1"),
                          "--subject-dir", str(subject), "--class-noun", "dog", "--prompts", str(prompts),
                          "--images-per-prompt", "2", "--steps", "1", "--scorer", "paper",
                          "--weights-dir", str(weights_dir), "--out", str(out)])
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["metrics"]) == {"DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"}
    assert all(-1 <= result["metrics"][k] <= 1 for k in ("DINO", "CLIP-I", "CLIP-T", "PRES"))
    assert [p["prompt"] for p in result["per_prompt"]] == ["a sks dog in the snow", "a red sks dog"]
    layout = json.loads((out / "images" / "prompts.json").read_text())
    assert layout["prompts"]["00"]["text"] == "a dog in the snow" and layout["prior"]["prompt"] == "a dog"
    assert sorted(p.name for p in (out / "images" / "01").iterdir()) == ["0.png", "1.png"]
    assert Image.open(out / "images" / "prior" / "0.png").size == (8, 8), "stage I's 8 px output"
    assert sorted(p.name for p in (out / "sheets").iterdir()) == ["00.png", "01.png", "prior.png"]

    # the same folder scored again with --images gives the same numbers (generation is not part of the score)
    again = evaluate.evaluate(evaluate.parse_args(
        ["--images", str(out / "images"), "--subject-dir", str(subject), "--class-noun", "dog",
         "--scorer", "paper", "--weights-dir", str(weights_dir), "--out", str(tmp_path / "again")]))
    assert again["metrics"] == pytest.approx(result["metrics"], abs=1e-6)


def test_cli_errors_are_one_line_messages(tmp_path, capsys):
    assert evaluate.main(["--images", str(tmp_path), "--subject-dir", str(tmp_path), "--class-noun", "dog",
                          "--scorer", "paper"]) == 2
    assert "prompts.json" in capsys.readouterr().err
    assert evaluate.main(["--model", "x", "--images", "y"]) == 2


def test_toy_scorer_is_chosen_for_toy_pictures_and_reports_the_analogs(tmp_path, monkeypatch, request):
    """Pictures of <= 64 px are the toy world's: scored by the toy evaluator's analogs (a random one here; the
    shipped evaluator is tested by its own tests)."""
    from tinybooth import toy_evaluator
    torch.manual_seed(0)
    toy_evaluator.ToyEvaluator.from_config({}).save_pretrained(tmp_path / "evaluator")
    monkeypatch.setattr(toy_evaluator, "DEFAULT_PATH", tmp_path / "evaluator")
    images = tmp_path / "images"
    make_folder(images, evaluate.build_prompts(evaluate.TOY_TEMPLATES[:2], "sks", "star"), n=3)
    subject = request.config.rootpath / "examples" / "toy_subject"  # the shipped toy subject photos
    result = evaluate.evaluate(evaluate.parse_args(["--images", str(images), "--subject-dir", str(subject),
                                                    "--class-noun", "star"]))
    assert result["scorer"] == "toy", "64 px pictures must be scored by the toy evaluator"
    m = result["metrics"]
    assert set(m) == {"subject_fidelity", "subject_probability", "prompt_fidelity", "PRES",
                      "PRES_subject_probability", "DIV"}
    assert 0 <= m["prompt_fidelity"] <= 1 and 0 <= m["subject_probability"] <= 1 and m["DIV"] >= 0
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "sheets" / "prior.png").exists()


def test_comparison_table_reads_the_ablation_settings_of_each_run(tmp_path):
    runs = {}
    for name, prior, noun in [("with-prior", True, "star"), ("no-prior", False, "star"), ("no-noun", True, "")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "settings.json").write_text(json.dumps(
            {"prior_preservation": prior, "class_noun": noun, "sr_noise_level": 1e-5}))
        runs[str(tmp_path / name)] = {"metrics": {"subject_fidelity": 0.5, "PRES": 0.25 if prior else 0.75}}
    table = evaluate.comparison_table(runs).splitlines()
    assert table[0] == "| model | prior preservation | class noun | SR noise level | subject_fidelity | PRES |"
    assert table[3] == "| no-prior | False | 'star' | 1e-05 | 0.500 | 0.750 |"
    assert table[4].startswith("| no-noun | True | '' |"), "an empty class noun (the paper's ablation) shows as ''"


@pytest.mark.slow
def test_cli_on_the_embedded_toy_default(tmp_path):
    """No --model: the shipped toy cascade (stage I + II) and toy subject, scored by the shipped toy evaluator."""
    from tinybooth import sample
    if not (sample.TOY_BASE / "unet").is_dir() or not (sample.TOY_SR / "unet").is_dir():
        pytest.skip("the embedded toy cascade is not in tinybooth/assets")
    prompts = tmp_path / "one.txt"
    prompts.write_text("a {identifier} {class_noun} on a green background\n")
    assert evaluate.main(["--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "2", "--sr-steps", "2",
                          "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["scorer"] == "toy" and result["settings"]["class_noun"] == "star"
    assert result["settings"]["guidance"] == evaluate.TOY_SAMPLING["guidance"], "toy sampling defaults apply"
    assert Image.open(tmp_path / "eval" / "images" / "00" / "0.png").size == (64, 64), "stage II's 64 px"


def test_auto_scorer_on_a_folder_without_prompts_json_explains_the_layout(tmp_path, capsys):
    (tmp_path / "00").mkdir()
    assert evaluate.main(["--images", str(tmp_path), "--subject-dir", str(tmp_path), "--class-noun", "dog"]) == 2
    assert "prompts.json" in capsys.readouterr().err


def test_a_training_run_supplies_subject_noun_identifier_and_its_sampling(tmp_path, request):
    """--model runs/NAME: settings.json gives the subject, class noun, [V], the grids' steps and guidance, and
    the SR stage samples at its fine-tuning augmentation level (paper: 1e-5 -> IF step 0)."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    shutil.copytree(request.config.rootpath / "tests" / "fixtures" / "cascade" / "if2", run / "sr_model")
    (run / "settings.json").write_text(json.dumps(dict(
        instance_dir="photos/dog", class_noun="dog", identifier="zwx", backbone="if", sample_steps=7, guidance=3.0,
        sr_steps=10, sr_noise_level=1e-5)))
    args = evaluate.parse_args(["--model", str(run)])
    args.model = args.model[0]
    args = evaluate.resolve(args)
    assert (args.model, args.sr_model, args.out) == (run / "model", run / "sr_model", run / "eval")
    assert (args.subject_dir, args.class_noun, args.identifier) == ("photos/dog", "dog", "zwx")
    assert (args.steps, args.sr_steps, args.guidance, args.sr_noise_level) == (7, 7, 3.0, 0)
    assert (args.scorer, args.prompts) == ("paper", "paper")
