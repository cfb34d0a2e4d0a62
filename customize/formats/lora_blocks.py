"""Where a LoRA acts: the Frobenius norm of its update per UNet block (`block_norms`), for `customize inspect`.

Every module's dense update is dW = (alpha / r) B A (a convolution's A (r, in, kh, kw) flattened to (r, in*kh*kw),
B (out, r, 1, 1) to (out, r)). A block's norm is the Frobenius norm of all its modules' updates stacked:
||dW_block||_F = sqrt(sum_m ||dW_m||_F^2), so the squared norms add up over blocks and each block's share of the
sum says how much of the LoRA's change lives there (B-LoRA: SDXL's up_blocks.0.attentions.0 holds content,
up_blocks.0.attentions.1 style).

||B A||_F is computed without forming dW when that is cheaper: ||B A||_F^2 = trace(A^T B^T B A) =
trace((B^T B)(A A^T)), two (r, r) Gram matrices, O(r^2 (out + n)) instead of O(r out n) for the dense product.
It is also the more accurate of the two in float32: its sums run over out or n terms, accumulated into float64
at the end, where the dense norm sums out * n squares (an SDXL feed-forward LoRA, (10240, 32) @ (32, 1280): the
Gram form within 3e-8 of the float64 norm, torch's float32 dense norm 5e-4 below it; 700 such modules: 0.14 s
against 13.7 s for forming every dW, one CPU thread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from customize.formats.kohya_names import SD_LAYOUT, SDXL_LAYOUT, UNetLayout
from customize.formats.lora_detect import detect_lora_family
from customize.formats.lora_merge import lbw_block
from customize.formats.lora_state import COMPONENTS, LoraLayer, LoraState, split_key

# UNet modules outside the numbered blocks, in the order the forward pass runs them (others sort after, by name)
_BEFORE = ("time_proj", "time_embedding", "add_time_proj", "add_embedding", "encoder_hid_proj", "conv_in")
_AFTER = ("conv_norm_out", "conv_act", "conv_out")
_SIDES = {"down_blocks": 1, "mid_block": 2, "up_blocks": 3}


@dataclass
class BlockNorm:
    """One row of the per-block table."""

    block: str  # text_encoder, down_blocks.1.attentions.0, mid_block.resnets.1, up_blocks.0.upsamplers, conv_in, ...
    lbw: str | None  # A1111 LoRA Block Weight id (BASE, IN04, MID, OUT01), None where LBW has none
    modules: int  # adapted modules in the block
    norm: float  # ||dW_block||_F = sqrt(sum over its modules of ||dW_m||_F^2)
    percent: float  # 100 * norm^2 / (sum over all blocks of norm^2); 0 for every block when the LoRA is all zero


def update_norm(layer: LoraLayer) -> float:
    """||dW||_F of one module, in float32 on the CPU (module docstring: the Gram form when it is cheaper)."""
    up = layer.up.detach().to("cpu", torch.float32).flatten(1)  # B: (out, r)
    down = layer.down.detach().to("cpu", torch.float32).flatten(1)  # A: (r, n)
    (out, r), n = up.shape, down.shape[1]
    if r * (out + n) < out * n:
        # both Gram matrices are symmetric, so trace(G_B G_A) is the sum of their elementwise product; it is
        # >= 0 in exact arithmetic (the trace of a product of two PSD matrices), rounding can dip below
        squared = float((up.T @ up).mul(down @ down.T).sum(dtype=torch.float64))
        return abs(layer.scale) * math.sqrt(max(squared, 0.0))
    return abs(layer.scale) * math.sqrt(float((up @ down).square().sum(dtype=torch.float64)))


def block_of(key: str) -> str:
    """The row a LoraState key belongs to: the text encoder it is in, or its UNet block as diffusers names it
    (down_blocks.i.attentions.j / .resnets.j / .downsamplers, mid_block.attentions.0 / .resnets.j, the same for
    up_blocks, else the UNet's top-level module: conv_in, time_embedding, ...)."""
    component, module = split_key(key)
    if component != "unet":
        return component
    parts = module.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3:
        if parts[2] in ("attentions", "resnets"):
            return ".".join(parts[:4])
        if parts[2] in ("downsamplers", "upsamplers"):
            return ".".join(parts[:3])
    if parts[0] == "mid_block" and len(parts) > 2 and parts[1] in ("attentions", "resnets"):
        return ".".join(parts[:3])
    return parts[0]


def _order(block: str) -> tuple:
    """Text encoders first, then the UNet in the order its forward pass runs: embeddings and conv_in; each down
    level's resnet j, attention j, ..., its downsampler; the mid block (resnets.0, attentions.0, resnets.1);
    the up levels likewise; the output convolutions."""
    if block in COMPONENTS:
        return (0, COMPONENTS.index(block))
    parts = block.split(".")
    if parts[0] in _SIDES:
        level, rest = (0, parts[1:]) if parts[0] == "mid_block" else (int(parts[1]), parts[2:])
        if rest[0] in ("downsamplers", "upsamplers"):
            return (2, _SIDES[parts[0]], level, math.inf)
        j = int(rest[1])
        return (2, _SIDES[parts[0]], level, 2 * j + (rest[0] == "attentions"))
    if block in _BEFORE:
        return (1, _BEFORE.index(block))
    if block in _AFTER:
        return (3, _AFTER.index(block))
    return (4, block)


def block_norms(state: LoraState, layout: UNetLayout | None = None) -> list[BlockNorm]:
    """The LoRA's update norm per block (module docstring), rows in `_order`: text encoders, then the UNet from
    input to output. LBW ids come from `lbw_block` with `layout` (default: SDXL's for an SDXL LoRA, else SD's,
    as `block_weights` does); a block's id is its modules' one (a block never spans two LBW ids)."""
    family = detect_lora_family(state)
    layout = layout or (SDXL_LAYOUT if family == "sdxl" else SD_LAYOUT)
    squared: dict[str, float] = {}
    counts: dict[str, int] = {}
    ids: dict[str, str | None] = {}
    for key, layer in state.layers.items():
        block = block_of(key)
        squared[block] = squared.get(block, 0.0) + update_norm(layer) ** 2
        counts[block] = counts.get(block, 0) + 1
        if ids.get(block) is None:
            ids[block] = lbw_block(key, layout)
    total = sum(squared.values())
    return [BlockNorm(block, ids[block], counts[block], math.sqrt(squared[block]),
                      100.0 * squared[block] / total if total > 0 else 0.0)
            for block in sorted(squared, key=_order)]


def blocks_table(rows: list[BlockNorm]) -> list[str]:
    """The per-block rows of `customize inspect`'s summary: block, LBW id, modules, ||dW||_F, share of the sum
    of the squared norms."""
    width = max((len(r.block) for r in rows), default=5)
    lines = [f"  {'block':<{width}}  {'LBW':<5}  {'modules':>7}  {'||dW||_F':>10}  {'share':>6}"]
    lines += [f"  {r.block:<{width}}  {r.lbw or '-':<5}  {r.modules:>7}  {r.norm:>#10.4g}  {r.percent:>5.1f}%"
              for r in rows]
    return lines
