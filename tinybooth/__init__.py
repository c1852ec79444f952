"""tinybooth: a minimal, educational reimplementation of DreamBooth (Ruiz et al., CVPR 2023, arXiv 2208.12242).

One module per idea; read them in this order:

    schedule     noise schedules: alpha_t, sigma_t, SNR; the discrete DDPM schedules of public checkpoints
    loss         the x-hat denoising loss, eq. (1), and the prior-preservation loss, eq. (2)
    samplers     ancestral (DDPM) and DDIM steps, classifier-free guidance, dynamic thresholding
    solvers      multistep ODE solvers: PNDM / PLMS and DPM-Solver++ 2M
    text         T5 v1.1 and CLIP text encoders + tokenizers that load the public files
    rare_tokens  the rare-token identifier search of Sec. 4.1
    unet         the U-Net x_hat_theta(z_t, c) of DeepFloyd IF (stage I and II) and Stable Diffusion 1.x
    cascade      cascaded super-resolution with noise augmentation; prompt-embedding cache
    vae          the Stable Diffusion autoencoder (latent path)
    generate     prompts -> images through either family's pipeline: the one way tinybooth generates
    dreambooth   the method (Sec. 4): the identifier, class images, eq. (2), the SR stage's conditioning
    training     the training loop every job uses: AdamW, checkpoints and resume, Ctrl-C, blow-up guard
    experiment   one DreamBooth run on disk: the method wired to a model directory and an output folder
    models       model directories: the embedded default, family detection, per-family defaults, saving
    data, lora, plots   instance images; DreamBooth-LoRA adapters; image grids and loss curves
    vit, lpips, metrics, evaluation   the evaluation protocol: DINO, CLIP-I, CLIP-T, PRES, DIV
    toy          the procedural toy world, its evaluator and scores, and how the embedded cascade was pretrained
    checkpoint   strict loading and saving of weights in the public Hugging Face layout
    errors       how a command reports a user's mistake: one line, exit status 2
    assignments  writes a student copy with the marked solutions blanked out

The commands (`python -m tinybooth.X`) only parse, call the library and print: train, sample, evaluate,
pretrain_toy, rare_tokens, assignments.
"""
__version__ = "0.1.0"
