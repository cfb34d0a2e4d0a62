"""A UNet for pixel-space diffusion (Ho et al. 2020, appendix B; the layout of diffusers' UNet2DModel).

    x (B, in, H, W) ── stem ──> level 0 ──down──> level 1 ... level L-1 ── mid ── up L-1 ... up 0 ── head ──> (B, out, H, W)
                                   │ skips (every ResBlock output, every downsample, the stem) ──────────┘

Each level holds `layers_per_level` ResBlocks (GroupNorm, SiLU, 3x3 conv, + time/class embedding, GroupNorm,
SiLU, dropout, 3x3 conv, residual), optionally each followed by multi-head self-attention; the up path has one
ResBlock more per level, each taking a concatenated skip. The timestep enters through a sinusoidal embedding
(flip_sin_to_cos / freq_shift as in diffusers) and a 2-layer MLP; class labels through an embedding table
added to it.

Module names are our own (`down.0.blocks.1.conv1`, `mid.attn.qkv`, `up.2.upsample`); `diffusers_module_map`
is the single place that ties them to UNet2DModel's state-dict keys, in both directions. Fused where the math
allows: query, key and value are one Linear (`qkv`), attention runs through `scaled_dot_product_attention`,
the time-embedding projections of all ResBlocks are one matmul, SiLU(embedding) is computed once, and no
division happens for output scales of 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Transformer-style sinusoidal embedding (Vaswani et al. 2017): periods up to 10000 timesteps.
MAX_PERIOD = 10000
# Width of the time-embedding MLP relative to the first level's channels (DDPM: 4 * ch).
TIME_EMBED_MULT = 4


@dataclass
class UNetConfig:
    """Architecture of `UNet`. Levels are indexed from full resolution (0) to the coarsest (L - 1)."""

    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (64, 128, 256, 256)  # width of each resolution level
    layers_per_level: int = 2  # ResBlocks per level on the way down (the up path has one more)
    down_attention: tuple[bool, ...] = (False, False, True, False)  # self-attention after each ResBlock
    up_attention: tuple[bool, ...] | None = None  # per level, same indexing; None = as down_attention
    mid_block: bool = True  # ResBlock-[attention]-ResBlock at the coarsest level
    mid_attention: bool = True
    head_dim: int | None = 8  # attention head width; None = one head as wide as the level
    norm_groups: int = 32
    attn_norm_groups: int | None = None  # mid attention GroupNorm; None = norm_groups (none with scale_shift)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    time_embed_dim: int | None = None  # None = 4 * channels[0]
    flip_sin_to_cos: bool = True  # embedding order [cos, sin] (DDPM) instead of [sin, cos]
    freq_shift: float = 0.0
    scale_shift_norm: bool = False  # time embedding as GroupNorm scale and shift (Dhariwal & Nichol 2021)
    num_class_embeds: int | None = None  # class-conditional when set
    mid_scale_factor: float = 1.0  # mid block outputs are divided by this (diffusers' mid_block_scale_factor)
    downsample_padding: int = 1
    center_input_sample: bool = False  # map inputs from [0, 1] to [-1, 1] first
    sample_size: int | None = None

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.down_attention = tuple(bool(a) for a in self.down_attention)
        if self.up_attention is None:
            self.up_attention = self.down_attention
        self.up_attention = tuple(bool(a) for a in self.up_attention)
        n = len(self.channels)
        if len(self.down_attention) != n or len(self.up_attention) != n:
            raise ValueError(f"down_attention / up_attention need one flag per level ({n} levels: {self.channels})")
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"channels {self.channels} must be divisible by norm_groups={self.norm_groups}")

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or TIME_EMBED_MULT * self.channels[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------
# Config translation (diffusers UNet2DModel <-> UNetConfig)
# ---------------------------------------------------------------------------------------------------------------

_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}


def from_diffusers_config(config: Mapping) -> UNetConfig:
    """UNetConfig for a diffusers UNet2DModel config (its `.config`, or a config.json dict). Options this UNet
    does not implement raise a ValueError that names them."""
    c = dict(config)

    def need(key, allowed, default):
        value = c.get(key, default)
        if value not in allowed:
            raise ValueError(f"UNet2DModel option {key}={value!r} is not supported (supported: {allowed})")
        return value

    need("time_embedding_type", ("positional",), "positional")
    need("class_embed_type", (None,), None)
    need("downsample_type", ("conv",), "conv")
    need("upsample_type", ("conv",), "conv")
    need("act_fn", ("silu", "swish"), "silu")
    need("mid_block_type", ("UNetMidBlock2D", None), "UNetMidBlock2D")
    shift = need("resnet_time_scale_shift", ("default", "scale_shift"), "default")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for name in down:
        if name not in _DOWN_TYPES:
            raise ValueError(f"down block {name!r} is not supported (supported: {list(_DOWN_TYPES)})")
    for name in up:
        if name not in _UP_TYPES:
            raise ValueError(f"up block {name!r} is not supported (supported: {list(_UP_TYPES)})")
    return UNetConfig(
        in_channels=c.get("in_channels", 3),
        out_channels=c.get("out_channels", 3),
        channels=tuple(c["block_out_channels"]),
        layers_per_level=c.get("layers_per_block", 2),
        down_attention=tuple(_DOWN_TYPES[n] for n in down),
        up_attention=tuple(_UP_TYPES[n] for n in reversed(up)),  # diffusers lists up blocks coarsest first
        mid_block=c.get("mid_block_type", "UNetMidBlock2D") is not None,
        mid_attention=c.get("add_attention", True),
        head_dim=c.get("attention_head_dim", 8),
        norm_groups=c.get("norm_num_groups", 32),
        attn_norm_groups=c.get("attn_norm_num_groups"),
        norm_eps=c.get("norm_eps", 1e-5),
        dropout=c.get("dropout", 0.0),
        time_embed_dim=c.get("time_embedding_dim"),
        flip_sin_to_cos=c.get("flip_sin_to_cos", True),
        freq_shift=c.get("freq_shift", 0),
        scale_shift_norm=shift == "scale_shift",
        num_class_embeds=c.get("num_class_embeds"),
        mid_scale_factor=c.get("mid_block_scale_factor", 1.0),
        downsample_padding=c.get("downsample_padding", 1),
        center_input_sample=c.get("center_input_sample", False),
        sample_size=c.get("sample_size"),
    )


def config_to_diffusers(cfg: UNetConfig) -> dict:
    """Keyword arguments for diffusers' UNet2DModel(**kwargs) with the same architecture."""
    return dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        center_input_sample=cfg.center_input_sample,
        time_embedding_type="positional",
        time_embedding_dim=cfg.time_embed_dim,
        freq_shift=cfg.freq_shift,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.down_attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.up_attention)),
        mid_block_type="UNetMidBlock2D" if cfg.mid_block else None,
        block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_level,
        mid_block_scale_factor=cfg.mid_scale_factor,
        downsample_padding=cfg.downsample_padding,
        downsample_type="conv",
        upsample_type="conv",
        dropout=cfg.dropout,
        act_fn="silu",
        attention_head_dim=cfg.head_dim,
        norm_num_groups=cfg.norm_groups,
        attn_norm_num_groups=cfg.attn_norm_groups,
        norm_eps=cfg.norm_eps,
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default",
        add_attention=cfg.mid_attention,
        class_embed_type=None,
        num_class_embeds=cfg.num_class_embeds,
    )


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: int = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding (DDPM appendix B / Vaswani et al.): for k < dim/2, frequency
    w_k = max_period^(-k / (dim/2 - freq_shift)); emb = [sin(t w), cos(t w)] ([cos, sin] when flipped),
    zero-padded to an odd `dim`. Computed in float32. timesteps (B,) -> (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = timesteps[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos else [torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # (B, dim)


class TimeEmbedding(nn.Module):
    """t -> sinusoid(t) -> Linear -> SiLU -> Linear (DDPM appendix B)."""

    def __init__(self, in_dim: int, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.in_dim, self.flip_sin_to_cos, self.freq_shift = in_dim, flip_sin_to_cos, freq_shift
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.in_dim, self.flip_sin_to_cos, self.freq_shift)  # (B, in_dim)
        emb = emb.to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected embedding (or scale/shift the second norm with it),
    GroupNorm-SiLU-dropout-conv, plus the input (1x1 conv when widths differ); out = (skip + h) / output_scale."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float, dropout: float,
                 scale_shift: bool, output_scale: float = 1.0):
        super().__init__()
        self.scale_shift, self.output_scale = scale_shift, output_scale
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(temb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, t_proj: torch.Tensor) -> torch.Tensor:
        """x (B, in, H, W), t_proj = time_proj(SiLU(embedding)) (B, out or 2*out), computed by the UNet for all
        blocks in one matmul -> (B, out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        t = t_proj[:, :, None, None]  # (B, out or 2*out, 1, 1)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.skip is None else self.skip(x)
        out = skip + h
        return out if self.output_scale == 1 else out / self.output_scale


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with GroupNorm in front and a residual around:
    out = (x + W_o softmax(Q K^T / sqrt(d)) V) / output_scale, Q, K, V from one fused projection."""

    def __init__(self, channels: int, head_dim: int | None, groups: int | None, eps: float, output_scale: float = 1.0):
        super().__init__()
        head_dim = head_dim or channels
        self.heads = channels // head_dim
        if self.heads < 1:
            raise ValueError(f"attention head_dim={head_dim} is wider than the {channels} channels of its level")
        self.head_dim = head_dim
        inner = self.heads * head_dim
        self.output_scale = output_scale
        self.norm = nn.GroupNorm(groups, channels, eps=eps) if groups else None
        self.qkv = nn.Linear(channels, 3 * inner)
        self.proj = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x) if self.norm is not None else x
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.qkv(h).view(B, H * W, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, HW, d)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, HW, d)
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, self.heads * self.head_dim))  # (B, HW, C)
        out = x + h.transpose(1, 2).reshape(B, C, H, W)
        return out if self.output_scale == 1 else out / self.output_scale


class Downsample(nn.Module):
    """Stride-2 3x3 conv; with padding 0 the input is padded on the right/bottom only (diffusers' convention)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.pad_right = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right else x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the skip's size (x2 for even sizes), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Level(nn.Module):
    """One resolution level of either path: ResBlocks, each optionally followed by attention, then a resampler."""

    def __init__(self, blocks: list[ResBlock], attns: list[SelfAttention], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)  # empty, or one per block
        self.resample = resample


class MidBlock(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        groups = cfg.attn_norm_groups or (None if cfg.scale_shift_norm else cfg.norm_groups)
        res = dict(temb_dim=cfg.temb_dim, groups=cfg.norm_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                   scale_shift=cfg.scale_shift_norm, output_scale=cfg.mid_scale_factor)
        self.block1 = ResBlock(ch, ch, **res)
        self.attn = SelfAttention(ch, cfg.head_dim, groups, cfg.norm_eps, cfg.mid_scale_factor) if cfg.mid_attention else None
        self.block2 = ResBlock(ch, ch, **res)


# ---------------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): the noise-prediction network of DDPM. See the module docstring for the layout."""

    def __init__(self, config: UNetConfig | Mapping | None = None, **kwargs):
        super().__init__()
        if isinstance(config, Mapping):
            config = UNetConfig.from_dict(config)
        cfg = config or UNetConfig(**kwargs)
        self.config = cfg
        self.gradient_checkpointing = False
        ch, L = cfg.channels, cfg.num_levels
        res = dict(temb_dim=cfg.temb_dim, groups=cfg.norm_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                   scale_shift=cfg.scale_shift_norm)

        def attn(c):
            return SelfAttention(c, cfg.head_dim, cfg.norm_groups, cfg.norm_eps)

        self.time_embed = TimeEmbedding(ch[0], cfg.temb_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        self.class_embed = nn.Embedding(cfg.num_class_embeds, cfg.temb_dim) if cfg.num_class_embeds else None
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        self.down = nn.ModuleList()
        for i in range(L):
            c_in = ch[max(i - 1, 0)]
            blocks = [ResBlock(c_in if j == 0 else ch[i], ch[i], **res) for j in range(cfg.layers_per_level)]
            attns = [attn(ch[i]) for _ in blocks] if cfg.down_attention[i] else []
            self.down.append(Level(blocks, attns, Downsample(ch[i], cfg.downsample_padding) if i < L - 1 else None))

        self.mid = MidBlock(ch[-1], cfg) if cfg.mid_block else None

        # up[i] works at level i's resolution; it runs coarsest first. Its last ResBlock takes the skip that
        # entered level i (the previous level's output, or the stem's), the others skips of width ch[i].
        self.up = nn.ModuleList()
        for i in range(L):
            from_below = ch[min(i + 1, L - 1)]
            blocks = []
            for j in range(cfg.layers_per_level + 1):
                skip_ch = ch[max(i - 1, 0)] if j == cfg.layers_per_level else ch[i]
                blocks.append(ResBlock((from_below if j == 0 else ch[i]) + skip_ch, ch[i], **res))
            attns = [attn(ch[i]) for _ in blocks] if cfg.up_attention[i] else []
            self.up.append(Level(blocks, attns, Upsample(ch[i]) if i > 0 else None))

        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    # ---- forward ----------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.stem.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.stem.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResBlock activations in the backward pass (less memory, ~30% more compute)."""
        self.gradient_checkpointing = enabled

    def _res(self, block: ResBlock, x: torch.Tensor, t_proj: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, t_proj, use_reentrant=False)
        return block(x, t_proj)

    def _res_blocks(self) -> list[ResBlock]:
        """Every ResBlock in execution order (down, mid, up coarsest first)."""
        blocks = [b for level in self.down for b in level.blocks]
        if self.mid is not None:
            blocks += [self.mid.block1, self.mid.block2]
        return blocks + [b for level in reversed(self.up) for b in level.blocks]

    def time_projections(self, temb_act: torch.Tensor) -> list[torch.Tensor]:
        """Every ResBlock's time_proj(SiLU(emb)) from one matmul over their stacked weights (fused: one GEMM
        and one backward instead of one per block). Returns one (B, out or 2*out) tensor per block, in
        `_res_blocks` order."""
        blocks = self._res_blocks()
        weight = torch.cat([b.time_proj.weight for b in blocks])  # (sum of outs, temb_dim)
        bias = torch.cat([b.time_proj.bias for b in blocks])
        return list(F.linear(temb_act, weight, bias).split([b.time_proj.out_features for b in blocks], dim=1))

    def embed(self, timestep, batch: int, class_labels: torch.Tensor | None, device) -> torch.Tensor:
        """SiLU(time embedding [+ class embedding]) (B, temb_dim); every ResBlock applies SiLU first, so once."""
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(batch) if t.shape[0] == 1 else t  # (B,)
        emb = self.time_embed(t)  # (B, temb_dim)
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional (num_class_embeds set): pass class_labels")
            emb = emb + self.class_embed(class_labels.to(device)).to(emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given but the UNet has no class embedding; build it with num_class_embeds")
        return F.silu(emb)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, in, H, W), timestep: int / float / (B,) tensor, class_labels (B,) long -> (B, out, H, W)."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self.embed(timestep, sample.shape[0], class_labels, sample.device)
        t_proj = iter(self.time_projections(temb))
        h = self.stem(sample)  # (B, ch0, H, W)
        skips = [h]
        for level in self.down:
            for j, block in enumerate(level.blocks):
                h = self._res(block, h, next(t_proj))
                if len(level.attns):
                    h = level.attns[j](h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        if self.mid is not None:
            h = self._res(self.mid.block1, h, next(t_proj))
            if self.mid.attn is not None:
                h = self.mid.attn(h)
            h = self._res(self.mid.block2, h, next(t_proj))
        for level in reversed(self.up):
            for j, block in enumerate(level.blocks):
                h = self._res(block, torch.cat([h, skips.pop()], dim=1), next(t_proj))
                if len(level.attns):
                    h = level.attns[j](h)
            if level.resample is not None:
                h = level.resample(h, skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, H, W)

    # ---- diffusers interop --------------------------------------------------------------------------------------
    def diffusers_module_map(self) -> dict[str, str | tuple[str, ...]]:
        """Our module path -> UNet2DModel module path (a tuple of paths for the fused qkv, which is
        [to_q; to_k; to_v] stacked on the output dimension). The one place the two namings meet."""
        L = self.config.num_levels
        m: dict[str, str | tuple[str, ...]] = {
            "stem": "conv_in", "time_embed.fc1": "time_embedding.linear_1", "time_embed.fc2": "time_embedding.linear_2",
            "class_embed": "class_embedding", "norm_out": "conv_norm_out", "conv_out": "conv_out",
        }

        def block(ours, theirs):
            for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("time_proj", "time_emb_proj"), ("norm2", "norm2"),
                         ("conv2", "conv2"), ("skip", "conv_shortcut")):
                m[f"{ours}.{a}"] = f"{theirs}.{b}"

        def attn(ours, theirs):
            m[f"{ours}.norm"] = f"{theirs}.group_norm"
            m[f"{ours}.qkv"] = (f"{theirs}.to_q", f"{theirs}.to_k", f"{theirs}.to_v")
            m[f"{ours}.proj"] = f"{theirs}.to_out.0"

        for path, theirs_level in [(f"down.{i}", f"down_blocks.{i}") for i in range(L)] + \
                                  [(f"up.{i}", f"up_blocks.{L - 1 - i}") for i in range(L)]:
            for j in range(len(self.get_submodule(path).blocks)):
                block(f"{path}.blocks.{j}", f"{theirs_level}.resnets.{j}")
                attn(f"{path}.attns.{j}", f"{theirs_level}.attentions.{j}")
            m[f"{path}.resample.conv"] = f"{theirs_level}.{'downsamplers' if path[0] == 'd' else 'upsamplers'}.0.conv"
        block("mid.block1", "mid_block.resnets.0")
        attn("mid.attn", "mid_block.attentions.0")
        block("mid.block2", "mid_block.resnets.1")
        return m

    def _param_map(self) -> dict[str, str | tuple[str, ...]]:
        """Our state-dict key -> diffusers key(s), for the parameters this UNet actually has."""
        modules = self.diffusers_module_map()
        out = {}
        for key in self.state_dict():
            module, _, leaf = key.rpartition(".")
            theirs = modules.get(module)
            if theirs is None:
                raise KeyError(f"no diffusers name for parameter {key}; extend diffusers_module_map")
            out[key] = tuple(f"{t}.{leaf}" for t in theirs) if isinstance(theirs, tuple) else f"{theirs}.{leaf}"
        return out

    def load_diffusers_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load UNet2DModel weights (its `state_dict()`); every key on both sides must be used exactly once."""
        ours, used = {}, set()
        for key, theirs in self._param_map().items():
            names = theirs if isinstance(theirs, tuple) else (theirs,)
            missing = [n for n in names if n not in state_dict]
            if missing:
                raise KeyError(f"diffusers state dict lacks {missing} (for our {key}); do the configs match?")
            ours[key] = torch.cat([state_dict[n] for n in names]) if len(names) > 1 else state_dict[names[0]]
            used.update(names)
        unused = sorted(set(state_dict) - used)
        if unused:
            raise KeyError(f"diffusers weights not used by this UNet: {unused[:5]}{'...' if len(unused) > 5 else ''}")
        self.load_state_dict(ours, strict=True)

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under UNet2DModel's keys (qkv split back into to_q / to_k / to_v)."""
        sd = self.state_dict()
        out = {}
        for key, theirs in self._param_map().items():
            if isinstance(theirs, tuple):
                for name, part in zip(theirs, sd[key].chunk(len(theirs), dim=0)):
                    out[name] = part.clone()
            else:
                out[theirs] = sd[key]
        return out

    def diffusers_config(self) -> dict:
        return config_to_diffusers(self.config)

    @classmethod
    def from_diffusers(cls, model) -> "UNet":
        """A UNet with the architecture and weights of a diffusers UNet2DModel (duck-typed: `.config` and
        `.state_dict()`), on the same device and in the same dtype."""
        unet = cls(from_diffusers_config(model.config))
        first = next(model.parameters())
        unet.to(device=first.device, dtype=first.dtype)
        unet.load_diffusers_state_dict(model.state_dict())
        return unet
