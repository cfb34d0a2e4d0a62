"""ControlNet at inference: loading ControlNets for a base model, the ControlNet pipeline built from its loaded
components, and preprocessors that turn an image into a conditioning image without any downloaded model.

A ControlNet (Zhang et al. 2023) is a trainable copy of the UNet's encoder (down blocks and mid block) that reads a
conditioning image c (a (3, H, W) picture in [0, 1]: edges, a mask, a scribble) and returns one residual per skip
connection of the UNet plus one for its mid block; the UNet adds them, each multiplied by the conditioning scale:

    h_skip_i  <-  h_skip_i + s * r_i(x_t, t, text, c),        h_mid  <-  h_mid + s * r_mid(x_t, t, text, c)

Several ControlNets add their residuals (each with its own scale s_k). `control_guidance_start / end` limit a
ControlNet to a fraction of the denoising steps; guess mode feeds the ControlNet only the conditional half of the
classifier-free-guidance batch and scales its residuals from 0.1 (first skip) up to 1 (mid), so the control image
is followed without a prompt.

    import customize
    from customize.control import canny, controlnet_pipeline, load_controlnet
    from customize.inference import generate

    pipe = customize.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    cn = load_controlnet("lllyasviel/sd-controlnet-canny", pipe)
    cpipe = controlnet_pipeline(pipe, cn)
    image = generate(cpipe, "a bird", [0], image=canny(load_image("bird.png")), controlnet_conditioning_scale=0.8)[0]

Preprocessors (each a function PIL image -> RGB PIL conditioning image, same size):
    canny(img, low=100, high=200)          Canny edges (OpenCV), white on black, what sd-controlnet-canny reads
    soft_edge(img, blur=2.0)               a soft edge map: the Sobel gradient magnitude of the blurred image,
                                           normalised to [0, 255] (HED / PiDiNet-like, no network)
    scribble(img, threshold=0.25)          thin white strokes: the soft edges thresholded, dilated by one pixel
    segmentation(img, palette=None)        a label map (mode L / P / I, one integer per class) -> the colours of
                                           a palette (PASCAL VOC's by default; pass the palette the ControlNet was
                                           trained on, e.g. ADE20K's for sd-controlnet-seg); an RGB image passes
                                           through unchanged
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

PREPROCESSORS = ("canny", "soft_edge", "scribble", "segmentation", "none")


# ---------------------------------------------------------------------------------------------------------------
# ControlNets for a base model
# ---------------------------------------------------------------------------------------------------------------


def config_family(config) -> str:
    """The base family a UNet or ControlNet config belongs to (customize.models.detect_family's rule): SDXL has the
    text_time added conditioning, SD 2.x 1024-wide cross-attention, everything else SD 1.x."""
    if config.get("addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd2" if config.get("cross_attention_dim") == 1024 else "sd1"


def check_controlnet(controlnet, pipe, name: str = "the ControlNet") -> None:
    """Refuse a ControlNet made for another base model, in one line: its family, its cross-attention width, its
    block widths or its latent channels differ from the UNet's (the residuals would not fit the skips)."""
    cn, unet = controlnet.config, pipe.unet.config
    fam_cn, fam_unet = config_family(cn), config_family(unet)
    keys = ("cross_attention_dim", "block_out_channels", "in_channels", "addition_embed_type")
    diff = [k for k in keys if _norm(cn.get(k)) != _norm(unet.get(k))]
    if fam_cn != fam_unet or diff:
        what = ", ".join(f"{k} {_norm(cn.get(k))} vs {_norm(unet.get(k))}" for k in diff) or "family"
        raise ValueError(f"{name} is a {fam_cn} ControlNet but the base model is {fam_unet} ({what}): use a "
                         f"ControlNet trained for this base model")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def load_controlnet(path: str | os.PathLike, pipe, dtype=None):
    """A diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors) or hub id, checked against
    `pipe` (`check_controlnet`), in the UNet's dtype unless `dtype` is given."""
    from diffusers import ControlNetModel

    from customize.training.sd import first_parameter

    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"--controlnet {path}: not a ControlNet folder (no config.json in it); give the "
                                "folder a ControlNet was saved to (save_pretrained)")
    if not p.exists() and (os.sep in str(path) and str(path).count("/") != 1):
        raise FileNotFoundError(f"--controlnet {path}: no such folder")
    controlnet = ControlNetModel.from_pretrained(str(path), torch_dtype=dtype or first_parameter(pipe.unet).dtype)
    check_controlnet(controlnet, pipe, f"ControlNet {path}")
    return controlnet


def controlnet_pipeline(pipe, controlnet):
    """The diffusers ControlNet pipeline (StableDiffusionControlNetPipeline, or the XL one for SDXL) built from
    `pipe`'s loaded components (no weight is copied) and `controlnet`: one ControlNetModel, or a list of them
    (diffusers wraps several in a MultiControlNetModel: their residuals add). Call it through
    `customize.inference.generate` with `image=` (one control image, or a list with one per ControlNet) and
    `controlnet_conditioning_scale=` (one float, or a list)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from customize.models import is_sdxl

    nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    for k, net in enumerate(nets):
        check_controlnet(net, pipe, f"ControlNet {k}" if len(nets) > 1 else "the ControlNet")
    net = nets if len(nets) > 1 else nets[0]
    components = {k: v for k, v in pipe.components.items() if k != "controlnet"}
    if is_sdxl(pipe):
        allowed = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
                   "feature_extractor", "image_encoder")
        kwargs = {k: components.get(k) for k in allowed if k in components}
        force_zeros = pipe.config.get("force_zeros_for_empty_prompt", True)
        out = StableDiffusionXLControlNetPipeline(**kwargs, controlnet=net, force_zeros_for_empty_prompt=force_zeros,
                                                  add_watermarker=getattr(pipe, "watermark", None) is not None)
    else:
        allowed = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor",
                   "image_encoder")
        kwargs = {k: components.get(k) for k in allowed}
        out = StableDiffusionControlNetPipeline(**kwargs, controlnet=net, requires_safety_checker=False)
    if hasattr(pipe, "_progress_bar_config"):
        out._progress_bar_config = dict(pipe._progress_bar_config)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Preprocessors: image -> conditioning image (RGB, the same size), no downloaded model
# ---------------------------------------------------------------------------------------------------------------


def _cv2():
    try:
        import cv2
    except ImportError:
        from customize.training.config import MissingDependencyError

        raise MissingDependencyError("the canny preprocessor needs OpenCV, which is not installed: pip install "
                                     "'customize[cv]' (opencv-python-headless), or give a ready conditioning "
                                     "image with --preprocess none") from None
    return cv2


def _grey(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.uint8)  # (H, W)


def _rgb(edges: np.ndarray) -> Image.Image:
    return Image.fromarray(edges.astype(np.uint8), mode="L").convert("RGB")


def canny(img: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (OpenCV's cv2.Canny on the greyscale image, hysteresis thresholds `low` < `high` on the
    gradient magnitude): 1-px white edges on black, as the canny ControlNets were trained on."""
    if not 0 <= low < high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low < high, got low={low}, high={high}")
    return _rgb(_cv2().Canny(_grey(img), low, high))


def soft_edge(img: Image.Image, blur: float = 2.0) -> Image.Image:
    """A soft edge map without a network: the Sobel gradient magnitude |grad(G_sigma * I)| of the greyscale image
    blurred by a Gaussian of radius `blur`, scaled so its maximum is 255 (grey ramps where HED / PiDiNet would put
    soft lines). A flat image gives black."""
    grey = img.convert("L").filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else img.convert("L")
    g = np.asarray(grey, dtype=np.float32)  # (H, W)
    p = np.pad(g, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.hypot(gx, gy)  # (H, W)
    top = float(mag.max())
    return _rgb(np.zeros_like(mag) if top == 0 else np.round(mag / top * 255.0))


def scribble(img: Image.Image, threshold: float = 0.25, blur: float = 2.0) -> Image.Image:
    """Scribble-like strokes: the soft edges above `threshold` (a fraction of the strongest edge) as white,
    thickened by a 3x3 maximum filter (a user's stroke is a few pixels wide), on black."""
    if not 0 < threshold < 1:
        raise ValueError(f"scribble threshold must be in (0, 1), got {threshold}")
    edges = np.asarray(soft_edge(img, blur).convert("L")) > threshold * 255
    return _rgb(edges * 255).filter(ImageFilter.MaxFilter(3))


# ---------------------------------------------------------------------------------------------------------------
# Controllability: does a generated image follow its control image?
# ---------------------------------------------------------------------------------------------------------------


def edge_tolerance(height: int, width: int) -> int:
    """The matching distance of `edge_f1` in pixels: 0.75 % of the image diagonal (the BSDS500 boundary
    benchmark's default), at least 1 px: 5 px at 512 x 512, 8 px at 1024, 1 px at 32."""
    return max(1, round(0.0075 * math.hypot(height, width)))


def edge_f1(pred: np.ndarray, ref: np.ndarray, tolerance: int | None = None) -> float:
    """F1 of the edge pixels `pred` against `ref` ((H, W) bool each), an edge counting as found within
    `tolerance` pixels (Chebyshev distance; default `edge_tolerance`):

        precision = |pred & dilate(ref)| / |pred|,  recall = |ref & dilate(pred)| / |ref|,  F1 = 2PR / (P + R)

    dilate = a (2 tol + 1)^2 maximum filter. A canny map moves by a pixel or two when a shape is redrawn, so an
    exact pixel match would score a faithful image near 0. Unlike BSDS's one-to-one matching, one predicted pixel
    may cover several reference pixels (a thick line scores as well as a thin one; cheap, and enough to tell
    followed from ignored). Both empty: 1.0; one empty: 0.0."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"edge_f1: maps of different sizes {pred.shape} and {ref.shape}")
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    tol = edge_tolerance(*ref.shape) if tolerance is None else int(tolerance)

    def dilate(m: np.ndarray) -> np.ndarray:
        if tol <= 0:
            return m
        img = Image.fromarray(m.astype(np.uint8) * 255, mode="L").filter(ImageFilter.MaxFilter(2 * tol + 1))
        return np.asarray(img) > 127

    precision = float((pred & dilate(ref)).sum() / pred.sum())
    recall = float((ref & dilate(pred)).sum() / ref.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def canny_f1(image: Image.Image, control: Image.Image, tolerance: int | None = None) -> float:
    """Edge F1 (`edge_f1`) of the canny map of a generated image against a canny control image (white edges on
    black, read as grey > 127), the image resized to the control's size first."""
    if image.size != control.size:
        image = image.resize(control.size, Image.Resampling.BICUBIC)
    return edge_f1(_grey(canny(image)) > 127, _grey(control) > 127, tolerance)


def voc_palette(n: int = 256) -> np.ndarray:
    """A fixed, well-separated colour per class id, (n, 3) uint8: the PASCAL VOC palette (the bits of the id
    interleaved into the high bits of r, g, b; id 0 is black). A ControlNet trained on another palette (the ADE20K
    colours of sd-controlnet-seg) needs that palette passed to `segmentation`."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def segmentation(img: Image.Image, palette: Sequence[Sequence[int]] | np.ndarray | None = None) -> Image.Image:
    """A segmentation map as a conditioning image. A label map (mode L, I, I;16 or a P image read by its indices:
    one class id per pixel) is coloured with `palette` ((n, 3) colours by class id; default `voc_palette`); an
    RGB image is taken to be coloured already and passes through unchanged. A class id past the palette is an
    error naming it."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B"):
        raise ValueError(f"segmentation: a {img.mode} image is neither a label map (L, P, I) nor a coloured map (RGB)")
    labels = np.asarray(img, dtype=np.int64)  # (H, W) class ids
    colours = np.asarray(voc_palette() if palette is None else palette, dtype=np.uint8).reshape(-1, 3)
    top = int(labels.max())
    if top >= len(colours) or labels.min() < 0:
        raise ValueError(f"segmentation: class id {top} has no colour in a palette of {len(colours)}")
    return Image.fromarray(colours[labels], mode="RGB")


def preprocess(img: Image.Image, name: str | None) -> Image.Image:
    """The conditioning image of `img` by preprocessor name (PREPROCESSORS; None or "none": as it is, in RGB)."""
    if name in (None, "none"):
        return img.convert("RGB") if img.mode != "RGB" else img
    funcs = {"canny": canny, "soft_edge": soft_edge, "scribble": scribble, "segmentation": segmentation}
    if name not in funcs:
        raise ValueError(f"unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}")
    return funcs[name](img)
