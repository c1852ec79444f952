"""The toy analogs of the paper's metrics (Sec. 4.1), computed once for `train`'s sample grid and `evaluate`.

On the toy world the public encoders mean nothing (they never saw a teal-and-pink star), so the toy evaluator
(tinybooth.toy.evaluator) stands in for them:

    subject_probability   P(subject) from the evaluator's subject head, mean over the subject prompts' images
    subject_fidelity      DINO analog: mean cosine of the evaluator's features, generated vs the real photos
    prompt_fidelity       CLIP-T analog: the fraction of the attributes each prompt names that are read correctly
    DIV                   mean pairwise feature distance 1 - cos within each subject prompt (LPIPS analog)
    PRES                  subject_fidelity of the bare class prompt's images ("a star"): lower = the prior survived
    PRES_subject_probability   how often "a star" now draws the subject (language drift)
    class_DIV             diversity of the class prompt's images (does "a star" still draw every kind of star?)

and, with the frozen model's class images, the same three class-prompt scores before fine-tuning (`*_before`).
"""
import torch

from tinybooth import metrics
from tinybooth.toy import evaluator as te


def diversity(evaluator, groups):
    """Mean over groups of the mean pairwise feature distance within a group (a list of [3, H, W] images)."""
    return metrics.diversity(groups, lambda a, b: te.feature_distance(evaluator, a, b))


@torch.no_grad()
def score(evaluator, subject, prior, real, before=None):
    """The toy metrics of one model. subject: [(prompt, images [N, 3, H, W])] for the subject prompts (an
    identifier in the prompt is ignored when its attributes are read); prior: the class prompt's images [M, 3, H, W];
    real: the subject's photos; before: the frozen model's images of the class prompt (the class images), or None.
    Images in [-1, 1]. Returns {name: float}."""
    generated = torch.cat([x for _, x in subject])
    out = {"subject_probability": te.subject_probability(evaluator, generated).mean(),
           "subject_fidelity": te.subject_fidelity(evaluator, generated, real),
           "prompt_fidelity": torch.cat([te.prompt_fidelity(evaluator, x, p) for p, x in subject]).mean(),
           "PRES": te.subject_fidelity(evaluator, prior, real),
           "PRES_subject_probability": te.subject_probability(evaluator, prior).mean()}
    if min(len(x) for _, x in subject) > 1:
        out["DIV"] = diversity(evaluator, [list(x) for _, x in subject])
    if len(prior) > 1:
        out["class_DIV"] = diversity(evaluator, [list(prior)])
    if before is not None:  # DIV is a mean over pairs: its expectation does not depend on n, so all class images
        out["PRES_before"] = te.subject_fidelity(evaluator, before, real)
        out["PRES_subject_probability_before"] = te.subject_probability(evaluator, before).mean()
        if len(before) > 1:
            out["class_DIV_before"] = diversity(evaluator, [list(before)])
    return {k: round(float(v), 4) for k, v in out.items()}


@torch.no_grad()
def per_prompt(evaluator, subject, real):
    """[{prompt, subject_fidelity, prompt_fidelity}] for each subject prompt."""
    return [{"prompt": p, "subject_fidelity": round(float(te.subject_fidelity(evaluator, x, real)), 4),
             "prompt_fidelity": round(float(te.prompt_fidelity(evaluator, x, p).mean()), 4)} for p, x in subject]
