"""Cross-attention that looks where a word is drawn: recording a UNet's cross-attention, and the token-grounding
loss that teaches a toy base model to localise its words.

In Stable Diffusion a word's cross-attention map lights up where the word is drawn (what Prompt-to-Prompt edits,
and what lets an adapter trained on "a sks dog" change mostly the dog's pixels). A toy base trained on the
denoising loss alone does not learn that (bench/toy_attention.py: the shape's words get 0.9-2.0x as much attention on
the shape as off it): one flat shape on a flat background can be drawn from the prompt read as one pooled vector.
The toy world knows every shape's mask, so the base can be told where its words are, as TokenCompose (Wang et
al. 2024) does for Stable Diffusion with segmentation masks. For a caption word w grounded to region R (the
shape's words to the shape's mask, the background's words to the rest) and a layer's attention A (pixels x
tokens, softmax over tokens, mean over heads), the share of w's attention that falls inside R is

    f_w = sum_{p in R} A[p, w] / sum_p A[p, w]

and the loss is mean_w (1 - f_w)^2, averaged over the cross-attention layers (the mask area-averaged to each
layer's grid) and weighted per example by sqrt(alpha_bar_t), the share of the image left in x_t: at t = T (zero
terminal SNR) nothing of the layout is visible yet and nothing is asked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from customize.attention import Controller, install
from customize.toy import world

UNGROUNDED, SHAPE, BACKGROUND = 0, 1, 2
SHAPE_WORDS = frozenset(world.SIZES) | frozenset(world.PALETTE) | frozenset(world.ALL_SHAPES) | {
    world.SUBJECT.identifier, world.SUBJECT.class_word}
# The content words of the position phrases ("top", "left", "center", ...; not "at", "in", "the").
POSITION_WORDS = frozenset(w for phrase in world.POSITION_PHRASES.values() for w in phrase.split()[2:])


def word_regions(text: str, length: int, position: bool = False) -> torch.Tensor:
    """(length,) region of each token of a base caption (token 0 = the start token): SHAPE for the shape's size,
    colour and name (with `position`, also the position phrase's "top", "left", "center", ...), BACKGROUND for the
    background's colour and "background", UNGROUNDED for the rest (articles, prepositions, padding). Every word
    of a base caption is one token of the toy vocabulary."""
    regions = torch.zeros(length, dtype=torch.long)
    words = text.lower().split()
    if words.count("on") > 1:
        raise ValueError(f"cannot ground a caption with two 'on' phrases: {text!r}")
    after_on = False
    for i, word in enumerate(words, start=1):
        if i >= length - 1:  # the tokenizer truncates; the last position is the end token
            break
        if word == "on":
            after_on = True
        elif after_on and (word in world.PALETTE or word == "background"):
            regions[i] = BACKGROUND
        elif not after_on and (word in SHAPE_WORDS or (position and word in POSITION_WORDS)):
            regions[i] = SHAPE
    return regions


class CrossAttentionRecorder(Controller):
    """An observer controller of the attention layer (customize.attention): on every cross-attention layer it
    appends softmax(QK^T / sqrt(d)) averaged over heads, (B, N pixels, L tokens), to store[name] (name the
    layer's processor key), one entry per UNet call; the layer's own processor still computes the output, so
    images are bitwise unchanged. The probabilities keep their graph when gradients are on (training), so a
    loss can be taken on them."""

    edits = False

    def __init__(self, store: dict):
        super().__init__()
        self.store = store

    def layer_needed(self, name, is_cross, place, pixels):
        return is_cross

    def wants(self, is_cross, place, name, step, pixels):
        return is_cross

    def __call__(self, probs, is_cross, place, name, step):
        self.store.setdefault(name, []).append(probs.mean(1))  # (B, N, L)
        return probs


def record_cross_attention(unet, store: dict) -> dict:
    """Record every cross-attention layer of `unet` into `store` (a `CrossAttentionRecorder` installed on the
    attention layer); returns the processors that were there, for `unet.set_attn_processor(returned)` to put
    back."""
    return install(unet, CrossAttentionRecorder(store))


def grounding_loss(probs: list[torch.Tensor], masks: torch.Tensor, regions: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """The module docstring's loss. `probs`: one (B, N, L) attention map per layer (N a square grid); `masks`:
    (B, H, W) share of each pixel covered by the shape; `regions`: (B, L) from `word_regions`; `weights`: (B,).
    Zero when no token is grounded (e.g. a batch of empty captions)."""
    grounded = regions != UNGROUNDED  # (B, L)
    if not probs or not grounded.any():
        return masks.new_zeros(())
    w = torch.ones(masks.shape[0], device=masks.device) if weights is None else weights
    terms = []
    for p in probs:
        side = math.isqrt(p.shape[1])
        m = F.adaptive_avg_pool2d(masks[:, None].to(p.dtype), side).flatten(1)  # (B, N)
        inside = torch.stack([torch.ones_like(m), m, 1 - m], -1)  # (B, N, 3): indexed by region
        mass = torch.einsum("bnl,bnr->blr", p, inside)  # (B, L, 3): attention inside each region
        share = mass.gather(-1, regions[..., None]).squeeze(-1) / mass[..., UNGROUNDED].clamp_min(1e-12)  # (B, L)
        per_token = (1 - share) ** 2 * grounded * w[:, None].to(p.dtype)  # (B, L)
        terms.append(per_token.sum() / grounded.sum())
    return torch.stack(terms).mean()
