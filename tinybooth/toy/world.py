"""The toy world: captioned pictures of coloured shapes, drawn procedurally and deterministically from a seed.

DreamBooth needs a text-to-image model with a *prior*: it knows what "a star" looks like in many colours, sizes and
places, and fine-tuning must bind a rare identifier [V] to one specific star without forgetting the others (paper
Sec. 4). Public priors (Imagen, IF) are learned from billions of captioned photos; the embedded default learns its
prior from this small world instead, which anyone can regenerate:

    a picture = one shape (the class noun) of a colour and a size, at a position, on a background
    caption   = "a small red star on a striped blue background" (attributes are left out at random, so that
                "a star" means "a star of any colour, size, on any background": the class prior)

    shapes       circle, square, triangle, star, heart, diamond, cross, moon          (the class nouns)
    colours      red, orange, yellow, green, blue, purple, white, black
    sizes        small, big
    backgrounds  plain / striped / dotted / checkered, in any of the colours (never the shape's own)
    two colours  optionally (two_colour_fraction), shapes split down the middle into two of the colours: "a red
                 and blue heart"; the shipped weights were pretrained without them

The *subject* is one specific star that the world never draws: split down the middle into teal and pink, two
colours no world object has. The world can also draw other split shapes, in two of its own colours, so that a
model pretrained on them could render a split star before it has seen this one (the subject's colours stay
unseen); a CPU trial of that is in benchmarks/toy_recipes.md. `subject_photos` renders the 4-5 "photos" of the
subject that DreamBooth fine-tunes on (shipped as examples/toy_subject/*.png), and `render(Spec(..., subject=True))`
puts it anywhere else.

Pictures are drawn at 4x resolution with Pillow and box-filtered down (anti-aliasing), at 64 x 64: the size of the
super-resolution stage's output. The base model sees them shrunk to 32 x 32 (tinybooth.data.resize_images).
Every random choice comes from a numpy Generator seeded by the caller, so a seed gives the same pictures and
captions on every machine.
"""
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "moon")
COLOURS = {"red": (220, 35, 35), "orange": (250, 140, 20), "yellow": (245, 215, 40), "green": (40, 160, 60),
           "blue": (35, 75, 215), "purple": (135, 55, 175), "white": (245, 245, 245), "black": (25, 25, 25)}
SIZES = ("small", "big")
TEXTURES = ("plain", "striped", "dotted", "checkered")
SUBJECT_COLOURS = ((0, 165, 165), (255, 105, 185))  # teal | pink: the subject's left and right halves
SUBJECT_CLASS = "star"
RESOLUTION = 64  # pictures are drawn at 64 x 64; the base model sees them at 32 x 32
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges
RADIUS = {"small": (0.19, 0.24), "big": (0.32, 0.40)}  # shape radius as a fraction of the side, per size
CAPTION_DROP = dict(size=0.3, colour=0.2, texture=0.25, bg_colour=0.25)  # P(attribute left out of a caption)


@dataclass(frozen=True)
class Spec:
    """Everything that decides a picture. Position (cx, cy) and radius are fractions of the image side; angle in
    degrees; subject=True draws the teal/pink subject star instead of a one-colour shape (colour is then None);
    colour2 makes a two-colour shape, left half colour, right half colour2, split as the subject is."""
    shape: str
    colour: str
    size: str
    texture: str
    bg_colour: str
    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.3
    angle: float = 0.0
    subject: bool = False
    colour2: str = None


# ----------------------------------------------------------------------------------------------------------------
# random pictures and their captions

def random_spec(rng, two_colour=False, **fixed):
    """A random picture spec; keyword arguments fix attributes (e.g. shape="star", bg_colour="green").

    Unfixed attributes are drawn uniformly; the background colour always differs from the shape's colour(s).
    two_colour=True draws a second, different colour for the shape's right half."""
    shape = fixed.pop("shape", None) or SHAPES[rng.integers(len(SHAPES))]
    subject = fixed.pop("subject", False)
    colour = None if subject else (fixed.pop("colour", None) or list(COLOURS)[rng.integers(len(COLOURS))])
    fixed.pop("colour", None)
    colour2 = None
    if two_colour and not subject:
        others = [c for c in COLOURS if c != colour]
        colour2 = others[rng.integers(len(others))]
    size = fixed.pop("size", None) or SIZES[rng.integers(len(SIZES))]
    texture = fixed.pop("texture", None) or TEXTURES[rng.integers(len(TEXTURES))]
    bg_colour = fixed.pop("bg_colour", None)
    if bg_colour is None:
        choices = [c for c in COLOURS if c not in (colour, colour2)]
        bg_colour = choices[rng.integers(len(choices))]
    if fixed:
        raise ValueError(f"unknown picture attribute(s) {sorted(fixed)}; use shape, colour, size, texture, "
                         f"bg_colour or subject")
    radius = float(rng.uniform(*RADIUS[size]))
    margin = radius + 0.03  # keep the whole shape inside the picture
    cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
    angle = float(rng.uniform(-12, 12))
    return Spec(shape, colour, size, texture, bg_colour, cx, cy, radius, angle, subject, colour2)


def caption(spec, rng=None, identifier=None):
    """The plain-English caption of a spec: "a small red star on a striped blue background".

    With rng, attributes are left out at random (CAPTION_DROP), as alt-texts leave things out; without, the full
    caption. identifier (e.g. "sks") is put before the class noun: "a sks star on a green background".
    """
    keep = lambda attr: rng is None or rng.random() >= CAPTION_DROP[attr]
    words = ["a"]
    if keep("size"):
        words.append(spec.size)
    if spec.colour is not None and keep("colour"):
        words += [spec.colour, "and", spec.colour2] if spec.colour2 else [spec.colour]
    if identifier:
        words.append(identifier)
    words.append(spec.shape)
    texture = spec.texture if spec.texture != "plain" and keep("texture") else None
    bg_colour = spec.bg_colour if keep("bg_colour") else None
    if texture or bg_colour:
        words += ["on", "a"] + [w for w in (texture, bg_colour) if w] + ["background"]
    if words[1] == "orange":
        words[0] = "an"  # the only world word that starts with a vowel; identifiers keep "a" ("a [V] dog")
    return " ".join(words)


def parse_caption(text):
    """The attributes a caption asks for, as a dict with keys among shape, colour, size, texture, bg_colour.

    Words the world does not know (an identifier like "sks", "photo", "of") are ignored. Colour words before the
    shape are its colour, after it the background's; "on a red background" implies texture "plain" only when
    written ("plain"), since a caption may leave the texture out.
    """
    words = text.lower().replace(",", " ").replace(".", " ").split()
    attrs = {}
    seen_shape = False
    for w in words:
        if w in SHAPES and not seen_shape:
            attrs["shape"], seen_shape = w, True
        elif w in SIZES and not seen_shape:
            attrs["size"] = w
        elif w in COLOURS:
            attrs["bg_colour" if seen_shape else "colour"] = w
        elif w in TEXTURES and seen_shape:
            attrs["texture"] = w
    return attrs


def spec_from_caption(text, rng):
    """A random picture that fits a caption: attributes it names are fixed, the others drawn from rng."""
    return random_spec(rng, **parse_caption(text))


# ----------------------------------------------------------------------------------------------------------------
# drawing

def _polygon(shape, cx, cy, r, angle):
    """The outline of a one-piece shape as a list of (x, y) points (pixels), rotated by angle degrees."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians([45, 135, 225, 315])]
        pts = [(x * 0.85 * math.sqrt(2), y * 0.85 * math.sqrt(2)) for x, y in pts]  # side 1.7 r
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a) + 0.15) for a in np.radians([-90, 30, 150])]
    elif shape == "star":  # five points, inner radius 0.45 of the outer
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a) + 0.05)
               for k, a in enumerate(np.radians(-90 + 36 * np.arange(10)))]
    elif shape == "heart":  # the classic parametric heart curve, scaled to radius 1
        s = np.linspace(0, 2 * math.pi, 60, endpoint=False)
        x = 16 * np.sin(s) ** 3
        y = -(13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s))
        pts = list(zip(x / 16.5, (y + 2.5) / 16.5))
    elif shape == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "cross":
        a, b = 0.33, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
               (-a, -a)]
    else:
        raise ValueError(f"no polygon for shape '{shape}'")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def shape_mask(spec, side):
    """An 8-bit Pillow mask ('L', side x side) of the shape: 255 inside, 0 outside."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = spec.cx * side, spec.cy * side, spec.radius * side
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif spec.shape == "moon":  # a disc minus a shifted disc, turned by the angle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        a = math.radians(spec.angle - 35)
        ox, oy = cx + 0.5 * r * math.cos(a), cy + 0.5 * r * math.sin(a)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=0)
    else:
        draw.polygon(_polygon(spec.shape, cx, cy, r, spec.angle), fill=255)
    return mask


def _tint(rgb):
    """The second colour of a textured background: the colour mixed towards white (towards grey for light ones)."""
    target, w = ((255, 255, 255), 0.45) if sum(rgb) < 600 else ((110, 110, 110), 0.35)
    return tuple(int(round((1 - w) * c + w * t)) for c, t in zip(rgb, target))


def background(texture, colour, side):
    """The background picture ('RGB', side x side): plain, vertical stripes, a grid of dots, or a checkerboard;
    textures alternate the colour and its tint, with a period of 1/8 of the side."""
    base = COLOURS[colour]
    img = Image.new("RGB", (side, side), base)
    if texture == "plain":
        return img
    draw, tint, p = ImageDraw.Draw(img), _tint(base), side / 8
    for i in range(8):
        for j in range(8):
            x0, y0 = i * p, j * p
            if texture == "striped" and j == 0:
                draw.rectangle([x0 + p / 2, 0, x0 + p - 1, side], fill=tint)
            elif texture == "dotted":
                draw.ellipse([x0 + 0.25 * p, y0 + 0.25 * p, x0 + 0.75 * p, y0 + 0.75 * p], fill=tint)
            elif texture == "checkered" and (i + j) % 2 == 1:
                draw.rectangle([x0, y0, x0 + p - 1, y0 + p - 1], fill=tint)
    return img


def render(spec, resolution=RESOLUTION, halves=SUBJECT_COLOURS):
    """Draw a spec: uint8 array [resolution, resolution, 3] (drawn at 4x, box-filtered down).

    halves: the (left, right) RGB colours of the subject (spec.subject); other pairs draw look-alikes of the
    subject, which the evaluator learns to tell apart from it. A spec with colour2 is split into its own colours."""
    if spec.shape not in SHAPES or spec.texture not in TEXTURES or spec.bg_colour not in COLOURS:
        raise ValueError(f"cannot draw {spec}: shape must be one of {SHAPES}, texture one of {TEXTURES}, "
                         f"bg_colour one of {tuple(COLOURS)}")
    side = resolution * SUPERSAMPLE
    img = background(spec.texture, spec.bg_colour, side)
    mask = shape_mask(spec, side)
    if spec.colour2 is not None:
        halves = (COLOURS[spec.colour], COLOURS[spec.colour2])
    if spec.subject or spec.colour2 is not None:  # left half halves[0], right half halves[1], split on the shape's axis
        left = Image.new("L", (side, side), 0)
        c, s = math.cos(math.radians(spec.angle)), math.sin(math.radians(spec.angle))
        cx, cy, big = spec.cx * side, spec.cy * side, 2 * side
        ImageDraw.Draw(left).polygon([(cx - s * big, cy + c * big), (cx + s * big, cy - c * big),
                                      (cx + s * big - c * big, cy - c * big - s * big),
                                      (cx - s * big - c * big, cy + c * big - s * big)], fill=255)
        img.paste(Image.new("RGB", (side, side), halves[1]), mask=mask)
        img.paste(Image.new("RGB", (side, side), halves[0]),
                  mask=Image.fromarray(np.minimum(np.asarray(mask), np.asarray(left))))
    else:
        img.paste(Image.new("RGB", (side, side), COLOURS[spec.colour]), mask=mask)
    return np.asarray(img.resize((resolution, resolution), Image.BOX))


def to_tensor(images):
    """uint8 arrays [N, H, W, 3] (or a list of [H, W, 3]) -> float tensor [N, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # [N, H, W, 3] -> [N, 3, H, W]
    return x / 127.5 - 1


def to_uint8(x):
    """float tensor [N, 3, H, W] in [-1, 1] -> uint8 array [N, H, W, 3] (clamped)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def batch(n, seed, resolution=RESOLUTION, subject_fraction=0.0, two_colour_fraction=0.0):
    """n random captioned pictures: (images [n, 3, R, R] in [-1, 1], captions [n], specs [n]).

    The same seed gives the same batch. subject_fraction > 0 replaces that share of pictures with the subject
    (captioned with its class noun only as "a ... star", no colour): used to train the evaluator, never the prior.
    """
    rng = np.random.default_rng(seed)
    specs = random_specs(rng, n, subject_fraction, two_colour_fraction)
    captions = [caption(s, rng) for s in specs]
    return to_tensor([render(s, resolution) for s in specs]), captions, specs


def random_specs(rng, n, subject_fraction=0.0, two_colour_fraction=0.0):
    """n random specs from rng; a share subject_fraction of them (on average) is the subject star, a share
    two_colour_fraction of the others a two-colour shape (no draw is spent on it when the share is 0)."""
    return [random_spec(rng, shape=SUBJECT_CLASS, subject=True) if rng.random() < subject_fraction
            else random_spec(rng, two_colour=two_colour_fraction > 0 and rng.random() < two_colour_fraction)
            for _ in range(n)]


def subject_photos(n=5, seed=0, resolution=RESOLUTION):
    """The subject's "photos" (uint8 [n, R, R, 3]): varied sizes, places and backgrounds, as a user would shoot.

    The backgrounds cycle through the textures so that no single context sticks to the subject."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng, shape=SUBJECT_CLASS, subject=True, texture=TEXTURES[i % len(TEXTURES)],
                         size=SIZES[i % len(SIZES)]) for i in range(n)]
    return np.stack([render(s, resolution) for s in specs]), specs


def with_attributes(spec, **changes):
    """A copy of spec with some attributes changed (dataclasses.replace), e.g. a recontextualised subject."""
    return replace(spec, **changes)


def save_subject_photos(directory, n=5, seed=0):
    """Write the subject's photos as directory/00.png ... (the shipped examples/toy_subject/); returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    photos, _ = subject_photos(n, seed)
    paths = [directory / f"{i:02d}.png" for i in range(n)]
    for path, photo in zip(paths, photos):
        Image.fromarray(photo).save(path)
    return paths
