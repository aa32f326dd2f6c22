"""Model families (SD 1.x/2.x, SDXL, SD3, FLUX.1): detection, the denoiser call, prompt encoding, pipelines."""
