"""tinybooth: a minimal, educational reimplementation of DreamBooth (Ruiz et al., CVPR 2023, arXiv 2208.12242).

One module per stage of the paper; read them in this order:

    schedule     noise schedules: alpha_t, sigma_t, SNR; the discrete DDPM schedules of public checkpoints
    loss         the x-hat denoising loss, eq. (1), and the prior-preservation loss, eq. (2)
    samplers     ancestral (DDPM) and DDIM steps, classifier-free guidance, dynamic thresholding
    text         T5 v1.1 and CLIP text encoders + tokenizers that load the public files
    rare_tokens  the rare-token identifier search of Sec. 4.1
    unet         the U-Net x_hat_theta(z_t, c) of DeepFloyd IF (stage I and II) and Stable Diffusion 1.x
    checkpoint   strict loading/saving in the public Hugging Face layout
"""
__version__ = "0.1.0"
