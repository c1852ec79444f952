"""The toy world and everything made from it: the embedded default that `python -m tinybooth.train` personalises.

    world       the procedural captioned world of coloured shapes ("a small red star on a striped blue background")
                and the shipped subject, a teal/pink split star no star of the world has
    evaluator   a small CNN that reads a picture's attributes and whether it shows the subject
    scoring     the toy analogs of the paper's metrics (subject and prompt fidelity, PRES, DIV), computed once
    pretrain    how the embedded cascade and the evaluator were trained (python -m tinybooth.pretrain_toy)
    quality     the pretrained cascade's quality bar
"""
