"""The toy evaluator: a small CNN that reads a toy-world picture, and the toy analogs of the paper's metrics.

The paper scores personalisation with pretrained encoders (Sec. 4.1, "Evaluation metrics"):

    DINO, CLIP-I   subject fidelity: mean pairwise cosine similarity of image embeddings, generated vs real
    CLIP-T         prompt fidelity:  cosine similarity of the image embedding and the prompt's text embedding
    PRES           prior preservation: subject fidelity of "a [class noun]" generations (lower is better)
    DIV            diversity: mean distance between generations of the same prompt

In the toy world the truth is known, so the evaluator can *read* a picture instead of embedding it: one CNN with
a head per attribute (shape, colour, size, texture, background colour) and an "is it the subject?" head. Then

    prompt fidelity (CLIP-T analog)  = the fraction of the attributes a prompt names that are read correctly
                                       ("a red star on a green background": shape, colour, background colour)
    subject fidelity (DINO analog)   = mean pairwise cosine similarity of the CNN's penultimate features,
                                       generated vs real subject photos (`features` into tinybooth.metrics),
                                       and P(subject) from the subject head, a more readable score in [0, 1]
    PRES, DIV analogs                = subject fidelity of class-prompt generations; 1 - cosine of features

The evaluator sees 32 x 32 pictures (anything else is resized with tinybooth.data.resize_images, as the base
model's training images are). It is trained by `python -m tinybooth.pretrain_toy` on rendered pictures, the
subject in random contexts, and look-alikes (stars split into two other colours), and shipped in
tinybooth/assets/toy-evaluator/ (config.json + model.safetensors), loaded strictly like every other network.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinybooth import checkpoint as ckpt
from tinybooth import metrics
from tinybooth.toy import world
from tinybooth.data import resize_images

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "toy-evaluator"
ATTRIBUTES = ("shape", "colour", "size", "texture", "bg_colour")


@dataclass(frozen=True)
class EvaluatorConfig:
    """config.json of the evaluator: input resolution, conv widths, feature width, and the label names per head."""
    resolution: int = 32
    channels: tuple = (32, 64, 128)
    feature_dim: int = 128
    labels: dict = None  # attribute -> list of names; None: the toy world's

    def __post_init__(self):
        if self.labels is None:
            object.__setattr__(self, "labels", {"shape": list(world.SHAPES), "colour": list(world.COLOURS),
                                                "size": list(world.SIZES), "texture": list(world.TEXTURES),
                                                "bg_colour": list(world.COLOURS)})

    @classmethod
    def from_dict(cls, config):
        known = {"resolution", "channels", "feature_dim", "labels"}
        unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unsupported evaluator config field(s) {unknown}; expected {sorted(known)}")
        cfg = cls(**{k: (tuple(v) if k == "channels" else v) for k, v in config.items() if k in known})
        if sorted(cfg.labels) != sorted(ATTRIBUTES):
            raise ValueError(f"evaluator config labels has heads {sorted(cfg.labels)}; expected {sorted(ATTRIBUTES)}")
        return cfg


class ToyEvaluator(nn.Module):
    """Three conv stages (two 3x3 convs, GroupNorm, SiLU, 2x average pool) -> flatten -> features -> heads.

    [B, 3, 32, 32] -> [B, c1, 16, 16] -> [B, c2, 8, 8] -> [B, c3, 4, 4] -> flatten [B, 16 c3] -> [B, F]
    The flatten (rather than a global pool) keeps where things are, which size and background need.
    """

    def __init__(self, config):
        super().__init__()
        self.cfg = config if isinstance(config, EvaluatorConfig) else EvaluatorConfig.from_dict(config)
        self.config = {"_class_name": "ToyEvaluator", **asdict(self.cfg), "channels": list(self.cfg.channels)}
        layers, c_in = [], 3
        for c in self.cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(), nn.AvgPool2d(2)]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = self.cfg.resolution // 2 ** len(self.cfg.channels)
        self.proj = nn.Linear(c_in * side * side, self.cfg.feature_dim)
        self.heads = nn.ModuleDict({a: nn.Linear(self.cfg.feature_dim, len(self.cfg.labels[a])) for a in ATTRIBUTES})
        self.subject = nn.Linear(self.cfg.feature_dim, 1)

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @classmethod
    def from_pretrained(cls, path=DEFAULT_PATH, dtype=None, device=None):
        return ckpt.load_pretrained(cls, path, "model", dtype=dtype, device=device)

    def save_pretrained(self, path):
        return ckpt.save_pretrained(self, path, self.config, "model")

    def prepare(self, images):
        """[B, 3, H, W] in [-1, 1] at any size -> [B, 3, 32, 32] (antialiased bicubic, as the base model's data)."""
        r = self.cfg.resolution
        return images if images.shape[-1] == r else resize_images(images.float(), r)

    def features(self, images):
        """The penultimate features [B, F] (after SiLU): the embedding used for subject fidelity, PRES and DIV."""
        h = self.convs(self.prepare(images))  # [B, c3, 4, 4]
        return F.silu(self.proj(h.flatten(1)))  # [B, F]

    def forward(self, images):
        """Logits per head: {"shape": [B, 8], "colour": [B, 8], ..., "subject": [B]} and "features": [B, F]."""
        f = self.features(images)
        out = {a: head(f) for a, head in self.heads.items()}
        out["subject"] = self.subject(f).squeeze(1)  # [B]
        out["features"] = f
        return out


# ----------------------------------------------------------------------------------------------------------------
# reading pictures, and the metrics

@torch.no_grad()
def read(evaluator, images):
    """What the evaluator sees: a list (one per image) of {attribute: name, "subject": P(subject)}."""
    out = evaluator(images)
    names = {a: [evaluator.cfg.labels[a][i] for i in out[a].argmax(1).tolist()] for a in ATTRIBUTES}
    p_subject = torch.sigmoid(out["subject"]).tolist()
    return [{**{a: names[a][i] for a in ATTRIBUTES}, "subject": p_subject[i]} for i in range(len(images))]


def attribute_hits(reading, prompt):
    """{attribute: read == asked} for every world attribute the prompt names (world.parse_caption).

    A prompt that names the subject's class with an identifier ("a sks star") also asks for the subject; that is
    scored by subject fidelity, not here."""
    asked = world.parse_caption(prompt)
    return {a: reading[a] == v for a, v in asked.items()}


@torch.no_grad()
def prompt_fidelity(evaluator, images, prompts):
    """CLIP-T analog: per image, the fraction of the prompt's attributes read correctly; returns a tensor [B].

    prompts: one string per image (or one for all). A prompt naming no world attribute scores 1.
    """
    prompts = [prompts] * len(images) if isinstance(prompts, str) else prompts
    scores = []
    for reading, prompt in zip(read(evaluator, images), prompts):
        hits = attribute_hits(reading, prompt)
        scores.append(sum(hits.values()) / len(hits) if hits else 1.0)
    return torch.tensor(scores)


@torch.no_grad()
def subject_probability(evaluator, images):
    """P(the picture shows the subject) per image [B], from the subject head."""
    return torch.sigmoid(evaluator(images)["subject"])


@torch.no_grad()
def subject_fidelity(evaluator, images, real_images):
    """DINO analog: 1 / (N M) sum_{i,j} cos(f(x_i), f(x_j^real)) over the evaluator's features f (a float).

    The same formula as tinybooth.metrics.subject_fidelity, which computes it; with class-prompt generations as
    `images` it is the PRES analog."""
    return metrics.subject_fidelity(evaluator.features(images), evaluator.features(real_images))


@torch.no_grad()
def feature_distance(evaluator, a, b):
    """1 - cos(f(a_i), f(b_i)) per pair of images [B]: the DIV analog's distance (LPIPS in the paper), for
    tinybooth.metrics.diversity(groups, distance=lambda a, b: feature_distance(evaluator, a, b))."""
    return 1 - F.cosine_similarity(evaluator.features(a), evaluator.features(b), dim=1)
