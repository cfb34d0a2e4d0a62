"""Training-free merges of LoRAs in memory (`merge_loras`): scale, concat, linear, svd, ties, dare, with weights per
LoRA and per UNet block. Inputs and outputs are `LoraState`s; files are read with `read_lora` and written with
`save_lora`. docs/methods.md ('Merging LoRAs') has the same math.

Every module's dense update is dW_i = (alpha_i / r_i) B_i A_i (a convolution's A (r, in, kh, kw) is flattened to
(r, in*kh*kw), B (out, r, 1, 1) to (out, r)). LoRAs that adapt different modules merge over the union: a module a
LoRA does not adapt has dW_i = 0 there. w_i is the LoRA's weight times its block weight for that module.

- scale:  w * dW, folded into B (A and alpha kept).
- concat: the exact sum sum_i w_i dW_i with ranks added: B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...], A = [A_1; A_2; ...],
          s_i = alpha_i / r_i, alpha = rank (scale 1). Default weights 1 (as loading every LoRA at weight 1).
- linear: concat with default weights 1/n (the average); weights given are used as they are.
- svd:    the exact sum, then re-ranked: dW = U S V^T, keep k: B = U_k S_k^(1/2), A = S_k^(1/2) V_k^T, alpha = k.
          k is `rank` (capped by min(out, in*kh*kw)), or the least k whose energy sum_{j<=k} S_j^2 / sum_j S_j^2
          reaches `energy`, or by default the largest rank of the sources at that module. The kept energy is
          reported per module and overall (sum of kept S^2 over all modules / sum of all S^2); at full rank the
          merge reproduces dW to float precision. Computed in float64 on the CPU.
- ties:   TIES-merging (Yadav et al. 2023): each w_i dW_i keeps its top `density` fraction of entries by |value|
          (the rest set to 0); a sign per entry is elected, sign(sum_i kept_i); the merged entry is the mean of the
          kept values that agree with it (0 where none does); then svd as above.
- dare:   DARE (Yu et al. 2024): each entry of each w_i dW_i is dropped with probability `drop` and the survivors
          are scaled by 1 / (1 - drop); the results are summed; then svd. The masks come from one
          torch.Generator seeded with `seed`, drawn in a fixed order (modules sorted, LoRAs in order): the same
          seed gives the same merge. drop = 0 is the svd merge.

Block weights (`blocks`, one spec for all LoRAs or one per LoRA) multiply w_i module by module; see `block_weights`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from customize.formats.common import FAMILY_NAMES, FormatError
from customize.formats.kohya_names import SD_LAYOUT, SDXL_LAYOUT, UNetLayout, diffusers_to_sgm
from customize.formats.lora_detect import detect_lora_family
from customize.formats.lora_state import LoraLayer, LoraState, split_key

METHODS = ("concat", "linear", "svd", "ties", "dare")
SVD_METHODS = ("svd", "ties", "dare")

# A1111 "LoRA Block Weight" (sd-webui-lora-block-weight) block ids, in the order its weight lists give them.
# BASE is the text encoder(s); INnn / MID / OUTnn are the original (sgm) UNet's input_blocks.nn, middle_block and
# output_blocks.nn (diffusers names: `lbw_block`). The short lists leave out the blocks a LoRA of attention layers
# only (kohya "LierLa") has nothing in; a module in a block a list does not name keeps weight 1.
_IDS = {
    "sd_full": ["BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12))],
    "sd": ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
           *(f"OUT{i:02d}" for i in range(3, 12))],
    "sdxl_full": ["BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))],
    "sdxl": ["BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6))],
}
LBW_LISTS = {len(ids): (name, ids) for name, ids in _IDS.items()}  # 26, 17, 20, 12 weights
_LBW_ID = re.compile(r"^(BASE|MID|IN\d\d|OUT\d\d)$")

# Presets (our own definitions, in the spirit of the LBW extension's): "<block or *>=<weight>,..." specs.
# B-LoRA (Frenkel et al. 2024): in SDXL, up_blocks.0.attentions.0 holds content and up_blocks.0.attentions.1 style.
PRESETS = {
    "ALL": "*=1",
    "NONE": "*=0",
    "BASE": "*=0,BASE=1",  # the text encoders only
    "UNET": "BASE=0",  # the UNet only
    "INS": "*=0,BASE=1,down_blocks=1,conv_in=1",  # text encoders and the UNet's input side
    "MIDD": "*=0,BASE=1,mid_block=1",  # text encoders and the middle block
    "OUTS": "*=0,BASE=1,up_blocks=1",  # text encoders and the output side
    "BLORA_CONTENT": "*=0,up_blocks.0.attentions.0=1",
    "BLORA_STYLE": "*=0,up_blocks.0.attentions.1=1",
    "BLORA": "*=0,up_blocks.0.attentions.0=1,up_blocks.0.attentions.1=1",
}


@dataclass
class MergeReport:
    """What a merge did: per module the rank written and the energy kept (svd-based methods; 1.0 for exact ones)."""

    method: str
    modules: dict[str, tuple[int, float]] = field(default_factory=dict)
    kept: float = 0.0  # sum of kept S^2 over all modules
    total: float = 0.0  # sum of all S^2

    @property
    def energy(self) -> float:
        """Overall kept energy: sum of kept S_j^2 / sum of all S_j^2 over every module (1.0 for an exact merge)."""
        return self.kept / self.total if self.total > 0 else 1.0

    @property
    def ranks(self) -> list[int]:
        return sorted({r for r, _ in self.modules.values()})

    def summary(self) -> str:
        lines = [f"method {self.method}: {len(self.modules)} modules, rank {', '.join(map(str, self.ranks))}"]
        if self.method in SVD_METHODS:
            lowest = min(self.modules.items(), key=lambda kv: kv[1][1], default=None)
            lines.append(f"energy kept: {self.energy:.4f} overall" + (
                f", lowest {lowest[1][1]:.4f} ({lowest[0]})" if lowest else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# block weights
# ---------------------------------------------------------------------------------------------------------------


def lbw_block(key: str, layout: UNetLayout) -> str | None:
    """The LBW block id of a LoraState key: BASE for text encoders, INnn / MID / OUTnn for UNet modules in the
    numbered sgm blocks (down_blocks.i.{resnets,attentions}.j -> IN(1 + i*(lpb+1) + j), its downsampler ->
    IN((i+1)*(lpb+1)), conv_in -> IN00, mid_block -> MID, up_blocks.i.*.j -> OUT(i*(lpb+1) + j), its upsampler in
    the level's last entry); None for the rest (time / added embeddings, conv_norm_out, conv_out)."""
    component, module = split_key(key)
    if component != "unet":
        return "BASE"
    try:
        sgm = diffusers_to_sgm(module, layout)
    except (FormatError, IndexError):
        return None
    root, _, rest = sgm.partition(".")
    if root == "middle_block":
        return "MID"
    if root in ("input_blocks", "output_blocks"):
        return f"{'IN' if root == 'input_blocks' else 'OUT'}{int(rest.split('.')[0]):02d}"
    return None


def _parse_spec(spec: str | dict, family: str | None) -> dict[str, float]:
    """A block spec -> {block: weight} with '*' the default (1 unless given)."""
    if isinstance(spec, dict):
        return {str(k): float(v) for k, v in spec.items()}
    text = spec.strip()
    if text.upper() in PRESETS:
        text = PRESETS[text.upper()]
    if "=" not in text:  # an LBW weight list
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"block weights {spec!r}: not a preset ({', '.join(PRESETS)}), a list of "
                             f"{' / '.join(map(str, sorted(LBW_LISTS)))} numbers, or BLOCK=WEIGHT pairs") from None
        if len(values) not in LBW_LISTS:
            raise ValueError(f"block weights {spec!r}: {len(values)} numbers; an LBW list has 17 or 26 (SD 1.x / "
                             "2.x) or 12 or 20 (SDXL)")
        name, ids = LBW_LISTS[len(values)]
        if family is not None and (family == "sdxl") != name.startswith("sdxl"):
            raise ValueError(f"block weights {spec!r}: {len(values)} numbers are an "
                             f"{'SDXL' if name.startswith('sdxl') else 'SD 1.x / 2.x'} list, but the LoRAs are "
                             f"{FAMILY_NAMES[family]}")
        return dict(zip(ids, values))
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        try:
            if not eq:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"block weights {spec!r}: {part!r} is not BLOCK=WEIGHT (e.g. up_blocks.0=0.5, "
                             "OUT03=0, *=0)") from None
        if not math.isfinite(out[name.strip()]):
            raise ValueError(f"block weights {spec!r}: {part!r}: the weight must be a finite number")
    return out


def _matches(name: str, key: str, block: str | None) -> bool:
    if _LBW_ID.match(name):
        return name == block
    component, module = split_key(key)
    if name in ("unet", "text_encoder", "text_encoder_2"):
        return component == name
    return module == name or module.startswith(name + ".")


def block_weights(spec: str | dict | None, keys, family: str | None = None,
                  layout: UNetLayout | None = None) -> dict[str, float]:
    """{LoraState key: weight} for a block spec:

    - a preset name (PRESETS: ALL, NONE, BASE, UNET, INS, MIDD, OUTS, BLORA_CONTENT, BLORA_STYLE, BLORA);
    - an A1111 LBW weight list, "1,0,0,0,1,1,1,1,0,0,0,0,0,0,0,0,0": 17 or 26 numbers for SD 1.x / 2.x, 12 or 20
      for SDXL, in the order of `LBW_LISTS` (ids mapped to diffusers names by `lbw_block`);
    - BLOCK=WEIGHT pairs, "*=0,up_blocks.0.attentions.0=1,MID=0.5": BLOCK is an LBW id (BASE, IN04, MID, OUT03),
      a component (unet, text_encoder, text_encoder_2) or a diffusers module path prefix (down_blocks.1,
      mid_block, up_blocks.0.attentions.1, text_model.encoder.layers.3); '*' sets the default (else 1). The
      longest matching name wins (LBW ids count as the most specific).

    An LBW id the family does not have (IN12), or a name that matches none of `keys`, is refused (a typo would
    otherwise be a silent no-op)."""
    keys = list(keys)
    if spec is None:
        return {k: 1.0 for k in keys}
    table = _parse_spec(spec, family)
    layout = layout or (SDXL_LAYOUT if family == "sdxl" else SD_LAYOUT)
    blocks = {k: lbw_block(k, layout) for k in keys}
    for name in table:
        if name == "*":
            continue
        if _LBW_ID.match(name):  # an LBW id need not hold a module of these LoRAs, but must exist
            known = _IDS["sdxl_full"] if family == "sdxl" else _IDS["sd_full"]
            if name not in known:
                raise ValueError(f"block weights: unknown block {name!r}: {FAMILY_NAMES.get(family, 'an SD')} "
                                 f"UNet has {known[1]}..{known[-1]}, MID and BASE")
            continue
        if not any(_matches(name, k, blocks[k]) for k in keys):
            raise ValueError(f"block weights: unknown block {name!r}: no module of the LoRAs is in it (blocks are "
                             "LBW ids BASE / INnn / MID / OUTnn, unet / text_encoder / text_encoder_2, or diffusers "
                             "paths such as down_blocks.1, mid_block, up_blocks.0.attentions.1)")
    out = {}
    for k in keys:
        hits = [n for n in table if n != "*" and _matches(n, k, blocks[k])]
        best = max(hits, key=lambda n: (bool(_LBW_ID.match(n)), len(n)), default=None)
        out[k] = table[best] if best is not None else table.get("*", 1.0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the merges
# ---------------------------------------------------------------------------------------------------------------


def scale_lora(state: LoraState, weight: float) -> LoraState:
    """`state` with every update multiplied by `weight`, folded into up (down and alpha kept). `state` is not changed."""
    return LoraState({k: LoraLayer(l.down.clone(), l.up * weight, l.alpha) for k, l in state.layers.items()},
                     state.format, dict(state.metadata))


def _flat_delta(layer: LoraLayer) -> torch.Tensor:
    """dW as a float64 (out, in*kh*kw) matrix."""
    return layer.scale * (layer.up.double().flatten(1) @ layer.down.double().flatten(1))


def _svd_layer(dw: torch.Tensor, down_shape: tuple, k_rank: int | None, energy: float | None, default: int,
               dtype) -> tuple[LoraLayer, float, float]:
    """Re-rank a (out, n) float64 matrix; returns the layer and (kept, total) S^2."""
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    s2 = s.square()
    total = float(s2.sum())
    full = s.numel()
    if energy is not None:
        if total == 0:
            k = 1
        else:
            cumulative = torch.cumsum(s2, 0) / total
            k = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12)) + 1
    else:
        k = k_rank if k_rank is not None else default
    k = max(1, min(k, full))
    root = s[:k].sqrt()
    up = (u[:, :k] * root).to(dtype)
    down = (root[:, None] * vh[:k]).to(dtype)
    out_dim = dw.shape[0]
    if len(down_shape) == 4:  # a convolution: A (k, in, kh, kw), B (out, k, 1, 1)
        down = down.reshape(k, *down_shape[1:])
        up = up.reshape(out_dim, k, 1, 1)
    return LoraLayer(down.contiguous(), up.contiguous(), float(k)), float(s2[:k].sum()), total


def _family(states: list[LoraState], names: list[str]) -> str | None:
    found = {}
    for state, name in zip(states, names):
        fam = detect_lora_family(state)
        if fam is not None:
            found.setdefault(fam, name)
    if len(found) > 1:
        (fa, na), (fb, nb) = list(found.items())[:2]
        raise FormatError(f"cannot merge LoRAs for different base families: {na} is for {FAMILY_NAMES[fa]}, "
                          f"{nb} for {FAMILY_NAMES[fb]}")
    return next(iter(found), None)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    flat = delta.flatten()
    keep = max(1, int(math.ceil(density * flat.numel())))
    if keep >= flat.numel():
        return delta.clone()
    idx = flat.abs().topk(keep).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(delta.shape)


def merge_loras(
    loras,
    weights=None,
    method: str = "concat",
    rank: int | None = None,
    energy: float | None = None,
    density: float = 0.5,
    drop: float = 0.5,
    seed: int = 0,
    blocks=None,
    names=None,
    layout: UNetLayout | None = None,
) -> tuple[LoraState, MergeReport]:
    """Merge LoRAs in memory (module docstring and docs/methods.md, 'Merging LoRAs', have the math).

    `loras`: LoraStates or LoRA file paths. `weights`: one per LoRA (default 1 each; linear: 1/n each). `method`:
    concat | linear (exact, ranks add) | svd | ties | dare (re-ranked by SVD to `rank`, or to the least rank
    keeping the `energy` fraction, or by default to the largest source rank of each module). `density`: the
    fraction TIES keeps; `drop`: DARE's drop probability, with `seed`. `blocks`: per-block weights, one spec for
    every LoRA or a list with one per LoRA (None: all 1; see `block_weights`). `names`: what errors call the LoRAs.
    The sources are not changed. Returns the merged LoraState (alpha = rank per module; metadata
    customize.merge, customize.base_family) and a MergeReport (ranks, energy kept).

        import customize
        merged, report = customize.merge_loras(["dog.safetensors", "style.safetensors"], weights=[1.0, 0.7],
                                               method="ties", rank=16, density=0.5)
        print(report.summary())
        customize.save_lora(merged, "dog_style.safetensors", "kohya")
    """
    import json

    from customize.formats.lora_read import read_lora

    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    loras = list(loras)
    if not loras:
        raise ValueError("nothing to merge: give at least one LoRA")
    names = list(names) if names is not None else [
        str(x) if not isinstance(x, LoraState) else f"LoRA {i + 1}" for i, x in enumerate(loras)]
    states = [x if isinstance(x, LoraState) else read_lora(x, layout) for x in loras]
    n = len(states)
    if weights is None:
        weights = [1.0 / n if method == "linear" else 1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} LoRAs: give one weight per LoRA")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights {weights}: every weight must be a finite number")
    if method in ("concat", "linear") and (rank is not None or energy is not None):
        raise ValueError(f"--method {method} is exact (ranks add); a target rank or energy needs --method svd, "
                         "ties or dare")
    if rank is not None and energy is not None:
        raise ValueError("give a target rank or an energy fraction, not both")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank <= 0):
        raise ValueError(f"rank {rank}: must be a positive whole number")
    if energy is not None and not (0 < energy <= 1):
        raise ValueError(f"energy {energy}: must be a fraction in (0, 1] (e.g. 0.9)")
    if not (0 < density <= 1):
        raise ValueError(f"density {density}: TIES keeps this fraction of each update; must be in (0, 1]")
    if not (0 <= drop < 1):
        raise ValueError(f"drop {drop}: DARE's drop probability must be in [0, 1)")

    family = _family(states, names)
    keys = sorted(set().union(*(s.layers for s in states)))
    for key in keys:
        shapes = {(tuple(s.layers[key].up.shape[:1]), tuple(s.layers[key].down.shape[1:]))
                  for s in states if key in s.layers}
        if len(shapes) > 1:
            raise FormatError(f"module {key!r} has different shapes in the LoRAs ({sorted(shapes)}): they were made "
                              "for different base models")
    specs = blocks if isinstance(blocks, (list, tuple)) else [blocks] * n
    if len(specs) != n:
        raise ValueError(f"{len(specs)} block-weight specs for {n} LoRAs: give one for all or one per LoRA")
    # checked against the union of modules: a block only one LoRA adapts is still a known block
    per_block = [block_weights(spec, keys, family, layout) if spec is not None else None for spec in specs]

    def weight(i: int, key: str) -> float:
        return weights[i] * (per_block[i][key] if per_block[i] is not None else 1.0)

    # the widest dtype of the sources (the first LoRA need not adapt the first module of the union)
    dtype = next(iter(next(s for s in states if s.layers).layers.values())).up.dtype if keys else torch.float32
    for s in states:
        for layer in s.layers.values():
            dtype = torch.promote_types(dtype, layer.up.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32

    report = MergeReport(method)
    layers: dict[str, LoraLayer] = {}
    generator = torch.Generator().manual_seed(int(seed))
    for key in keys:
        present = [(i, s.layers[key]) for i, s in enumerate(states) if key in s.layers]
        down_shape = tuple(present[0][1].down.shape)
        if method in ("concat", "linear"):
            ups = [(weight(i, key) * l.scale) * l.up.double() for i, l in present]
            downs = [l.down.double() for _, l in present]
            up, down = torch.cat(ups, dim=1).to(dtype), torch.cat(downs, dim=0).to(dtype)
            layers[key] = LoraLayer(down.contiguous(), up.contiguous(), float(down.shape[0]))
            report.modules[key] = (down.shape[0], 1.0)
            continue
        deltas = [weight(i, key) * _flat_delta(l) for i, l in present]
        if method == "svd":
            merged = torch.stack(deltas).sum(0)
        elif method == "dare":
            kept = []
            for d in deltas:
                mask = torch.rand(d.shape, generator=generator, dtype=torch.float64) >= drop
                kept.append(d * mask / (1 - drop))
            merged = torch.stack(kept).sum(0)
        else:  # ties
            trimmed = torch.stack([_trim(d, density) for d in deltas])
            sign = torch.sign(trimmed.sum(0))
            agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
            count = agree.sum(0).clamp(min=1)
            merged = (trimmed * agree).sum(0) / count
        default = max(l.rank for _, l in present)
        layer, kept_s2, total_s2 = _svd_layer(merged, down_shape, rank, energy, default, dtype)
        layers[key] = layer
        report.kept += kept_s2
        report.total += total_s2
        report.modules[key] = (layer.rank, kept_s2 / total_s2 if total_s2 > 0 else 1.0)

    metadata = {"customize.merge": json.dumps({
        "method": method, "sources": names, "weights": weights,
        **({"rank": rank} if rank is not None else {}), **({"energy": energy} if energy is not None else {}),
        **({"density": density} if method == "ties" else {}), **({"drop": drop, "seed": seed} if method == "dare" else {}),
        **({"blocks": [s if not isinstance(s, dict) else dict(s) for s in specs]} if blocks is not None else {}),
    })}
    if family:
        metadata["customize.base_family"] = family
    if any(s.metadata.get("customize.unet_names") == "sgm" for s in states):
        metadata["customize.unet_names"] = "sgm"
    return LoraState(layers, "memory", metadata), report
