"""The paper's evaluation protocol (Sec. 4.1, "Dataset" and "Evaluation Metrics"); `python -m tinybooth.evaluate`
runs it.

For one personalised model and its subject, the protocol

  1. takes the paper's 25 prompts (recontextualisation, accessorisation, property change; the *live* list for the
     dataset's cats and dogs, the *object* list otherwise), e.g. "a {identifier} {class_noun} in the jungle",
  2. generates N images per prompt (the paper: 4; here --images-per-prompt), plus N images of the bare class
     prompt "a {class_noun}" for prior preservation,
  3. scores them (tinybooth.metrics):
        DINO, CLIP-I   subject fidelity: generated vs the real photos of the subject (DINO ViT-S/16, CLIP ViT-B/32)
        CLIP-T         prompt fidelity: each image vs its prompt *without the identifier* ("a dog in the jungle";
                       the identifier is a rare token CLIP never learned a meaning for, so it would only add noise)
        PRES           prior preservation: DINO fidelity of the class-prompt images to the subject (lower = better)
        DIV            diversity: mean pairwise LPIPS between the images of one prompt (higher = more varied)
     and, as the ceiling of subject fidelity, the real photos against each other (Table 1, "Real Images"),
  4. writes OUT/metrics.json and one contact sheet per prompt (OUT/sheets/NN.png).

Generated images are kept under OUT/images/NN/k.png with OUT/images/prompts.json naming each folder's prompt, so a
folder of images generated elsewhere can be scored the same way: `--images DIR` (a folder with that layout).

`python -m tinybooth.evaluate --help` shows the command's forms.

The paper's encoders load public weights from --weights-dir (default weights/): clip-vit-base-patch32 (openai),
dino-vits16 (facebook) and lpips-alex (tinybooth.lpips), fetched by `python weights_download.py NAME`.

Toy-scale protocol. On the embedded toy cascade and the runs trained from it (settings.json family "toy"), or on
pictures of at most 64 px, the public encoders mean nothing (they never saw a teal-and-pink star), so the same
command scores with the toy evaluator's analogs (ToyScorer): subject fidelity (cosine of the evaluator's features,
plus P(subject)), prompt fidelity (attributes read correctly), PRES (both, on "a star"), DIV (feature distance),
on TOY_TEMPLATES, 14 recontextualisation and property prompts in the toy world's words, sampled with the run's
own settings (the embedded default: TOY_SAMPLING). --scorer forces either scorer. Several --model runs (e.g. with
and without prior preservation, a wrong class noun, SR noise 1e-3 vs 1e-5, trained by tinybooth.train) are each
evaluated and then compared in one markdown table, the toy version of the paper's ablation tables:

    python -m tinybooth.evaluate --model runs/with-prior --model runs/no-prior --model runs/wrong-noun
"""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import checkpoint, data, metrics, models
from .errors import UserError
from .files import read_json
from .generate import text_to_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


# ----------------------------------------------------------------------------------------------------------------
# prompts

def paper_prompts():
    """The DreamBooth dataset's prompt lists and class nouns (assets/dreambooth_prompts.json, CC BY 4.0)."""
    return json.loads((models.ASSETS / "dreambooth_prompts.json").read_text())


def prompt_templates(class_noun, prompts="paper"):
    """The templates to evaluate: 'paper': the live list for live class nouns (cat, dog), the object list otherwise;
    'toy': TOY_TEMPLATES; else the lines of a text file (one template per line with {identifier} and {class_noun};
    '#' starts a comment)."""
    if prompts == "toy":
        return list(TOY_TEMPLATES)
    if prompts == "paper":
        p = paper_prompts()
        return p["live_prompts"] if class_noun in p["live_class_nouns"] else p["object_prompts"]
    path = Path(prompts)
    if not path.is_file():
        raise UserError(f"--prompts {prompts!r} is neither 'paper', 'toy' nor a text file of prompt templates")
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    templates = [ln for ln in lines if ln]
    if not templates:
        raise UserError(f"prompt file '{path}' holds no prompts (one template per line, e.g. "
                         f"'a {{identifier}} {{class_noun}} on the beach')")
    return templates


def fill(template, identifier, class_noun):
    """'a {identifier} {class_noun} in the snow' -> 'a sks dog in the snow'; identifier '' drops it cleanly."""
    return " ".join(template.format(identifier=identifier, class_noun=class_noun).split())


def build_prompts(templates, identifier, class_noun):
    """[{prompt, text}]: `prompt` is what the model is asked for, `text` what CLIP-T compares with."""
    return [{"prompt": fill(t, identifier, class_noun), "text": fill(t, "", class_noun)} for t in templates]


# ----------------------------------------------------------------------------------------------------------------
# the image folder: images/NN/k.png + images/prompts.json

def write_layout(images_dir, prompts, prior_prompt):
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    layout = {"prompts": {f"{i:02d}": p for i, p in enumerate(prompts)},
              "prior": {"prompt": prior_prompt, "text": prior_prompt}}
    (images_dir / "prompts.json").write_text(json.dumps(layout, indent=1) + "\n")
    return layout


def read_layout(images_dir):
    """prompts.json of an image folder -> (prompts [{prompt, text, images: [paths]}], prior {prompt, images})."""
    images_dir = Path(images_dir)
    f = images_dir / "prompts.json"
    if not f.exists():
        raise UserError(f"'{images_dir}' has no prompts.json. An image folder holds NN/k.png per prompt and a "
                         f'prompts.json like {{"prompts": {{"00": {{"prompt": "a sks dog in the snow", "text": '
                         f'"a dog in the snow"}}}}, "prior": {{"prompt": "a dog"}}}} (the prior folder is '
                         f"prior/)")
    layout = read_json(f)

    def images(sub):
        d = images_dir / sub
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
        if not files:
            raise UserError(f"no images in '{d}' (expected k.png files generated for that prompt)")
        return files

    prompts = [{**p, "images": images(k)} for k, p in sorted(layout["prompts"].items())]
    prior = {**layout["prior"], "images": images("prior")}
    return prompts, prior


def load_rgb(path):
    return data.open_image(path).convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# the encoders of the paper's metrics

class PaperScorer:
    """CLIP ViT-B/32 (image + text side), DINO ViT-S/16 and LPIPS(alex), loaded from public weights."""

    NAMES = {"clip": "clip-vit-base-patch32", "dino": "dino-vits16", "lpips": "lpips-alex"}

    def __init__(self, weights_dir, device="cpu"):
        from .lpips import LPIPS
        from .vit import CLIPTextEmbedder, CLIPVisionEncoder, DINOEncoder
        dirs = {k: Path(weights_dir) / v for k, v in self.NAMES.items()}
        missing = [f"{dirs[k]}  (python weights_download.py {v} --dir {weights_dir})"
                   for k, v in self.NAMES.items() if not (dirs[k] / "config.json").exists()]
        if missing:
            raise checkpoint.CheckpointError("the evaluation encoders' weights are missing:\n  " + "\n  ".join(missing))
        self.device = device
        self.clip = CLIPVisionEncoder.from_pretrained(dirs["clip"], device=device)
        self.clip_text = CLIPTextEmbedder.from_pretrained(dirs["clip"], device=device)
        self.dino = DINOEncoder.from_pretrained(dirs["dino"], device=device)
        self.lpips = LPIPS.from_pretrained(dirs["lpips"], device=device)

    @torch.no_grad()
    def score(self, prompts, prior, real):
        """prompts: [{prompt, text, images: [PIL]}]; prior: {images: [PIL]}; real: [PIL] -> the paper's metrics."""
        gen = [im for p in prompts for im in p["images"]]
        texts = [p["text"] for p in prompts for _ in p["images"]]
        dino_real, clip_real = self.dino.embed(real), self.clip.embed(real)
        dino_gen, clip_gen = self.dino.embed(gen), self.clip.embed(gen)
        text = self.clip_text.embed(texts)
        groups = [[pil_to_tensor(at_least(im, 64)).to(self.device) for im in p["images"]] for p in prompts]
        out = {"DINO": metrics.subject_fidelity(dino_gen, dino_real),
               "CLIP-I": metrics.subject_fidelity(clip_gen, clip_real),
               "CLIP-T": metrics.prompt_fidelity(clip_gen, text),
               "PRES": metrics.prior_preservation(self.dino.embed(prior["images"]), dino_real),
               "DIV": metrics.diversity(groups, self.lpips)}
        ceiling = {"DINO": metrics.real_image_fidelity(dino_real), "CLIP-I": metrics.real_image_fidelity(clip_real)}
        per_prompt, start = [], 0
        for p in prompts:
            n = len(p["images"])
            sl = slice(start, start + n)
            start += n
            per_prompt.append({"prompt": p["prompt"],
                               "DINO": metrics.subject_fidelity(dino_gen[sl], dino_real),
                               "CLIP-I": metrics.subject_fidelity(clip_gen[sl], clip_real),
                               "CLIP-T": metrics.prompt_fidelity(clip_gen[sl], text[sl])})
        return {"metrics": out, "real_images": ceiling, "per_prompt": per_prompt,
                "paper_table_1": PAPER_TABLE_1}


PAPER_TABLE_1 = {"DreamBooth (Imagen)": {"DINO": 0.696, "CLIP-I": 0.812, "CLIP-T": 0.306},
                 "DreamBooth (Stable Diffusion)": {"DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305},
                 "Textual Inversion (Stable Diffusion)": {"DINO": 0.569, "CLIP-I": 0.780, "CLIP-T": 0.255},
                 "Real Images": {"DINO": 0.774, "CLIP-I": 0.885}}


def at_least(img, side):
    """LPIPS(alex) needs >= 64 px (AlexNet's strides): smaller pictures are upscaled (bicubic) first."""
    w, h = img.size
    if min(w, h) >= side:
        return img
    scale = side / min(w, h)
    return img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)


def pil_to_tensor(img):
    """PIL -> [3, H, W] in [-1, 1] (LPIPS' input range)."""
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------------
# the toy-scale protocol: the embedded default is scored by the toy evaluator (tinybooth.toy_evaluator)

# the toy analog of the paper's 25 prompts: recontextualisation (backgrounds the subject photos never show) and
# property changes (size, colour), in words the toy world knows
TOY_TEMPLATES = (
    "a {identifier} {class_noun} on a green background",
    "a {identifier} {class_noun} on a striped blue background",
    "a {identifier} {class_noun} on a dotted yellow background",
    "a {identifier} {class_noun} on a checkered white background",
    "a {identifier} {class_noun} on a purple background",
    "a {identifier} {class_noun} on a striped orange background",
    "a {identifier} {class_noun} on a dotted black background",
    "a {identifier} {class_noun} on a checkered red background",
    "a big {identifier} {class_noun}",
    "a small {identifier} {class_noun}",
    "a big {identifier} {class_noun} on a blue background",
    "a small {identifier} {class_noun} on a striped green background",
    "a red {identifier} {class_noun}",
    "a yellow {identifier} {class_noun} on a dotted blue background",
)


class ToyScorer:
    """The toy evaluator's analogs of the five metrics (tinybooth.toy.scoring): subject fidelity and P(subject),
    prompt fidelity, PRES (on "a star"), DIV (feature distance)."""

    def __init__(self, evaluator_dir=None, device="cpu"):
        from .toy import evaluator
        self.device = device
        self.evaluator = evaluator.ToyEvaluator.from_pretrained(evaluator_dir or evaluator.DEFAULT_PATH, device=device)

    def batch(self, images):
        return torch.stack([pil_to_tensor(im) for im in images]).to(self.device)  # [N, 3, H, W] in [-1, 1]

    @torch.no_grad()
    def score(self, prompts, prior, real):
        from .toy import scoring
        subject = [(p["text"], self.batch(p["images"])) for p in prompts]
        real = self.batch(real)
        return {"metrics": scoring.score(self.evaluator, subject, self.batch(prior["images"]), real),
                "real_images": {"subject_fidelity": round(float(metrics.real_image_fidelity(
                    self.evaluator.features(real))), 4)},
                "per_prompt": scoring.per_prompt(self.evaluator, subject, real)}


# ----------------------------------------------------------------------------------------------------------------
# contact sheets

def contact_sheet(images, title, size=160):
    """One row of images (each scaled to size x size) under a title line: a PNG per prompt."""
    pad, head = 4, 24
    sheet = Image.new("RGB", (pad + len(images) * (size + pad), head + size + pad), "white")
    ImageDraw.Draw(sheet).text((pad, 4), title, fill="black", font=ImageFont.load_default(size=14))
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((size, size), Image.BICUBIC), (pad + i * (size + pad), head))
    return sheet


def write_sheets(out_dir, prompts, prior):
    sheets = Path(out_dir) / "sheets"
    sheets.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(prompts):
        contact_sheet(p["images"], p["prompt"]).save(sheets / f"{i:02d}.png")
    contact_sheet(prior["images"], f"{prior['prompt']}  (prior preservation)").save(sheets / "prior.png")
    return sheets


# ----------------------------------------------------------------------------------------------------------------
# generation (tinybooth.generate.text_to_image, the code path of `python -m tinybooth.sample`) and scoring

def generate_images(model, sr_model, prompts, prior_prompt, images_dir, n, seed=0, steps=None, guidance=None,
                    sr_steps=None, sr_noise_level=None, device="cpu", progress=True):
    """n images per prompt and of the class prompt, written as images_dir/NN/k.png, prior/k.png, prompts.json.

    Image k of every prompt uses seed + k, so prompts are compared on equal seeds."""
    texts = [p["prompt"] for p in prompts] + [prior_prompt]
    level = {} if sr_noise_level is None else {"sr_noise_level": sr_noise_level}  # None: IF's default 250
    images = text_to_image(model, texts, sr_model=sr_model, num_images=n, seed=seed, steps=steps, guidance=guidance,
                           sr_steps=sr_steps, device=device, progress=progress, **level)["images"]
    write_layout(images_dir, prompts, prior_prompt)
    for i, sub in enumerate([f"{i:02d}" for i in range(len(prompts))] + ["prior"]):
        (Path(images_dir) / sub).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            data.save_image(images[i * n + k], Path(images_dir) / sub / f"{k}.png")
    return images_dir


def scoring_images(images_dir, subject_dir, scorer, weights_dir="weights", device="cpu"):
    """Score an image folder (NN/k.png + prior/k.png + prompts.json) against the real photos in subject_dir with
    the 'paper' or 'toy' scorer. Returns (result, prompts and prior with their PIL images, for the sheets)."""
    prompts, prior = read_layout(images_dir)
    real = [load_rgb(f) for f in data.list_images(subject_dir)]
    prompts = [{**p, "images": [load_rgb(f) for f in p["images"]]} for p in prompts]
    prior = {**prior, "images": [load_rgb(f) for f in prior["images"]]}
    s = ToyScorer(device=device) if scorer == "toy" else PaperScorer(weights_dir, device=device)
    return {"scorer": scorer, **s.score(prompts, prior, real)}, prompts, prior


def run_settings(model):
    """What a --model argument implies, as keyword arguments of evaluate(): the embedded toy default (None), a
    tinybooth.train run (its settings.json names the subject, class noun, identifier and how it sampled), or a
    pipeline directory (nothing beyond itself)."""
    if model is None:  # the embedded default: the pretrained toy cascade, unpersonalised
        info = json.loads(models.TOY_SUBJECT_INFO.read_text())
        return dict(model=models.TOY_BASE, sr_model=models.TOY_SR, subject_dir=models.ROOT / info["photos"],
                    class_noun=info["class_noun"], toy=True)
    run = Path(model)
    if not (run / "settings.json").exists():
        return dict(model=run, toy=run.is_dir() and models.is_toy(run))
    settings = read_json(run / "settings.json")
    sr_model = run / "sr_model" if (run / "sr_model").is_dir() else None
    out = dict(model=run / "model", sr_model=sr_model, subject_dir=settings["instance_dir"],
               class_noun=settings["class_noun"], identifier=settings["identifier"], out=run / "eval",
               toy=settings.get("family") == "toy", steps=settings.get("sample_steps"),
               sr_steps=settings.get("sample_steps"), guidance=settings.get("guidance"))
    if sr_model is not None and settings.get("sr_steps", 0) > 0:  # sample SR at its fine-tuning level
        from .cascade import level_from_continuous
        from .schedule import DiscreteSchedule
        T = DiscreteSchedule.from_pretrained(sr_model / "image_noising_scheduler").num_train_timesteps
        out["sr_noise_level"] = level_from_continuous(settings["sr_noise_level"], T)
    return out


def choose_scorer(scorer, toy, images):
    """'paper' or 'toy': as asked, or (auto) toy for the toy model or pictures of <= 64 px."""
    if scorer != "auto":
        return scorer
    if images is not None:
        first = read_layout(images)[0][0]["images"][0]  # (explains a folder without prompts.json)
        toy = max(load_rgb(first).size) <= 64  # the toy world's pictures are 64 x 64
    return "toy" if toy else "paper"


def evaluate(out, subject_dir, class_noun, identifier="sks", model=None, sr_model=None, images=None, scorer="paper",
             prompts=None, images_per_prompt=4, weights_dir="weights", steps=None, guidance=None, sr_steps=None,
             sr_noise_level=None, seed=0, device="cpu"):
    """Generate (unless images names a folder), score, write out/metrics.json and out/sheets/; returns the result.
    prompts: 'paper', 'toy' or a template file (default: the scorer's). Unset sampling settings take the model
    family's defaults (tinybooth.models.FAMILY_DEFAULTS)."""
    if images_per_prompt < 2:
        raise UserError("--images-per-prompt must be at least 2: DIV compares images of the same "
                                         "prompt")
    out = Path(out)
    images_dir = Path(images) if images else out / "images"
    settings = dict(locals())
    if not images:
        templates = prompt_templates(class_noun, prompts or ("toy" if scorer == "toy" else "paper"))
        generate_images(model, sr_model, build_prompts(templates, identifier, class_noun),
                        fill("a {class_noun}", "", class_noun), images_dir, images_per_prompt, seed, steps,
                        guidance, sr_steps, sr_noise_level, device)
    result, scored_prompts, prior = scoring_images(images_dir, subject_dir, scorer, weights_dir, device)
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    write_sheets(out, scored_prompts, prior)
    return result


def comparison_table(results):
    """A markdown table, one row per evaluated model: its name, the training settings the paper's ablations vary
    (read from the run's settings.json when there is one) and every metric."""
    keys = list(next(iter(results.values()))["metrics"])
    head = ["model", "prior preservation", "class noun", "SR noise level"] + keys
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        run = Path(name) / "settings.json"
        t = json.loads(run.read_text()) if run.exists() else {}
        cells = [Path(name).name, t.get("prior_preservation", "-"), repr(t["class_noun"]) if "class_noun" in t
                 else "-", t.get("sr_noise_level", "-")] + [f"{r['metrics'][k]:.3f}" for k in keys]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)
