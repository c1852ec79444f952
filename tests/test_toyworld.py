"""The toy world (tinybooth/world.py): deterministic pictures and captions, and the shipped subject photos."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinybooth.toy import world

ROOT = Path(__file__).resolve().parent.parent
SUBJECT_DIR = ROOT / "examples" / "toy_subject"


def test_same_seed_gives_same_pictures_and_captions():
    x1, c1, s1 = world.batch(6, seed=3)
    x2, c2, s2 = world.batch(6, seed=3)
    assert torch.equal(x1, x2), "world.batch(6, seed=3) drew different pictures twice: a seed must fix them"
    assert c1 == c2 and s1 == s2, f"captions differ between two runs with seed 3: {c1} vs {c2}"
    x3, c3, _ = world.batch(6, seed=4)
    assert not torch.equal(x1, x3), "seeds 3 and 4 drew the same pictures: the seed is not used"


def test_batch_shapes_and_range():
    x, captions, specs = world.batch(4, seed=0)
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1, f"pictures must lie in [-1, 1], got [{x.min()}, {x.max()}]"
    assert len(captions) == len(specs) == 4


def test_full_caption_round_trips_through_the_parser():
    rng = np.random.default_rng(0)
    for _ in range(50):
        spec = world.random_spec(rng)
        text = world.caption(spec)
        asked = world.parse_caption(text)
        expected = dict(shape=spec.shape, colour=spec.colour, size=spec.size, bg_colour=spec.bg_colour)
        if spec.texture != "plain":  # "plain" is never written: "a red star on a blue background"
            expected["texture"] = spec.texture
        assert asked == expected, f"parse_caption({text!r}) = {asked}, expected {expected}"


def test_caption_examples():
    spec = world.Spec("star", "red", "small", "striped", "blue")
    assert world.caption(spec) == "a small red star on a striped blue background"
    orange = world.Spec("heart", "orange", "big", "plain", "green")
    assert world.caption(orange) == "a big orange heart on a green background"
    rng = np.random.default_rng(0)
    assert "an orange heart on a green background" in {world.caption(orange, rng) for _ in range(100)}
    assert world.caption(spec, identifier="sks") == "a small red sks star on a striped blue background"
    assert world.parse_caption("a sks star on a green background") == {"shape": "star", "bg_colour": "green"}
    assert world.parse_caption("a big blue circle") == {"size": "big", "colour": "blue", "shape": "circle"}


def test_dropped_attributes_keep_the_class_noun():
    rng = np.random.default_rng(1)
    spec = world.Spec("moon", "white", "big", "dotted", "black")
    texts = {world.caption(spec, rng) for _ in range(2000)}
    assert all("moon" in t for t in texts), "every caption must name the shape (the class noun)"
    assert "a moon" in texts, "with attributes dropped at random, the bare class prompt 'a moon' must occur"


def test_background_never_takes_the_shape_colour():
    rng = np.random.default_rng(2)
    for _ in range(300):
        s = world.random_spec(rng)
        assert s.colour != s.bg_colour, f"{s}: a shape on its own colour would be invisible"


def test_fixed_attributes_are_kept_and_unknown_ones_refused():
    rng = np.random.default_rng(0)
    s = world.random_spec(rng, shape="star", bg_colour="green", size="big")
    assert (s.shape, s.bg_colour, s.size) == ("star", "green", "big")
    with pytest.raises(ValueError, match="unknown picture attribute"):
        world.random_spec(rng, hat="red")


def test_subject_is_teal_and_pink_and_never_in_the_world():
    img = world.render(world.Spec("star", None, "big", "plain", "white", radius=0.38, subject=True))
    pixels = {tuple(p) for p in img.reshape(-1, 3)}
    for rgb in world.SUBJECT_COLOURS:
        assert rgb in pixels, f"the subject must show its colour {rgb}"
    _, _, specs = world.batch(200, seed=5)
    assert not any(s.subject for s in specs), "the world must never draw the subject on its own"
    pixels = world.to_uint8(world.batch(50, seed=6)[0]).reshape(-1, 3)
    teal = np.all(pixels == np.array(world.SUBJECT_COLOURS[0]), axis=1).mean()
    assert teal == 0, f"{teal:.2%} of world pixels are exactly the subject's teal"


def test_shipped_subject_photos_are_the_regenerable_ones():
    files = sorted(SUBJECT_DIR.glob("*.png"))
    assert len(files) == 5, f"examples/toy_subject should hold 5 photos, found {[f.name for f in files]}"
    photos, specs = world.subject_photos(5, seed=0)
    for f, photo, spec in zip(files, photos, specs):
        assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), photo), \
            f"{f.name} differs from world.subject_photos(5, seed=0): regenerate with save_subject_photos"
        assert spec.subject and spec.shape == "star"
    assert len({s.texture for s in specs}) == 4, "the photos should show the subject on every texture"


def test_subject_class_noun_is_documented():
    info = json.loads((ROOT / "tinybooth" / "assets" / "toy_subject.json").read_text())
    assert info["class_noun"] == world.SUBJECT_CLASS == "star"
    assert (ROOT / info["photos"]).is_dir()
    assert "**star**" in (SUBJECT_DIR / "README.md").read_text()


def test_two_colour_shapes_are_split_into_two_world_colours_and_captioned_so():
    rng = np.random.default_rng(3)
    specs = world.random_specs(rng, 400, two_colour_fraction=0.5)
    split = [s for s in specs if s.colour2 is not None]
    assert 150 < len(split) < 250, f"{len(split)} of 400 specs are two-colour with two_colour_fraction=0.5"
    for s in split:
        assert s.colour2 != s.colour and s.bg_colour not in (s.colour, s.colour2), s
        assert f"{s.colour} and {s.colour2} {s.shape}" in world.caption(s), world.caption(s)
    spec = world.Spec("square", "red", "big", "plain", "white", radius=0.38, colour2="blue")
    img = world.render(spec)
    row = img[32]  # the middle row: left of the split red, right of it blue
    assert tuple(row[20]) == world.COLOURS["red"] and tuple(row[44]) == world.COLOURS["blue"], (row[20], row[44])
    assert not any(s.colour2 for s in world.random_specs(np.random.default_rng(3), 400)), \
        "without two_colour_fraction the world draws one-colour shapes"


def test_two_colour_share_zero_draws_the_same_world_as_before():
    # the shipped model's first runs were rendered with no two-colour share: their seeds must still give the same
    # pictures (these captions were drawn before two-colour shapes existed)
    _, captions, _ = world.batch(4, seed=11, two_colour_fraction=0.0)
    assert captions == ["a big green cross on a purple background", "a big circle on a checkered background",
                        "a small purple square", "a small black cross on a checkered blue background"], captions
