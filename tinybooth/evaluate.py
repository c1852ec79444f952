"""`python -m tinybooth.evaluate`: the paper's evaluation protocol (Sec. 4.1, "Dataset" and "Evaluation Metrics").

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

    python -m tinybooth.evaluate --model runs/dreambooth-IF-I-M-v1.0        # a tinybooth.train run: the subject,
                                                                           # class noun and [V] come from its
                                                                           # settings.json
    python -m tinybooth.evaluate --model weights/IF-I-M-v1.0 --sr-model weights/IF-II-M-v1.0 \\
        --subject-dir data/dog --class-noun dog --identifier sks
    python -m tinybooth.evaluate --images runs/dog/eval/images --subject-dir data/dog --class-noun dog
    python -m tinybooth.evaluate --model runs/dreambooth-toy                 # the toy-scale protocol
    python -m tinybooth.evaluate                                             # the embedded (unpersonalised) default

The paper's encoders load public weights from --weights-dir (default weights/): clip-vit-base-patch32 (openai),
dino-vits16 (facebook) and lpips-alex (tinybooth.lpips), fetched by `python weights_download.py NAME`.

Toy-scale protocol. On the embedded toy cascade and the runs trained from it (settings.json backbone "toy"), or on
pictures of at most 64 px, the public encoders mean nothing (they never saw a teal-and-pink star), so the same
command scores with the toy evaluator's analogs (ToyScorer): subject fidelity (cosine of the evaluator's features,
plus P(subject)), prompt fidelity (attributes read correctly), PRES (both, on "a star"), DIV (feature distance),
on TOY_TEMPLATES, 14 recontextualisation and property prompts in the toy world's words, sampled with the run's
own settings (the embedded default: TOY_SAMPLING). --scorer forces either scorer. Several --model runs (e.g. with
and without prior preservation, a wrong class noun, SR noise 1e-3 vs 1e-5, trained by tinybooth.train) are each
evaluated and then compared in one markdown table, the toy version of the paper's ablation tables:

    python -m tinybooth.evaluate --model runs/with-prior --model runs/no-prior --model runs/wrong-noun
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import checkpoint, data, files, metrics
from .errors import UserError, main_guard

ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


# ----------------------------------------------------------------------------------------------------------------
# prompts

def paper_prompts():
    """The DreamBooth dataset's prompt lists and class nouns (assets/dreambooth_prompts.json, CC BY 4.0)."""
    return json.loads((ASSETS / "dreambooth_prompts.json").read_text())


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
        raise ValueError(f"--prompts {prompts!r} is neither 'paper', 'toy' nor a text file of prompt templates")
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    templates = [ln for ln in lines if ln]
    if not templates:
        raise ValueError(f"prompt file '{path}' holds no prompts (one template per line, e.g. "
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
        raise ValueError(f"'{images_dir}' has no prompts.json. An image folder holds NN/k.png per prompt and a "
                         f'prompts.json like {{"prompts": {{"00": {{"prompt": "a sks dog in the snow", "text": '
                         f'"a dog in the snow"}}}}, "prior": {{"prompt": "a dog"}}}} (the prior folder is '
                         f"prior/)")
    layout = files.read_json(f)

    def images(sub):
        d = images_dir / sub
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
        if not files:
            raise ValueError(f"no images in '{d}' (expected k.png files generated for that prompt)")
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


# the toy cascade's sampling settings (tinybooth.train's toy defaults for its sample grids): IF's 100 steps would
# take hours for the protocol's ~60 images on a CPU, and the toy model draws clean shapes in 25
TOY_SAMPLING = dict(steps=25, sr_steps=25, guidance=5.0)


class ToyScorer:
    """The toy evaluator's analogs of the five metrics (see tinybooth.toy_evaluator):

        subject fidelity  DINO analog: cosine of the evaluator's features, generated vs real (metrics.subject_fidelity)
                          and P(subject) from its subject head
        prompt fidelity   CLIP-T analog: the fraction of the prompt's attributes read correctly
        PRES              the same subject fidelity and P(subject) on the class-prompt images (lower = better:
                          "a star" should draw stars of every colour, not the subject)
        DIV               mean pairwise feature distance 1 - cos(f_i, f_j) within a prompt (LPIPS analog)
    """

    def __init__(self, evaluator_dir=None, device="cpu"):
        from . import toy_evaluator
        self.toy = toy_evaluator
        self.device = device
        self.evaluator = toy_evaluator.ToyEvaluator.from_pretrained(evaluator_dir or toy_evaluator.DEFAULT_PATH,
                                                                    device=device)

    @torch.no_grad()
    def features(self, images):
        return self.evaluator.features(self.batch(images))

    def batch(self, images):
        return torch.stack([pil_to_tensor(im) for im in images]).to(self.device)  # [N, 3, H, W] in [-1, 1]

    @torch.no_grad()
    def feature_distance(self, a, b):
        """1 - cos(f(a), f(b)) per row of two image batches in [-1, 1]."""
        return 1 - torch.nn.functional.cosine_similarity(self.evaluator.features(a), self.evaluator.features(b))

    @torch.no_grad()
    def score(self, prompts, prior, real):
        gen = [im for p in prompts for im in p["images"]]
        f_real, f_gen, f_prior = self.features(real), self.features(gen), self.features(prior["images"])
        p_subject = self.toy.subject_probability(self.evaluator, self.batch(gen)).mean().item()
        p_prior = self.toy.subject_probability(self.evaluator, self.batch(prior["images"])).mean().item()
        fidelity = [self.toy.prompt_fidelity(self.evaluator, self.batch(p["images"]), p["text"]) for p in prompts]
        groups = [[pil_to_tensor(im).to(self.device) for im in p["images"]] for p in prompts]
        out = {"subject_fidelity": metrics.subject_fidelity(f_gen, f_real),
               "subject_probability": p_subject,
               "prompt_fidelity": torch.cat(fidelity).mean().item(),
               "PRES": metrics.prior_preservation(f_prior, f_real),
               "PRES_subject_probability": p_prior,
               "DIV": metrics.diversity(groups, self.feature_distance)}
        per_prompt, start = [], 0
        for p, fid in zip(prompts, fidelity):
            n = len(p["images"])
            per_prompt.append({"prompt": p["prompt"],
                               "subject_fidelity": metrics.subject_fidelity(f_gen[start:start + n], f_real),
                               "prompt_fidelity": fid.mean().item()})
            start += n
        return {"metrics": out, "real_images": {"subject_fidelity": metrics.real_image_fidelity(f_real)},
                "per_prompt": per_prompt}


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
# generation, through tinybooth.sample (the same code path as `python -m tinybooth.sample`)

def generate(model, sr_model, prompts, prior_prompt, images_dir, n, seed=0, steps=None, guidance=None,
             sr_steps=None, sr_noise_level=None, device="cpu", progress=True):
    """n images per prompt and of the class prompt, written as images_dir/NN/k.png, prior/k.png, prompts.json.

    Image k of every prompt uses seed + k (tinybooth.sample's rule), so prompts are compared on equal seeds."""
    from . import sample
    texts = [p["prompt"] for p in prompts] + [prior_prompt]
    level = {} if sr_noise_level is None else {"sr_noise_level": sr_noise_level}  # None: IF's default 250
    images = sample.generate(model, texts, sr_model=sr_model, num_images=n, seed=seed, steps=steps,
                             guidance=guidance, sr_steps=sr_steps, device=device, progress=progress,
                             **level)["images"]  # [(P + 1) n, 3, H, W] in [-1, 1]
    write_layout(images_dir, prompts, prior_prompt)
    for i, sub in enumerate([f"{i:02d}" for i in range(len(prompts))] + ["prior"]):
        (Path(images_dir) / sub).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            data.save_image(images[i * n + k], Path(images_dir) / sub / f"{k}.png")
    return images_dir


# ----------------------------------------------------------------------------------------------------------------
# the command line

def scoring_images(images_dir, subject_dir, scorer, weights_dir="weights", device="cpu"):
    """Score an image folder (NN/k.png + prior/k.png + prompts.json) against the real photos in subject_dir with
    the 'paper' or 'toy' scorer. Returns (result, prompts and prior with their PIL images, for the sheets)."""
    prompts, prior = read_layout(images_dir)
    real = [load_rgb(f) for f in data.list_images(subject_dir)]
    prompts = [{**p, "images": [load_rgb(f) for f in p["images"]]} for p in prompts]
    prior = {**prior, "images": [load_rgb(f) for f in prior["images"]]}
    s = ToyScorer(device=device) if scorer == "toy" else PaperScorer(weights_dir, device=device)
    return {"scorer": scorer, **s.score(prompts, prior, real)}, prompts, prior


def resolve(args):
    """Fill what the user left out: from a training run's settings.json (--model runs/NAME), from the embedded toy
    default (no --model, no --images), and pick the scorer (toy for the toy backbone or pictures <= 64 px)."""
    from . import sample
    toy = False
    sampling = {}
    if args.images is None and args.model is None:  # the embedded default: the pretrained toy cascade, unpersonalised
        args.model, args.sr_model, toy = sample.TOY_BASE, sample.TOY_SR, True
        toy_subject = json.loads((ASSETS / "toy_subject.json").read_text())
        args.subject_dir = args.subject_dir or Path(__file__).resolve().parent.parent / toy_subject["photos"]
        args.class_noun = args.class_noun or toy_subject["class_noun"]
    elif args.model is not None and (Path(args.model) / "settings.json").exists():  # a tinybooth.train run
        run = Path(args.model)
        settings = files.read_json(run / "settings.json")
        args.model = run / "model"
        args.sr_model = args.sr_model or (run / "sr_model" if (run / "sr_model").is_dir() else None)
        args.subject_dir = args.subject_dir or settings["instance_dir"]
        args.class_noun = args.class_noun if args.class_noun is not None else settings["class_noun"]
        args.identifier = args.identifier or settings["identifier"]
        toy = settings.get("backbone") == "toy"
        args.out = args.out or run / "eval"
        # sample the way the run sampled its grids; a fine-tuned SR stage at its fine-tuning augmentation level
        sampling = dict(steps=settings.get("sample_steps"), sr_steps=settings.get("sample_steps"),
                        guidance=settings.get("guidance"))
        if args.sr_model is not None and settings.get("sr_steps", 0) > 0:
            from .cascade import level_from_continuous
            from .schedule import DiscreteSchedule
            T = DiscreteSchedule.from_pretrained(Path(args.sr_model) / "image_noising_scheduler").num_train_timesteps
            sampling["sr_noise_level"] = level_from_continuous(settings["sr_noise_level"], T)
    elif args.model is not None:
        toy = Path(args.model).resolve() == Path(sample.TOY_BASE).resolve()
    if toy and not sampling:
        sampling = TOY_SAMPLING
    for k, v in sampling.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.subject_dir is None or args.class_noun is None:
        raise ValueError("--subject-dir and --class-noun are required (they are read from settings.json when "
                         "--model is a tinybooth.train run)")
    args.identifier = args.identifier or "sks"
    if args.scorer == "auto":
        if args.images is not None:
            first = read_layout(args.images)[0][0]["images"][0]  # (explains a folder without prompts.json)
            toy = max(load_rgb(first).size) <= 64  # the toy world's pictures are 64 x 64
        args.scorer = "toy" if toy else "paper"
    if args.prompts is None:
        args.prompts = "toy" if args.scorer == "toy" else "paper"
    args.out = Path(args.out or (Path(args.images).parent if args.images else Path(args.model) / "eval"))
    return args


def parse_args(argv=None):
    from .sample import parse_noise_level
    p = argparse.ArgumentParser(prog="python -m tinybooth.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="a tinybooth.train run directory (settings.json, model/, "
                   "sr_model/) or a pipeline directory (IF stage I or SD); default: the embedded toy cascade. "
                   "Repeat it to evaluate several runs and print one comparison table (the paper's ablations)")
    p.add_argument("--sr-model", help="IF stage-II directory for a pipeline --model")
    p.add_argument("--images", help="score this folder instead of generating (NN/k.png, prior/k.png, prompts.json)")
    p.add_argument("--subject-dir", help="the real photos of the subject")
    p.add_argument("--class-noun", help="the subject's class noun, e.g. dog")
    p.add_argument("--identifier", help="the identifier [V] the model was trained with (default: the run's, or sks)")
    p.add_argument("--prompts", help="'paper' (25 prompts; the live list for cats and dogs, the object list "
                                     "otherwise), 'toy', or a text file of templates with {identifier} and "
                                     "{class_noun}; default: paper, or toy with the toy scorer")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--scorer", choices=("auto", "paper", "toy"), default="auto",
                   help="paper: DINO, CLIP-I, CLIP-T, PRES, DIV with the public encoders in --weights-dir; toy: "
                        "the toy evaluator's analogs; auto: toy for the toy backbone or pictures of <= 64 px")
    p.add_argument("--weights-dir", default="weights", help="where weights_download.py put the encoders")
    p.add_argument("--steps", type=int, help="sampling steps (default: tinybooth.sample's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: tinybooth.sample's)")
    p.add_argument("--sr-steps", type=int, help="stage-II sampling steps (default: tinybooth.sample's)")
    p.add_argument("--sr-noise-level", type=parse_noise_level,
                   help="stage-II augmentation, an IF step (250) or the paper's continuous level (1e-5); default: "
                        "a run's SR fine-tuning level, else IF's 250")
    p.add_argument("--seed", type=int, default=0, help="image k of every prompt uses seed + k")
    p.add_argument("--out", help="output folder (default: <model>/eval, or the parent of --images)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def evaluate(args):
    """Generate (unless --images), score, write metrics.json and the contact sheets; returns the result dict."""
    if isinstance(args.model, list):  # parse_args collects --model in a list; main() loops over several
        if len(args.model) != 1:
            raise ValueError(f"evaluate() takes one model, got {args.model}")
        args.model = args.model[0]
    args = resolve(args)
    if args.images_per_prompt < 2:
        raise ValueError("--images-per-prompt must be at least 2: DIV compares images of the same prompt")
    images_dir = Path(args.images) if args.images else args.out / "images"
    if not args.images:
        templates = prompt_templates(args.class_noun, args.prompts)
        generate(args.model, args.sr_model, build_prompts(templates, args.identifier, args.class_noun),
                 fill("a {class_noun}", "", args.class_noun), images_dir, args.images_per_prompt, args.seed,
                 args.steps, args.guidance, args.sr_steps, args.sr_noise_level, args.device)
    result, prompts, prior = scoring_images(images_dir, args.subject_dir, args.scorer, args.weights_dir,
                                            args.device)
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    write_sheets(args.out, prompts, prior)
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


def main(argv=None):
    """The command: a mistake in the user's input ends as one `error: ...` line and exit status 2 (see errors)."""
    return main_guard(_main, argv)


def _main(argv):
    args = parse_args(argv)
    if args.model and args.images:
        print("error: give --model (generate, then score) or --images (score a folder), not both", file=sys.stderr)
        return 2
    results = {}
    try:
        for model in args.model or [None]:  # several --model: each is evaluated, then compared in one table
            run = argparse.Namespace(**{**vars(args), "model": model})
            if args.out and len(args.model or []) > 1:
                run.out = Path(args.out) / Path(model).name
            results[str(model)] = evaluate(run)
            print(json.dumps(results[str(model)]["metrics"], indent=1))
            print(f"wrote {run.out / 'metrics.json'} and the contact sheets in {run.out / 'sheets'}")
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from e  # library checks not yet UserErrors (e.g. scheduler configs): user input too
    if len(results) > 1:
        print(comparison_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
