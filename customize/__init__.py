"""customize: personalise and edit pretrained text-to-image diffusion models (SD 1.x/2.x, SDXL)."""

__version__ = "0.1.0"
