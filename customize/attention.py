"""The attention layer: diffusers attention processors that hand a UNet layer's attention probabilities to a
controller, which may read them (heat maps, the toy grounding loss) or edit them (Prompt-to-Prompt, Hertz et al.
2022). Installed through `unet.set_attn_processor`, on the layers the controller asks for only.

A layer with queries Q = x W_q (N pixels), keys K = c W_k and values V = c W_v (L tokens for cross-attention,
c = the text encoder's states; N pixels for self-attention, c = x) computes, per head,

    M = softmax(Q K^T / sqrt(d))        (N x L),        out = M V

Torch's scaled_dot_product_attention never forms M (on a GPU a fused kernel; that is what lets SDXL at 1024 px
fit: a 64x64 layer's self-attention M is 4096 x 4096 per head and image). So `install` gives the explicit
processor (`ControlledProcessor`) only to the layers the controller names, and even there M is only formed on
the calls the controller wants (its resolution limit, its step schedule); every other call goes to the processor
the layer had (diffusers' AttnProcessor2_0 by default). An edit therefore costs little more than a plain
generation: the explicit maps of the cross-attention layers (L = 77 columns, small) and of the low-resolution
self-attention layers for the first steps.

Controller protocol (duck-typed; `Controller` is the base class with the defaults):

    edits: bool                     True: the processor computes out = M' V with M' what the controller returns;
                                    False (an observer: AttentionStore, the toy grounding recorder): the returned
                                    value is ignored and the layer's previous processor computes the output, so
                                    the image is bitwise what it is without the controller (the cost: Q and K
                                    projected twice on the observed layers).
    step: int                       the current denoising step, 0-based; `step_callback` advances it.
    layer_needed(name, is_cross, place) -> bool
                                    at install: does this layer get the explicit processor?
    wants(is_cross, place, name, step, pixels) -> bool
                                    per call: form M on this call? (pixels = N, the layer's query count h*w)
    __call__(probs, is_cross, place, name, step) -> probs | None
                                    probs (B, heads, N, L); returns the probabilities the layer uses (same shape),
                                    or None: this call was only observed, the layer's previous processor
                                    computes the output (LocalBlend reads maps on steps its base leaves alone).

  `name` is the layer's processor key ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"),
  `place` "down" / "mid" / "up", `is_cross` the layer's own flag (Attention.is_cross_attention).

The step: advanced by the pipeline's `callback_on_step_end` (a hook every diffusers text-to-image pipeline
supports), not by counting UNet calls: a caller that calls the UNet more than once per step (an inversion's
optimisation) or several pipelines sharing a controller would miscount. `customize.inference.edit` passes
`controller.step_callback`; for a direct pipeline call pass `callback_on_step_end=controller.step_callback` and
call `controller.reset()` before. During the UNet call of step i, `controller.step == i`.

Batch layout: a diffusers pipeline calls the UNet once per step with the classifier-free-guidance batch
concatenated, rows [uncond_0 .. uncond_{n-1}, cond_0 .. cond_{n-1}] for n prompts (without guidance, the n
conditional rows only). The editing controllers edit the conditional rows: row 0 is the source prompt, rows
1..n-1 the targets. The unconditional rows read the negative prompt, which the token mappers do not describe,
so they are left to themselves (as the paper's maps are those of the conditional prediction).

The Prompt-to-Prompt controllers (the math is in docs/methods.md, "Prompt-to-Prompt"):

    Replace   word swap (same number of words): the target's cross-attention M* <- M A (A the token mapper,
              L x L) for the steps of `cross_replace_steps` (a fraction, a (start, end) pair, or a per-word
              dict), its self-attention M* <- M for `self_replace_steps` on layers of at most
              `self_max_pixels` pixels.
    Refine    added / removed words: M*[:, j] <- M[:, a(j)] for the target tokens j aligned with a source token
              a(j); new tokens keep their own maps. Self-attention as Replace.
    Reweight  M*[:, j] <- c_j M*[:, j] for the given words' tokens, after an optional base (Replace / Refine).
    LocalBlend
              edits the latents, not the maps: after each step from `start_blend` on, target latent
              z* <- z + B (z* - z), B a binary mask from the blend words' cross-attention maps (the pixels where
              the edit may happen; `invert`: the pixels that must stay); composes with a base (Replace / Refine /
              Reweight) that edits the maps.
    AttentionStore
              an observer: the maps averaged over heads and steps, per layer, for layers of at most
              `max_pixels` pixels (heat maps).

The resolution limit is in pixels of the layer (N = h*w of its feature map), not a block index, so it means the
same memory for every layout: at 1024 (32x32) it covers SD 1.x/2.x at 512 px (64x64 latents) on its 32x32,
16x16 and 8x8 layers and SDXL at 1024 px (128x128 latents) on its 32x32 layers (where 60 of its 70 transformer
blocks sit: down_blocks.2, mid, up_blocks.0), never SDXL's 64x64 layers whose explicit maps would cost
16M floats per head and image.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

PLACES = ("down", "mid", "up")


def place_of(name: str) -> str:
    """"down" / "mid" / "up" from a layer's name in a UNet2DConditionModel."""
    head = name.split(".", 1)[0]
    for place in PLACES:
        if head.startswith(place):
            return place
    raise ValueError(f"cannot tell where {name!r} sits in the UNet (expected down_blocks / mid_block / up_blocks)")


class ControlledProcessor:
    """An attention processor that forms the attention probabilities explicitly and hands them to `controller`
    on the calls it wants; on the other calls (and for an observer, always for the output) it defers to `inner`,
    the processor the layer had. Its explicit path has AttnProcessor2_0's surface: spatial norm, 4-D inputs,
    attention masks (attn.prepare_attention_mask), group norm, norm_cross, norm_q / norm_k, residual connection
    and rescale_output_factor; the probabilities are attn.get_attention_scores's (upcast_attention and
    upcast_softmax honoured). Gradients flow through them (the toy base's grounding loss trains on them)."""

    def __init__(self, controller, name: str, is_cross: bool, inner):
        self.controller, self.name, self.is_cross, self.inner = controller, name, is_cross, inner
        self.place = place_of(name)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        ctl = self.controller
        pixels = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]
        step = ctl.step
        if not ctl.wants(self.is_cross, self.place, self.name, step, pixels):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        x = hidden_states if attn.spatial_norm is None else attn.spatial_norm(hidden_states, temb)
        four_d = x.ndim == 4
        if four_d:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)  # (B, N, C)
        batch = x.shape[0]
        context_len = (x if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        mask = attention_mask  # as given, for `inner`
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)  # (B*heads, 1|N, L)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(x)  # (B, N, inner)
        if encoder_hidden_states is None:
            context = x
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key = attn.to_k(context)  # (B, L, inner)
        heads, head_dim = attn.heads, key.shape[-1] // attn.heads
        q = query.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        k = key.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        probs = attn.get_attention_scores(q.flatten(0, 1), k.flatten(0, 1), attention_mask)  # (B*heads, N, L)
        probs = probs.view(batch, heads, *probs.shape[1:])  # (B, heads, N, L)
        returned = ctl(probs, self.is_cross, self.place, self.name, step)
        if not ctl.edits or returned is None:  # observed only: the layer's own processor computes the output,
            # bitwise as without the controller
            return self.inner(attn, hidden_states, encoder_hidden_states, mask, temb, *args, **kwargs)
        v = attn.to_v(context).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
        out = returned.to(v.dtype) @ v  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)  # (B, N, inner)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ------------------------------------------------------------------------------------------------ installing


def layer_pixels(unet, name: str, latent_size: tuple[int, int]) -> int:
    """N = h*w of a layer's feature map for latents of `latent_size` (h, w) in a UNet2DConditionModel: every
    down block but the last halves the resolution (a stride-2 convolution, ceil), every up block but the last
    doubles it, so down_blocks.i sits at 1/2^i, the mid block at 1/2^(n-1), up_blocks.i at 1/2^(n-1-i)."""
    n = len(unet.config.block_out_channels)
    place = place_of(name)
    level = n - 1 if place == "mid" else int(name.split(".")[1])
    if place == "up":
        level = n - 1 - level
    h, w = latent_size
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h * w


def install(unet, controller, latent_size: tuple[int, int] | None = None) -> dict:
    """Give the layers `controller.layer_needed` names a `ControlledProcessor` (the others keep their processors)
    and return the processors that were there, for `unet.set_attn_processor(returned)` to put back. With
    `latent_size` (h, w) the controller is told each layer's pixel count and can leave out layers above its
    resolution limit; without it (pixels=None) it keeps them and decides per call. A layer that already has a
    ControlledProcessor is re-wrapped around that processor's own `inner` (controllers do not nest this way;
    compose them instead, e.g. Reweight(base=Replace(...)))."""
    before = dict(unet.attn_processors)
    procs = {}
    for key, proc in before.items():
        inner = proc.inner if isinstance(proc, ControlledProcessor) else proc
        is_cross = bool(unet.get_submodule(key.removesuffix(".processor")).is_cross_attention)
        pixels = layer_pixels(unet, key, latent_size) if latent_size is not None else None
        needed = controller.layer_needed(key, is_cross, place_of(key), pixels)
        procs[key] = ControlledProcessor(controller, key, is_cross, inner) if needed else proc
    unet.set_attn_processor(procs)  # a full dict: diffusers wants one entry per layer (and pops them)
    return before


def controlled_layers(unet) -> list[str]:
    """The layers that have a ControlledProcessor now."""
    return [k for k, p in unet.attn_processors.items() if isinstance(p, ControlledProcessor)]


# ------------------------------------------------------------------------------------------------ controllers


class Controller:
    """The protocol's defaults (see the module docstring): every layer, every call, probabilities unchanged.
    `prepare(tokenizer, prompts, num_steps)` is called by `customize.inference.edit` before the pipeline runs
    (prompts[0] the source, the rest targets): what the token mappers and the schedules are built from."""

    edits = True

    def __init__(self):
        self.step = 0
        self.num_prompts: int | None = None
        self.num_steps: int | None = None

    def prepare(self, tokenizer, prompts: Sequence[str], num_steps: int) -> None:
        self.num_prompts, self.num_steps = len(prompts), int(num_steps)

    def reset(self) -> None:
        self.step = 0

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """For `callback_on_step_end`: called after step `step`, so the next UNet call is step + 1."""
        self.step = step + 1
        return callback_kwargs

    def layer_needed(self, name: str, is_cross: bool, place: str, pixels: int | None) -> bool:
        return True

    def wants(self, is_cross: bool, place: str, name: str, step: int, pixels: int) -> bool:
        return True

    def __call__(self, probs: torch.Tensor, is_cross: bool, place: str, name: str, step: int) -> torch.Tensor:
        return probs

    def conditional_start(self, rows: int) -> int:
        """First conditional row of a UNet batch of `rows`: n with classifier-free guidance (2n rows), 0 without."""
        n = self.num_prompts
        if n is None:
            raise RuntimeError(f"{type(self).__name__} was not prepared: call prepare(tokenizer, prompts, "
                               "num_steps) or use customize.inference.edit")
        if rows == 2 * n:
            return n
        if rows == n:
            return 0
        raise ValueError(f"{type(self).__name__} prepared for {n} prompts got a UNet batch of {rows} rows (expected "
                         f"{n} or {2 * n}: one image per prompt, num_images_per_prompt=1)")


class AttentionStore(Controller):
    """An observer: per layer, the attention maps averaged over heads and over the calls it saw (one per step),
    (B, N, L) for cross-attention, (B, N, N) for self-attention when `self_attention`, on layers of at most
    `max_pixels` pixels (default 32x32; heat maps want the 16x16 layers of SD at 512 px, the 32x32 of SDXL at
    1024). B is the UNet batch: [uncond rows, cond rows] under classifier-free guidance. The maps are stored
    detached, in float32. The image is bitwise the one without the store (the layer's own processor computes
    the output)."""

    edits = False

    def __init__(self, max_pixels: int = 32 * 32, cross: bool = True, self_attention: bool = False):
        super().__init__()
        self.max_pixels, self.cross, self.self_attention = int(max_pixels), cross, self_attention
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        super().reset()
        self.sums.clear()
        self.counts.clear()

    def layer_needed(self, name, is_cross, place, pixels):
        return (self.cross if is_cross else self.self_attention) and (pixels is None or pixels <= self.max_pixels)

    def wants(self, is_cross, place, name, step, pixels):
        return (self.cross if is_cross else self.self_attention) and pixels <= self.max_pixels

    def __call__(self, probs, is_cross, place, name, step):
        m = probs.detach().float().mean(1)  # (B, N, L)
        self.sums[name] = self.sums[name] + m if name in self.sums else m
        self.counts[name] = self.counts.get(name, 0) + 1
        return probs

    def maps(self) -> dict[str, torch.Tensor]:
        """{layer: (B, N, L) mean map}."""
        return {k: s / self.counts[k] for k, s in self.sums.items()}

    def cross_maps(self, side: int | None = None) -> torch.Tensor:
        """(B, L, side, side): the cross-attention maps of every stored layer (square grids), each resized
        bilinearly to side x side (default the largest stored grid), averaged over layers."""
        cross = [m for k, m in self.maps().items() if m.shape[-1] != m.shape[-2] or ".attn2." in k]
        if not cross:
            raise ValueError("no cross-attention maps stored (was the store installed, and did a pipeline run?)")
        sides = [math.isqrt(m.shape[1]) for m in cross]
        side = side or max(sides)
        grids = [F.interpolate(m.transpose(1, 2).reshape(m.shape[0], m.shape[2], s, s), size=(side, side),
                               mode="bilinear", align_corners=False) for m, s in zip(cross, sides)]
        return torch.stack(grids).mean(0)


def word_maps(store: AttentionStore, tokenizer, prompt: str, index: int = 0,
              side: int | None = None) -> tuple[list[str], torch.Tensor]:
    """(words, (W, side, side)): the stored cross-attention map of each whitespace word of `prompt`, summed over
    the word's tokens (each token's column of M; a word of several tokens is drawn where any of them attends),
    from the conditional row of prompt `index` (0 the source of an edit; 0 for a plain one-prompt run) of
    `store.cross_maps(side)`. What a user reads to choose blend words and reweighting: a word's map lights up
    where the word is drawn."""
    grids = store.cross_maps(side)  # (B, L, side, side)
    rows = grids.shape[0]
    n = store.num_prompts or (rows // 2 if rows % 2 == 0 else rows)
    start = n if rows == 2 * n else 0
    if not 0 <= index < n:
        raise ValueError(f"prompt index {index} is out of range for a store of {n} prompt(s)")
    row = grids[start + index]  # (L, side, side)
    words = prompt.split()
    positions = word_tokens(tokenizer, prompt)
    return words, torch.stack([row[p].sum(0) for p in positions])


def attention_heatmaps(store: AttentionStore, tokenizer, prompt: str, image, index: int = 0, tile: int = 128):
    """A PNG-ready PIL image: one tile per word of `prompt`, the word's cross-attention map (`word_maps`) as a
    heat overlay on `image` (the generated image of that prompt), labelled with the word
    (customize.plots.heatmap_row). The start and end tokens are left out: they take most of the attention
    everywhere and say nothing about where a word is drawn."""
    from customize.plots import heatmap_row

    words, maps = word_maps(store, tokenizer, prompt, index)
    return heatmap_row(image, maps.numpy(), words, tile=tile, title=f"cross-attention: {prompt}")


# ------------------------------------------------------------------------------------------------ tokens


def word_tokens(tokenizer, prompt: str) -> list[list[int]]:
    """The token positions of each whitespace-separated word of `prompt` in the tokenizer's padded sequence
    (position 0 is the start token). A prompt whose tokens do not fit (model_max_length - 2) is a ValueError:
    the pipeline would silently truncate it, and the truncated words' maps would not exist."""
    positions, at = [], 1
    for word in prompt.split():
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        positions.append(list(range(at, at + n)))
        at += n
    room = tokenizer.model_max_length - 2
    if at - 1 > room:
        raise ValueError(f"the prompt {prompt!r} is {at - 1} tokens long; the tokenizer takes {room} (shorten it)")
    whole = tokenizer(prompt, add_special_tokens=False).input_ids
    if len(whole) != at - 1:  # words tokenized alone differ from the prompt's tokens: positions would be wrong
        raise ValueError(f"cannot place the words of {prompt!r} on its tokens (the tokenizer merges across spaces)")
    return positions


def _align_tail(mapping: list[int], src_end: int, tgt_end: int, length: int) -> None:
    """The end token and the padding after the words: target position tgt_end + k <- source src_end + k (the
    last source position where the source runs out)."""
    for k in range(length - tgt_end):
        mapping[tgt_end + k] = min(src_end + k, length - 1)


def replace_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """(L, L) matrix A with target map M* = M A (columns = target tokens): for a word pair that is the same
    word, its tokens map one to one; for a swapped word of a source tokens and b target tokens, each target
    token gets the mean of the source word's a maps (A = 1/a on that block). Start token, end token and padding
    follow the words. The prompts must have the same number of words (else a ValueError: use Refine)."""
    src_words, tgt_words = source.split(), target.split()
    if len(src_words) != len(tgt_words):
        raise ValueError(f"Replace swaps words one for one, but {source!r} has {len(src_words)} words and "
                         f"{target!r} has {len(tgt_words)}: use Refine for added or removed words")
    src, tgt = word_tokens(tokenizer, source), word_tokens(tokenizer, target)
    length = tokenizer.model_max_length
    a = torch.zeros(length, length)
    a[0, 0] = 1.0
    for s, t in zip(src, tgt):
        if len(s) == len(t):
            a[s, t] = 1.0  # same token count (the same word, or a swap): token by token
        else:
            a[s[0]:s[-1] + 1, t[0]:t[-1] + 1] = 1.0 / len(s)
    tail = [0] * length
    _align_tail(tail, 1 + sum(map(len, src)), 1 + sum(map(len, tgt)), length)
    ends = range(1 + sum(map(len, tgt)), length)
    a[[tail[j] for j in ends], list(ends)] = 1.0
    return a


def refine_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """(L,) long: a(j), the source position whose map target token j takes, or -1 for a token of a word the
    source does not have (it keeps its own map). Words are aligned by the longest matching blocks of the two
    word sequences (difflib), equal words token by token; start, end and padding follow."""
    src_words, tgt_words = source.split(), target.split()
    src, tgt = word_tokens(tokenizer, source), word_tokens(tokenizer, target)
    length = tokenizer.model_max_length
    mapping = [-1] * length
    mapping[0] = 0
    matcher = difflib.SequenceMatcher(None, src_words, tgt_words, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            for i, j in zip(src[block.a + k], tgt[block.b + k]):
                mapping[j] = i
    _align_tail(mapping, 1 + sum(map(len, src)), 1 + sum(map(len, tgt)), length)
    return torch.tensor(mapping)


def _window(value, what: str) -> tuple[float, float]:
    """A schedule entry: f -> steps [0, f); (start, end) -> [start, end); fractions of the steps."""
    start, end = (0.0, value) if isinstance(value, (int, float)) else value
    start, end = float(start), float(end)
    if not 0 <= start <= end <= 1:
        raise ValueError(f"{what} must be a fraction in [0, 1] or a (start, end) pair with 0 <= start <= end <= 1, "
                         f"got {value!r}")
    return start, end


def _on(window: tuple[float, float], num_steps: int) -> torch.Tensor:
    """(T,) bool: step i is on when start*T <= i < end*T."""
    i = torch.arange(num_steps)
    return (i >= window[0] * num_steps) & (i < window[1] * num_steps)


def _words_in(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of every token of every occurrence of `word` (one or more whitespace words) in `prompt`."""
    words, positions = prompt.split(), word_tokens(tokenizer, prompt)
    key = word.split()
    found = []
    for i in range(len(words) - len(key) + 1):
        if words[i:i + len(key)] == key:
            found += [p for w in positions[i:i + len(key)] for p in w]
    return found


# ------------------------------------------------------------------------------------------------ editing


class _PromptEdit(Controller):
    """Replace and Refine: the target rows take the source row's self-attention maps for the steps of
    `self_replace_steps` on layers of at most `self_max_pixels` pixels, and its cross-attention maps through
    the token mapper for the steps of `cross_replace_steps` (per word: {"word": schedule, "default_":
    schedule}; words of the target prompts)."""

    def __init__(self, cross_replace_steps=0.8, self_replace_steps=0.4, self_max_pixels: int = 32 * 32):
        super().__init__()
        if not isinstance(cross_replace_steps, Mapping):
            cross_replace_steps = {"default_": cross_replace_steps}
        # words a dict does not name follow "default_", no replacement when it has none
        self.cross_windows = {"default_": (0.0, 0.0)} | {
            w: _window(v, f"cross_replace_steps[{w!r}]") for w, v in cross_replace_steps.items()}
        self.self_window = _window(self_replace_steps, "self_replace_steps")
        self.self_max_pixels = int(self_max_pixels)

    def prepare(self, tokenizer, prompts, num_steps):
        super().prepare(tokenizer, prompts, num_steps)
        if len(prompts) < 2:
            raise ValueError(f"{type(self).__name__} edits a source prompt into target prompts: got {len(prompts)} "
                             "prompt(s)")
        source, targets = prompts[0], prompts[1:]
        self.mappers = [self.mapper(tokenizer, source, t) for t in targets]
        length, steps = tokenizer.model_max_length, self.num_steps
        alpha = _on(self.cross_windows["default_"], steps)[None, :, None].repeat(len(targets), 1, length)
        for word, window in self.cross_windows.items():
            if word == "default_":
                continue
            hits = [_words_in(tokenizer, t, word) for t in targets]
            if not any(hits):
                raise ValueError(f"cross_replace_steps names {word!r}, which is in no target prompt: {targets}")
            for j, positions in enumerate(hits):
                alpha[j][:, positions] = _on(window, steps)[:, None]
        self.cross_alpha = alpha.float()  # (targets, T, L): 1 where the target token takes the source's map
        self.self_on = _on(self.self_window, steps)  # (T,)

    def mapper(self, tokenizer, source, target):
        raise NotImplementedError

    def layer_needed(self, name, is_cross, place, pixels):
        if is_cross:
            return any(e > s for s, e in self.cross_windows.values())
        return self.self_window[1] > self.self_window[0] and (pixels is None or pixels <= self.self_max_pixels)

    def wants(self, is_cross, place, name, step, pixels):
        if step >= self.num_steps:
            return False
        if is_cross:
            return bool(self.cross_alpha[:, step].any())
        return bool(self.self_on[step]) and pixels <= self.self_max_pixels

    def __call__(self, probs, is_cross, place, name, step):
        start = self.conditional_start(probs.shape[0])
        src, own = probs[start:start + 1], probs[start + 1:]  # (1, h, N, L), (targets, h, N, L)
        if is_cross:
            alpha = self.cross_alpha[:, step].to(probs)[:, None, None, :]  # (targets, 1, 1, L)
            new = alpha * self.map_cross(src, own) + (1 - alpha) * own
        elif self.self_on[step]:
            new = src.expand_as(own)
        else:
            new = own
        return torch.cat([probs[:start + 1], new])

    def map_cross(self, src: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Replace(_PromptEdit):
    """Word swap ("a red circle" -> "a red square"): target cross-attention M* = M A with A from
    `replace_mapper` (the prompts must have the same number of words), self-attention as `_PromptEdit`."""

    def mapper(self, tokenizer, source, target):
        return replace_mapper(tokenizer, source, target)

    def map_cross(self, src, own):
        a = torch.stack(self.mappers).to(src)  # (targets, L, L)
        return torch.einsum("hnl,tlm->thnm", src[0], a)  # (targets, h, N, L)


class Refine(_PromptEdit):
    """Added or removed words ("a circle" -> "a red circle"): target token j takes the source map of its
    aligned token a(j) (`refine_mapper`); tokens of new words keep their own maps."""

    def mapper(self, tokenizer, source, target):
        return refine_mapper(tokenizer, source, target)

    def map_cross(self, src, own):
        index = torch.stack(self.mappers).to(src.device)  # (targets, L)
        taken = src[0][..., index.clamp_min(0)].permute(2, 0, 1, 3)  # (h, N, targets, L) -> (targets, h, N, L)
        return torch.where((index >= 0)[:, None, None, :], taken, own)


class Reweight(Controller):
    """Scale the cross-attention of words of the target prompts: M*[:, j] <- c_w M*[:, j] for the tokens j of
    each word w in `weights` ({"red": 2.0, "background": 0.5}; a word may be several words, "blue background").
    With `base` (a Replace or Refine) the base edits first and the weights apply to its result, the paper's
    attention re-weighting when the target is the source prompt itself: Reweight(w, base=Replace(...)) on
    (p, [p]). Without a base the targets' own maps are scaled. On every step, every cross-attention layer."""

    def __init__(self, weights: Mapping[str, float], base: Controller | None = None):
        super().__init__()
        if not weights:
            raise ValueError("Reweight needs at least one {word: weight}")
        self.weights = {str(w): float(c) for w, c in weights.items()}
        self.base = base

    def prepare(self, tokenizer, prompts, num_steps):
        super().prepare(tokenizer, prompts, num_steps)
        if self.base is not None:
            self.base.prepare(tokenizer, prompts, num_steps)
        targets = prompts[1:]
        scale = torch.ones(len(targets), tokenizer.model_max_length)
        for word, c in self.weights.items():
            hits = [_words_in(tokenizer, t, word) for t in targets]
            if not any(hits):
                raise ValueError(f"Reweight names {word!r}, which is in no target prompt: {targets}")
            for j, positions in enumerate(hits):
                scale[j, positions] = c
        self.scale = scale  # (targets, L)

    def layer_needed(self, name, is_cross, place, pixels):
        return is_cross or (self.base is not None and self.base.layer_needed(name, is_cross, place, pixels))

    def wants(self, is_cross, place, name, step, pixels):
        return is_cross or (self.base is not None and self.base.wants(is_cross, place, name, step, pixels))

    def reset(self):
        super().reset()
        if self.base is not None:
            self.base.reset()

    def step_callback(self, pipe, step, timestep, callback_kwargs):
        if self.base is not None:  # a base with work at the step's end (LocalBlend) gets its callback
            callback_kwargs = self.base.step_callback(pipe, step, timestep, callback_kwargs)
        return super().step_callback(pipe, step, timestep, callback_kwargs)

    def __call__(self, probs, is_cross, place, name, step):
        if self.base is not None and self.base.wants(is_cross, place, name, step, probs.shape[2]):
            edited = self.base(probs, is_cross, place, name, step)
            probs = probs if edited is None else edited  # None: the base only observed this call
        if not is_cross:
            return probs
        start = self.conditional_start(probs.shape[0])
        scaled = probs[start + 1:] * self.scale.to(probs)[:, None, None, :]  # (targets, h, N, L)
        return torch.cat([probs[:start + 1], scaled])


class Observed(Controller):
    """`controller` with observers riding along (an AttentionStore for the heat maps of an edit): every layer
    either needs gets the explicit processor, each call goes to the observers that want it (their return
    values ignored), then to the controller if it wants it (its maps are what the layer uses; None when it
    does not want the call: the layer's own processor computes the output). Prepared, reset and advanced
    together, the controller's step callback first (it may edit the latents).

        store = AttentionStore()
        edit(pipe, source, target, seed, Observed(Replace(0.8, 0.4), store))
    """

    def __init__(self, controller: Controller, *observers: Controller):
        super().__init__()
        self.controller, self.observers = controller, list(observers)
        self.edits = getattr(controller, "edits", True)

    def _all(self):
        return [self.controller, *self.observers]

    def prepare(self, tokenizer, prompts, num_steps):
        super().prepare(tokenizer, prompts, num_steps)
        for c in self._all():
            c.prepare(tokenizer, prompts, num_steps)

    def reset(self):
        super().reset()
        for c in self._all():
            c.reset()

    def step_callback(self, pipe, step, timestep, callback_kwargs):
        for c in self._all():
            callback_kwargs = c.step_callback(pipe, step, timestep, callback_kwargs)
        return super().step_callback(pipe, step, timestep, callback_kwargs)

    def layer_needed(self, name, is_cross, place, pixels):
        return any(c.layer_needed(name, is_cross, place, pixels) for c in self._all())

    def wants(self, is_cross, place, name, step, pixels):
        return any(c.wants(is_cross, place, name, step, pixels) for c in self._all())

    def __call__(self, probs, is_cross, place, name, step):
        pixels = probs.shape[2]
        for observer in self.observers:
            if observer.wants(is_cross, place, name, step, pixels):
                observer(probs, is_cross, place, name, step)
        if self.edits and self.controller.wants(is_cross, place, name, step, pixels):
            return self.controller(probs, is_cross, place, name, step)
        if not self.edits and self.controller.wants(is_cross, place, name, step, pixels):
            self.controller(probs, is_cross, place, name, step)
        return None


# ------------------------------------------------------------------------------------------------ local blending

# LocalBlend's defaults, by what the words' mask marks. Where the blurry map is unsure (the object's rim), the
# pixel is better the target's than the source's: the target row is drawn as one picture (its rim matches what
# it drew next to it), while a source pixel pasted in keeps whatever the source had there. So the mask leans
# towards the target on either side:
# - the region that changes (the paper's local edit): generous, 0.3 of the peak after a dilation of 1;
# - the region that is kept (invert=True, a background swap): tight, 0.4 of the peak and no dilation. At 0.3 the
#   kept region of the toy model overhangs the shape by a latent pixel in a quarter of the cases (the 4 x 4 maps
#   are blobs centred on the shape's centroid: below a triangle's base); the old background kept there shows as
#   a speck of its colour fused to the shape, and the shape reads as another (docs/benchmarks.md).
BLEND_THRESHOLD, BLEND_DILATION = 0.3, 1
KEEP_THRESHOLD, KEEP_DILATION = 0.4, 0


def _grid_of(pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with `pixels` queries for latents of latent_hw: the level l where
    ceil(H / 2^l) * ceil(W / 2^l) == pixels (see `layer_pixels`)."""
    h, w = latent_hw
    while h * w > pixels:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != pixels:
        raise ValueError(f"a layer of {pixels} pixels is no downsampling of {latent_hw[0]}x{latent_hw[1]} latents")
    return h, w


class LocalBlend(Controller):
    """Local editing (Hertz et al. 2022, sec. 3.2 "local editing"): the edit may change only the pixels of the
    blend words' objects; everything else keeps the source image's latent. After each step i >= start_blend T,

        B_k = [ norm(dilate(A_k)) >= threshold ]                      (h x w latent grid, prompt k)
        M_j = B_0 OR B_j                                              (source 0, target j: the old and the new object)
        z*_j <- z_0 + M_j (z*_j - z_0)   = where(M_j, z*_j, z_0)      (the latents after the scheduler's step)

    A_k is the cross-attention of prompt k's blend-word tokens (summed over the tokens; a word's map says where
    the word is drawn), averaged over heads, over the cross-attention layers of at most `max_pixels` pixels
    (the low-resolution layers, whose maps are object-sized blobs; each upsampled bilinearly to the latent grid)
    and over the steps so far (the paper's running average: early steps fix where the object is, later ones
    only sharpen it). dilate is a max-pool of window 2 `dilation` + 1 (the blurry maps fall short of the
    object's edges), norm divides by the map's maximum over the image, so `threshold` is a fraction of the
    peak (paper: 0.3). B is binary, so the blend is a selection (bitwise z*_j or z_0): threshold 0 leaves every
    target as it is (the edit without LocalBlend); a threshold above 1 selects nothing, so every target ends on
    the source latent (the source image). With `invert` the words mark what must stay: M_j = NOT (B_0 OR B_j)
    (a background swap that keeps the shape).

    threshold, dilation
                default by what B marks, so that the object's uncertain rim goes to the target row (drawn as
                one picture) rather than to the source latent (pasted in, whatever it had there): the region
                that changes 0.3 and 1 (BLEND_THRESHOLD, BLEND_DILATION: the paper's, generous), the region that
                is kept (invert) 0.4 and 0 (KEEP_THRESHOLD, KEEP_DILATION: tight; a kept pixel of the old
                background is a speck of its colour at the object's edge). Given, they apply as given.

    words       the blend words (one or more whitespace words each): a list looked up in every prompt (each
                prompt uses those it has), or one list per prompt ([source words, target 1 words, ...]); a
                word in none of the prompts it is looked up in is a ValueError, and so is a (source, target)
                pair neither of which has a blend word.
    base        the controller that edits the attention maps (Replace, Refine, Reweight), or None (the maps
                untouched: a plain generation of each target, blended).
    start_blend fraction of the steps before blending starts (paper: 0.2): the first steps lay out the image,
                and the maps are not yet meaningful.

    The maps are read as the layer computes them (before the base edits them), on the conditional rows, and on
    calls the base does not edit the layer's own processor computes the output (the image is what the base
    alone gives, before blending). `masks` holds the last (targets, h, w) bool masks M_j.

        LocalBlend(["circle", "square"], base=Replace(0.8, 0.4), threshold=0.3)
    """

    def __init__(self, words, base: Controller | None = None, threshold: float | None = None,
                 start_blend: float = 0.2, max_pixels: int = 32 * 32, dilation: int | None = None,
                 invert: bool = False):
        super().__init__()
        if isinstance(words, str):
            words = [words]
        words = list(words)
        if not words:
            raise ValueError("LocalBlend needs at least one blend word")
        self.per_prompt = not isinstance(words[0], str)
        self.words = [[str(w) for w in ([ws] if isinstance(ws, str) else ws)] for ws in words] if self.per_prompt \
            else [str(w) for w in words]
        invert = bool(invert)
        if threshold is None:
            threshold = KEEP_THRESHOLD if invert else BLEND_THRESHOLD
        if dilation is None:
            dilation = KEEP_DILATION if invert else BLEND_DILATION
        if not math.isfinite(float(threshold)) or threshold < 0:
            raise ValueError(f"LocalBlend threshold must be a number >= 0 (a fraction of the map's peak), got "
                             f"{threshold!r}")
        if int(dilation) != dilation or dilation < 0:
            raise ValueError(f"LocalBlend dilation must be a whole number of latent pixels >= 0, got {dilation!r}")
        self.start_window = _window((float(start_blend), 1.0), "start_blend")
        self.threshold, self.max_pixels, self.dilation = float(threshold), int(max_pixels), int(dilation)
        self.invert, self.base = invert, base
        self.edits = base is not None and getattr(base, "edits", True)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.masks: torch.Tensor | None = None

    def prepare(self, tokenizer, prompts, num_steps):
        super().prepare(tokenizer, prompts, num_steps)
        if len(prompts) < 2:
            raise ValueError(f"LocalBlend blends target prompts into a source prompt: got {len(prompts)} prompt(s)")
        if self.base is not None:
            self.base.prepare(tokenizer, prompts, num_steps)
        if self.per_prompt:
            if len(self.words) != len(prompts):
                raise ValueError(f"LocalBlend got {len(self.words)} lists of blend words for {len(prompts)} "
                                 "prompts: give one list per prompt (source first), or one list for all")
            positions = []
            for prompt, words in zip(prompts, self.words):
                found = []
                for word in words:
                    hits = _words_in(tokenizer, prompt, word)
                    if not hits:
                        raise ValueError(f"blend word {word!r} is not in the prompt {prompt!r}")
                    found += hits
                positions.append(found)
        else:
            positions = [[] for _ in prompts]
            for word in self.words:
                hits = [_words_in(tokenizer, p, word) for p in prompts]
                if not any(hits):
                    raise ValueError(f"blend word {word!r} is in none of the prompts: {list(prompts)}")
                for k, h in enumerate(hits):
                    positions[k] += h
        for j, target in enumerate(prompts[1:], 1):
            if not positions[0] and not positions[j]:
                raise ValueError(f"LocalBlend: neither the source {prompts[0]!r} nor the target {target!r} has a "
                                 f"blend word ({self.words})")
        select = torch.zeros(len(prompts), tokenizer.model_max_length)
        for k, found in enumerate(positions):
            select[k, found] = 1.0
        self.select = select  # (prompts, L): 1 on the blend words' tokens
        self.has_words = torch.tensor([bool(p) for p in positions])  # (prompts,)

    def reset(self):
        super().reset()
        if self.base is not None:
            self.base.reset()
        self.sums.clear()
        self.counts.clear()
        self.masks = None

    def _reads(self, is_cross, pixels):
        return is_cross and (pixels is None or pixels <= self.max_pixels)

    def layer_needed(self, name, is_cross, place, pixels):
        return self._reads(is_cross, pixels) or (
            self.base is not None and self.base.layer_needed(name, is_cross, place, pixels))

    def wants(self, is_cross, place, name, step, pixels):
        return (self._reads(is_cross, pixels) and step < self.num_steps) or (
            self.base is not None and self.base.wants(is_cross, place, name, step, pixels))

    def __call__(self, probs, is_cross, place, name, step):
        pixels = probs.shape[2]
        if self._reads(is_cross, pixels) and step < self.num_steps:
            start = self.conditional_start(probs.shape[0])
            cond = probs[start:start + self.num_prompts].detach().float().mean(1)  # (prompts, N, L)
            m = torch.einsum("knl,kl->kn", cond, self.select.to(cond.device))  # (prompts, N): blend words' maps
            self.sums[name] = self.sums[name] + m if name in self.sums else m
            self.counts[name] = self.counts.get(name, 0) + 1
        if self.base is not None and self.base.wants(is_cross, place, name, step, pixels):
            return self.base(probs, is_cross, place, name, step)
        return None  # observed only: the layer's own processor computes the output

    def word_masks(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """(prompts, h, w) bool B_k from the maps read so far: averaged over steps and layers on the latent
        grid, dilated, divided by their maximum, thresholded (a prompt without blend words: empty)."""
        if not self.sums:
            raise ValueError("LocalBlend read no cross-attention maps: no cross-attention layer has at most "
                             f"max_pixels={self.max_pixels} pixels at this size (raise max_pixels)")
        grids = []
        for name, total in self.sums.items():
            gh, gw = _grid_of(total.shape[1], latent_hw)
            grid = (total / self.counts[name]).view(-1, 1, gh, gw)  # (prompts, 1, gh, gw)
            grids.append(F.interpolate(grid, size=latent_hw, mode="bilinear", align_corners=False))
        a = torch.stack(grids).mean(0)  # (prompts, 1, h, w)
        r = self.dilation
        if r > 0:
            a = F.max_pool2d(a, 2 * r + 1, stride=1, padding=r)
        a = a / a.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)  # peak 1 (an all-zero map stays 0)
        binary = a[:, 0] >= self.threshold  # (prompts, h, w)
        return binary & self.has_words.to(binary.device)[:, None, None]

    def step_callback(self, pipe, step, timestep, callback_kwargs):
        if self.base is not None:
            callback_kwargs = self.base.step_callback(pipe, step, timestep, callback_kwargs)
        self.step = step + 1
        if not bool(_on(self.start_window, self.num_steps)[min(step, self.num_steps - 1)]):
            return callback_kwargs
        latents = callback_kwargs["latents"]  # (prompts, C, h, w): one row per prompt, after the scheduler step
        if latents.shape[0] != self.num_prompts:
            raise ValueError(f"LocalBlend prepared for {self.num_prompts} prompts got {latents.shape[0]} latent rows "
                             "(one image per prompt)")
        b = self.word_masks(tuple(latents.shape[2:])).to(latents.device)
        masks = b[:1] | b[1:]  # (targets, h, w): where the old object or the new one is
        if self.invert:
            masks = ~masks
        self.masks = masks
        src, tgt = latents[:1], latents[1:]
        blended = torch.where(masks[:, None], tgt, src)  # z*_j <- z_0 + M_j (z*_j - z_0), M_j binary
        return {**callback_kwargs, "latents": torch.cat([src, blended])}
