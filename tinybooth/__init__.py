"""tinybooth: a minimal, educational reimplementation of DreamBooth (Ruiz et al., CVPR 2023, arXiv 2208.12242).

One module per stage of the paper; read them in this order:

    schedule     noise schedules: alpha_t, sigma_t, SNR; the discrete DDPM schedules of public checkpoints
    loss         the x-hat denoising loss, eq. (1), and the prior-preservation loss, eq. (2)
    samplers     ancestral (DDPM) and DDIM steps, classifier-free guidance, dynamic thresholding
    solvers      multistep ODE solvers: PNDM / PLMS and DPM-Solver++ 2M
    text         T5 v1.1 and CLIP text encoders + tokenizers that load the public files
    rare_tokens  the rare-token identifier search of Sec. 4.1
    unet         the U-Net x_hat_theta(z_t, c) of DeepFloyd IF (stage I and II) and Stable Diffusion 1.x
    cascade      cascaded super-resolution with noise augmentation; prompt-embedding cache; the SD latent path
    vae          the Stable Diffusion autoencoder (latent path)
    sample       python -m tinybooth.sample
    data, lora   instance images; DreamBooth-LoRA adapters
    train        python -m tinybooth.train: DreamBooth with prior preservation (Sec. 4), the main job
    vit, lpips, metrics, evaluate   the evaluation protocol: DINO, CLIP-I, CLIP-T, PRES, DIV
    toyworld, toy_evaluator, pretrain_toy   the procedural toy world, its evaluator, the embedded cascade's recipe
    checkpoint   strict loading/saving in the public Hugging Face layout
    assignments  writes a student copy with the marked solutions blanked out
"""
__version__ = "0.1.0"
