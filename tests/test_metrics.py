"""The evaluation metrics on hand-made embeddings with known answers, and LPIPS against the `lpips` package."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tinybooth import metrics
from tinybooth.lpips import CONFIG, LPIPS, lpips_distance

R2 = 1 / math.sqrt(2)


@pytest.mark.task9_2
def test_subject_fidelity_is_mean_over_all_pairs():
    gen = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = torch.tensor([[2.0, 0.0], [3.0, 3.0]])  # lengths must not matter: cosine, not dot product
    want = (1 + R2 + 0 + R2) / 4
    got = metrics.subject_fidelity(gen, real)
    assert got == pytest.approx(want, abs=1e-6), (
        f"expected the mean cosine over all 4 (generated, real) pairs = {want:.4f}, got {got:.4f}")
    assert metrics.prior_preservation(gen, real) == pytest.approx(want, abs=1e-6), "PRES is subject fidelity"


@pytest.mark.task9_2
def test_subject_fidelity_of_identical_sets_is_one_and_of_opposites_minus_one():
    v = torch.randn(3, 8)
    assert metrics.subject_fidelity(v[:1], v[:1] * 5) == pytest.approx(1.0, abs=1e-6)
    assert metrics.subject_fidelity(v[:1], -v[:1]) == pytest.approx(-1.0, abs=1e-6)


def test_real_image_fidelity_skips_self_pairs():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    want = (0 + R2 + R2) / 3
    assert metrics.real_image_fidelity(real) == pytest.approx(want, abs=1e-6), (
        "the real-image ceiling averages cos over pairs of different images (the diagonal, cos = 1, is left out)")
    with pytest.raises(ValueError, match="pairs"):
        metrics.real_image_fidelity(real[:1])


@pytest.mark.task9_3
def test_prompt_fidelity_pairs_each_image_with_its_own_prompt():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[5.0, 0.0], [1.0, 1.0]])
    want = (1 + R2) / 2  # row-wise; the mean over all pairs would be (1 + R2 + 0 + R2) / 4 = 0.604
    got = metrics.prompt_fidelity(img, txt)
    assert got == pytest.approx(want, abs=1e-6), f"CLIP-T = mean_i cos(image_i, text_i) = {want:.4f}, got {got:.4f}"


def test_prompt_fidelity_refuses_unpaired_embeddings():
    with pytest.raises(ValueError, match="repeat"):
        metrics.prompt_fidelity(torch.zeros(4, 3), torch.ones(1, 3))


def absdiff(a, b):
    return (a - b).abs().flatten(1).sum(1)


@pytest.mark.task9_5
def test_mean_pairwise_distance_uses_each_unordered_pair_once():
    items = [torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([3.0])]
    got = metrics.mean_pairwise_distance(items, absdiff)
    assert got == pytest.approx(2.0), (
        f"pairs (0,1), (0,2), (1,2) have distances 1, 3, 2: mean 2; got {got} (self pairs or ordered pairs counted?)")
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mean_pairwise_distance(items[:1], absdiff)


@pytest.mark.task9_5
def test_diversity_averages_the_prompts():
    groups = [[torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([3.0])], [torch.tensor([5.0])] * 2]
    assert metrics.diversity(groups, absdiff) == pytest.approx(1.0), "(2 + 0) / 2 prompts"


@pytest.mark.task9_4
def test_lpips_distance_on_hand_made_features():
    # one layer, 2 channels, 2 pixels: pixel 0 differs, pixel 1 is identical
    y0 = torch.tensor([[3.0, 1.0], [4.0, 1.0]]).reshape(1, 2, 1, 2)
    y1 = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    w = torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1)
    # pixel 0: yhat0 = (0.6, 0.8), yhat1 = (1, 0): 1 * 0.4^2 + 2 * 0.8^2 = 1.44; pixel 1: 0; spatial mean 0.72
    got = lpips_distance([y0], [y1], [w])
    assert got.shape == (1,) and got.item() == pytest.approx(0.72, abs=1e-6), (
        f"expected sum_c w_c (yhat0 - yhat1)^2 averaged over the 2 pixels = 0.72, got {got.tolist()}")
    two = lpips_distance([y0, y0 * 7], [y1, y1], [w, w])
    assert two.item() == pytest.approx(1.44, abs=1e-6), "layers add up, and each is scale-invariant (unit-normalised)"


def formula_weights(shape, salt):
    """Same formula as tests/reference/make_vit_fixtures.py (stands in for AlexNet's trained weights)."""
    n = int(np.prod(shape))
    i = torch.arange(n, dtype=torch.float64)
    w = torch.sin(0.7071 * i + 1.3 * salt) * torch.cos(0.0137 * i + salt)
    return (w * math.sqrt(3.0 / (n // shape[0]))).float().reshape(shape)


@pytest.mark.task9_4
def test_lpips_matches_lpips_package(request, tmp_path):
    fx = load_file(request.config.rootpath / "tests" / "fixtures" / "vit" / "lpips.safetensors")
    model = LPIPS.from_config(CONFIG)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    state = {}
    for salt, (idx, conv) in enumerate((i, m) for i, m in enumerate(model.features) if m in convs):
        state[f"features.{idx}.weight"] = formula_weights(conv.weight.shape, salt)
        state[f"features.{idx}.bias"] = formula_weights(conv.bias.shape, salt + 10) * 0.1
    state.update({k.replace(".model.1.", "."): v for k, v in fx.items() if k.startswith("lin")})
    model.load_state_dict(state, strict=True)
    model.save_pretrained(tmp_path / "lpips")  # and the public layout round-trips
    model = LPIPS.from_pretrained(tmp_path / "lpips")
    with torch.no_grad():
        got = model(fx["x0"], fx["x1"])
    err = (got - fx["distance"]).abs().max().item()
    assert err < 1e-4, f"LPIPS distances {got.tolist()} differ from the lpips package's {fx['distance'].tolist()}"
    assert got[2].item() == 0.0, "an image is at LPIPS distance 0 from itself"


def test_lpips_refuses_small_or_mismatched_images():
    model = LPIPS.from_config(CONFIG)
    with pytest.raises(ValueError, match="64x64"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="one shape"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="only"):
        LPIPS.from_config({**CONFIG, "net": "vgg"})


def test_convert_original_reads_torchvision_and_lpips_files(tmp_path):
    """weights_download.py fetches alexnet-owt-7be5be79.pth (torchvision) and lpips' v0.1/alex.pth; the converter
    keeps AlexNet's features.*, drops its classifier and renames lin{l}.model.1.weight -> lin{l}.weight."""
    from tinybooth.lpips import convert_original
    ref = LPIPS.from_config(CONFIG)
    trunk = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    trunk["classifier.1.weight"] = torch.zeros(4, 9216)
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{l}.model.1.weight": getattr(ref, f"lin{l}").weight.detach() for l in range(5)},
               tmp_path / "alex.pth")
    convert_original(tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "alex.pth", tmp_path / "lpips")
    got = LPIPS.from_pretrained(tmp_path / "lpips")
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), f"{k} changed in conversion"
