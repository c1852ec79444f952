"""The paper's evaluation metrics (Sec. 4.1, "Evaluation Metrics"; Tables 1-3), as pure functions on embeddings.

With v = an image embedding (DINO CLS or CLIP image), t = a CLIP text embedding and cos(a, b) = a.b / (|a| |b|):

    subject fidelity   DINO, CLIP-I = 1/(N M) sum_{i,j} cos(v(generated_i), v(real_j))     higher is better
    prompt fidelity    CLIP-T       = 1/N sum_i cos(v_CLIP(generated_i), t(prompt_i))      higher is better
    prior preservation PRES         = subject fidelity (DINO) of images generated from the *class* prompt
                                      ("a dog") against the real subject: lower means the model still draws
                                      other dogs, i.e. no language drift / overfitting (Table 3)
    diversity          DIV          = mean over prompts of the mean pairwise LPIPS distance between the images
                                      generated for that prompt: higher means more varied poses and
                                      backgrounds (Table 3)

The paper's headline numbers (Table 1): DreamBooth (Imagen) DINO 0.696, CLIP-I 0.812, CLIP-T 0.306;
DreamBooth (Stable Diffusion) 0.668 / 0.803 / 0.305; Textual Inversion 0.569 / 0.780 / 0.255; and, as the ceiling
of subject fidelity, real images of the subject against each other: 0.774 / 0.885 (real_image_fidelity below).
"""
import itertools

import torch
import torch.nn.functional as F


def cosine_matrix(a, b):
    """cos(a_i, b_j) for a [N, D] and b [M, D] -> [N, M]."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def subject_fidelity(generated, real):
    """DINO / CLIP-I: the mean cosine similarity over all (generated, real) pairs.

    generated [N, D], real [M, D] embeddings from the same encoder. Returns a float in [-1, 1].
    """
    # BEGIN ASSIGN 9.2
    # HINT: average cos(generated_i, real_j) over all N * M pairs (unit-normalise the rows, then one matmul)
    return cosine_matrix(generated, real).mean().item()
    # END ASSIGN 9.2


def real_image_fidelity(real):
    """The subject-fidelity ceiling of Table 1 ("Real Images"): mean cos over pairs of *different* real images."""
    m = real.shape[0]
    if m < 2:
        raise ValueError(f"real-image fidelity compares pairs of real images; got {m} image(s)")
    sim = cosine_matrix(real, real)
    return ((sim.sum() - sim.diagonal().sum()) / (m * (m - 1))).item()  # the diagonal is cos(v, v) = 1


def prompt_fidelity(image_embeds, text_embeds):
    """CLIP-T: the mean over images of cos(CLIP image embedding, CLIP text embedding of that image's prompt).

    image_embeds [N, P]; text_embeds [N, P] (row i embeds the prompt image i was generated from). Returns a float.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"CLIP-T pairs each image with its prompt: got {tuple(image_embeds.shape)} image and "
                         f"{tuple(text_embeds.shape)} text embeddings (repeat each prompt's row once per image)")
    # BEGIN ASSIGN 9.3
    # HINT: the row-wise cosine similarity cos(image_i, text_i), averaged over i (not all pairs!)
    return F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1).mean().item()
    # END ASSIGN 9.3


def prior_preservation(class_generated, real):
    """PRES: subject fidelity (DINO) of images generated from the class prompt alone ("a dog") to the real
    subject. A model that has drifted draws *the* subject for "a dog" and scores high; lower is better."""
    return subject_fidelity(class_generated, real)


def mean_pairwise_distance(items, distance):
    """1 / C(n, 2) * sum_{i<j} distance(items[i], items[j]) for a list of n >= 2 items (e.g. [3, H, W] images).

    distance(a, b) takes two batches stacked along dim 0 and returns one distance per row; all pairs go in one batch.
    """
    n = len(items)
    if n < 2:
        raise ValueError(f"a diversity needs at least 2 images per prompt, got {n}; use --images-per-prompt 2 or more")
    # BEGIN ASSIGN 9.5
    # HINT: every unordered pair i < j once (itertools.combinations), distance on the stacked pairs, then the mean
    i, j = zip(*itertools.combinations(range(n), 2))
    a = torch.stack([items[k] for k in i])
    b = torch.stack([items[k] for k in j])
    return distance(a, b).float().mean().item()
    # END ASSIGN 9.5


def diversity(groups, distance):
    """DIV: the mean over prompts of the mean pairwise distance between the images generated for that prompt.

    groups: a list (one entry per prompt) of lists of images; distance: e.g. an LPIPS module (images in [-1, 1]).
    """
    return sum(mean_pairwise_distance(g, distance) for g in groups) / len(groups)
