"""Scoring a model on the toy world: generate from prompts whose meaning is known, read the images with the
probes, and reduce the readings to the measures of docs/toy-world.md, 'Measures'.

- prompt accuracy (base model): per attribute, the share of images whose probe reading matches the caption;
- subject fidelity: the share of images of "a sks shape on a <bg> background" showing the subject (its shape AND
  its colour); prompt fidelity: the share showing the background the prompt asked for;
- class drift (language drift, DreamBooth sec. 4.3): the share of images of the bare class prompt ("a shape on a
  <bg> background") that show the subject's shape or colour: ~0 for the base model, high once the class word
  has been taken over by the subject;
- style presence: the share of images, asked "in zwx style", that the stripe probe sees stripes in;
- controllability (mask ControlNet): asked a held-out caption with a mask at a layout no training scene has, the
  IoU between the shape the probe finds and the mask, with the ControlNet and without it (the base);
- subject in style (merged LoRAs): asked "a sks shape in zwx style on a <bg> background", the shares showing the
  subject, the stripes, the background, and the subject and the stripes at once.

Every image comes from its own seeded generator, so a score is a function of (model, prompts, seeds) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from customize.inference import generate
from customize.toy import probes, world

EVAL_GUIDANCE = 3.0  # classifier-free guidance scale used for every score (held-out shape accuracy of the base: 97% at 3, 94.5% at 4)
EVAL_STEPS = 20  # DDIM steps
BASE_ATTRIBUTES = ("colour", "shape", "background")


def sample(pipe, prompts: Sequence[str], seeds: Sequence[int] | None = None, guidance_scale: float = EVAL_GUIDANCE,
           num_inference_steps: int = EVAL_STEPS, batch_size: int = 64) -> list[Image.Image]:
    """One image per prompt, image i from a generator seeded with seeds[i] (default: i), so an image does not
    depend on the batch it was generated in: `customize.inference.generate` at the scoring settings."""
    return generate(pipe, prompts, seeds, guidance_scale=guidance_scale,
                    num_inference_steps=num_inference_steps, batch_size=batch_size)


def attribute_accuracy(readings: Sequence[probes.Reading], expected: Sequence[dict],
                       attributes: Sequence[str] = BASE_ATTRIBUTES) -> dict[str, float]:
    """Per attribute, the share of readings equal to the expectation (expectations of None are skipped), plus
    "all": the share with every listed attribute right."""
    if len(readings) != len(expected):
        raise ValueError(f"{len(readings)} readings for {len(expected)} expectations")
    out = {}
    for a in attributes:
        pairs = [(getattr(r, a), e[a]) for r, e in zip(readings, expected) if e.get(a) is not None]
        out[a] = sum(got == want for got, want in pairs) / len(pairs) if pairs else float("nan")
    out["all"] = sum(
        all(getattr(r, a) == e[a] for a in attributes if e.get(a) is not None) for r, e in zip(readings, expected)
    ) / len(readings)
    return out


@dataclass
class Scored:
    """Images, their readings and the measures derived from them."""

    images: list[Image.Image]
    readings: list[probes.Reading]
    scores: dict[str, float]


def base_accuracy(pipe, n: int = 200, seed: int = 0, **gen) -> Scored:
    """Prompt accuracy on `n` held-out captions (combinations never shown in training), one seed each."""
    prompts = world.heldout_prompts(n, seed)
    images = sample(pipe, [p for p, _ in prompts], seeds=[seed * 100_003 + i for i in range(n)], **gen)
    readings = probes.read_all(images)
    expected = [world.parse_caption(p) for p, _ in prompts]
    return Scored(images, readings, attribute_accuracy(readings, expected, BASE_ATTRIBUTES + ("size", "position")))


def shows_subject(reading: probes.Reading, subject: world.Subject = world.SUBJECT) -> bool:
    """The subject is its shape AND its colour."""
    return reading.shape == subject.shape and reading.colour == subject.colour


def subject_scores(pipe, seeds_per_prompt: int = 8, seed: int = 0, subject: world.Subject = world.SUBJECT,
                   prompt_for=None, **gen) -> Scored:
    """Subject fidelity and prompt fidelity on prompts that put the subject on backgrounds its instance images
    never showed. `prompt_for` rewrites each prompt for a model that names the subject differently (textual
    inversion's S* instead of the identifier); the seeds stay the same."""
    cases = [(p, want) for p, want in world.subject_eval_prompts(subject) for _ in range(seeds_per_prompt)]
    prompts = [(prompt_for or (lambda q: q))(p) for p, _ in cases]
    images = sample(pipe, prompts, seeds=[seed + i for i in range(len(cases))], **gen)
    readings = probes.read_all(images)
    is_subject = [shows_subject(r, subject) for r in readings]
    on_prompt = [r.background == want["background"] for r, (_, want) in zip(readings, cases)]
    scores = {
        "subject_fidelity": sum(is_subject) / len(cases),
        "prompt_fidelity": sum(on_prompt) / len(cases),
        "both": sum(a and b for a, b in zip(is_subject, on_prompt)) / len(cases),
    }
    return Scored(images, readings, scores)


def class_prompts(n: int, subject: world.Subject = world.SUBJECT) -> list[str]:
    """The bare class prompt on each base background in turn ("a shape on a red background", ...)."""
    return [f"{subject.class_prompt} on a {world.BASE_COLOURS[i % len(world.BASE_COLOURS)]} background" for i in range(n)]


def class_drift(pipe, n: int = 48, seed: int = 0, subject: world.Subject = world.SUBJECT, **gen) -> Scored:
    """Language drift: the share of class-prompt images that show the subject's shape or colour. Also reports
    how many distinct base shapes the class prompt still produces ("class_shapes")."""
    images = sample(pipe, class_prompts(n, subject), seeds=[seed + 50_000 + i for i in range(n)], **gen)
    readings = probes.read_all(images)
    drifted = [r.shape == subject.shape or r.colour == subject.colour for r in readings]
    shapes = {r.shape for r in readings if r.shape in world.BASE_SHAPES}
    return Scored(images, readings, {"class_drift": sum(drifted) / n, "class_shapes": float(len(shapes))})


def style_prompts(n: int, seed: int = 0, style: world.Style = world.STYLE) -> list[tuple[str, world.Scene]]:
    """Prompts in the style's trigger for shapes the style images never showed."""
    return [(style.prompt(s), s) for s in world.style_eval_scenes(n, seed, style)]


def style_presence(pipe, n: int = 48, seed: int = 0, style: world.Style = world.STYLE, **gen) -> Scored:
    """The share of images with stripes, and the share that also keep the asked shape ("style_shape")."""
    cases = style_prompts(n, seed, style)
    images = sample(pipe, [p for p, _ in cases], seeds=[seed + 70_000 + i for i in range(n)], **gen)
    readings = probes.read_all(images)
    present = [r.style for r in readings]
    shaped = [r.style and r.shape == s.shape for r, (_, s) in zip(readings, cases)]
    return Scored(images, readings, {"style_presence": sum(present) / n, "style_shape": sum(shaped) / n})


def subject_in_style_prompts(subject: world.Subject = world.SUBJECT,
                             style: world.Style = world.STYLE) -> list[tuple[str, str]]:
    """(prompt, background) asking for the subject in the style on each background its images never showed:
    "a sks shape in zwx style on a red background"."""
    return [(f"{subject.instance_prompt} {style.trigger} on a {bg} background", bg) for bg in subject.unseen_backgrounds]


def subject_in_style(pipe, seeds_per_prompt: int = 16, seed: int = 0, subject: world.Subject = world.SUBJECT,
                     style: world.Style = world.STYLE, **gen) -> Scored:
    """A merge of a subject LoRA and a style LoRA, asked for both at once: subject fidelity ("merge_subject"),
    stripes present ("merge_style"), the background asked ("merge_background"), and "merge_both": subject AND
    stripes in the same image, what the user asked for (the background is reported beside it)."""
    cases = [(p, bg) for p, bg in subject_in_style_prompts(subject, style) for _ in range(seeds_per_prompt)]
    images = sample(pipe, [p for p, _ in cases], seeds=[seed + 90_000 + i for i in range(len(cases))], **gen)
    readings = probes.read_all(images)
    is_subject = [shows_subject(r, subject) for r in readings]
    striped = [bool(r.style) for r in readings]
    on_bg = [r.background == bg for r, (_, bg) in zip(readings, cases)]
    n = len(cases)
    return Scored(images, readings, {
        "merge_subject": sum(is_subject) / n, "merge_style": sum(striped) / n, "merge_background": sum(on_bg) / n,
        "merge_both": sum(a and b for a, b in zip(is_subject, striped)) / n,
    })


def control_scores(pipe, cases: Sequence[world.ControlCase], seed: int = 0, control: bool = True,
                   batch_size: int = 64, **gen) -> Scored:
    """Mask ControlNet: each case's prompt drawn with its mask as the control image (`control=False`: the prompt
    alone, what the base model does without control, same seeds), read by the probes. "control_iou": the mean
    IoU between the shape found in the image and the case's mask (`probes.mask_iou`); "control_hit": the share
    with IoU >= 0.5; "control_shape": the share of the asked shape class; "control_prompt": the share with the
    asked colour and background (what control must not cost)."""
    prompts = [c.prompt for c in cases]
    seeds = [seed + 110_000 + i for i in range(len(cases))]
    gen = {"guidance_scale": EVAL_GUIDANCE, "num_inference_steps": EVAL_STEPS, **gen}
    if not control:
        images = sample(pipe, prompts, seeds, batch_size=batch_size, **gen)
    else:  # the control images differ per prompt: one pipeline call per chunk, with that chunk's controls
        images = []
        for i in range(0, len(cases), batch_size):
            chunk = slice(i, i + batch_size)
            images += generate(pipe, prompts[chunk], seeds[chunk], image=[c.control for c in cases[chunk]],
                               batch_size=batch_size, **gen)
    readings = probes.read_all(images)
    ious = [probes.mask_iou(r.mask, c.mask) for r, c in zip(readings, cases)]
    n = len(cases)
    return Scored(images, readings, {
        "control_iou": sum(ious) / n, "control_hit": sum(v >= 0.5 for v in ious) / n,
        "control_shape": sum(r.shape == c.shape for r, c in zip(readings, cases)) / n,
        "control_prompt": sum(r.colour == c.colour and r.background == c.background
                              for r, c in zip(readings, cases)) / n,
    })


def image_grid(images: Sequence[Image.Image], cols: int, scale: int = 1) -> Image.Image:
    """Tile images row by row, each enlarged `scale` times with nearest-neighbour (the pixels are the point)."""
    from customize.training.tracking import image_grid as tile

    grid = tile(list(images), cols)
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST) if scale > 1 else grid


# ---------------------------------------------------------------------------------------------------------------
# Prompt-to-Prompt edits of generated images
# ---------------------------------------------------------------------------------------------------------------

P2P_KINDS = ("shape", "colour", "background")
P2P_PRESERVED = ("position", "size", "colour", "shape", "background")  # the edited attribute is left out


def _swap_options(kind: str, src: dict) -> list[str]:
    """The base values the attribute `kind` of `src` may be swapped for (colour != background after the swap)."""
    shape, colour, bg = src["shape"], src["colour"], src["background"]
    return {"shape": [s for s in world.BASE_SHAPES if s != shape],
            "colour": [c for c in world.BASE_COLOURS if c not in (colour, bg)],
            "background": [c for c in world.BASE_COLOURS if c not in (colour, bg)]}[kind]


def p2p_cases(kind: str, n: int, seed: int = 0) -> list[tuple[str, str, dict, dict]]:
    """n (source prompt, target prompt, source attributes, target attributes) for an edit of `kind`: the shape
    ("circle" -> "square"), the shape's colour or the background colour swapped for another base value, in
    prompts "a <colour> <shape> on a <background> background" that leave position and size to the seed (so
    those are what regenerating from the same seed may change, and what the edit must keep). Attributes drawn
    from a generator seeded with `seed`, colour != background in both prompts."""
    import numpy as np

    if kind not in P2P_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}: one of {P2P_KINDS}")
    rng = np.random.default_rng([seed, P2P_KINDS.index(kind)])
    cases = []
    while len(cases) < n:
        shape = str(rng.choice(world.BASE_SHAPES))
        colour, bg = (str(c) for c in rng.choice(world.BASE_COLOURS, 2, replace=False))
        src = {"shape": shape, "colour": colour, "background": bg}
        tgt = {**src, kind: str(rng.choice(_swap_options(kind, src)))}
        prompt = lambda a: f"a {a['colour']} {a['shape']} on a {a['background']} background"  # noqa: E731
        cases.append((prompt(src), prompt(tgt), src, tgt))
    return cases


def p2p_edit_scores(pipe, kind: str, controller_for, n: int = 16, seed: int = 0,
                    guidance_scale: float = EVAL_GUIDANCE, num_inference_steps: int = EVAL_STEPS) -> dict:
    """Prompt-to-Prompt against regenerating the target prompt from the same seed, on `p2p_cases(kind, n)`.
    Case i is drawn from seed `seed + i`: `customize.inference.edit(pipe, source, target, seed + i,
    controller_for(source, target))` gives the source image and the edit; `generate(pipe, target, [seed + i])`
    the regeneration (the same initial latent, no attention control). The probes read all three.

    Returned, for method "p2p" and "regen" (shares of the n cases):
      {method}_success     the edited attribute reads as the target's
      {method}_preserved   every other attribute (position, size and the two untouched of shape / colour /
                           background) reads as in the source image
      {method}_<attribute> each preserved attribute alone
      {method}_iou         mean IoU of the shape's mask with the source image's (1 = drawn in the same pixels)
      source_found         the source image's probe found a shape (the cases preservation is measured on)
    plus "images": per case [source, p2p edit, regeneration] (PIL)."""
    from customize.inference import edit, generate

    cases = p2p_cases(kind, n, seed)
    kept = [a for a in P2P_PRESERVED if a != kind]
    tallies = {m: {"success": 0, "preserved": 0, "iou": 0.0, **{a: 0 for a in kept}} for m in ("p2p", "regen")}
    images, found = [], 0
    for i, (src_prompt, tgt_prompt, _, tgt) in enumerate(cases):
        source, edited = edit(pipe, src_prompt, tgt_prompt, seed + i, controller_for(src_prompt, tgt_prompt),
                              guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
        regen = generate(pipe, tgt_prompt, [seed + i], guidance_scale=guidance_scale,
                         num_inference_steps=num_inference_steps)[0]
        images.append([source, edited, regen])
        ref = probes.read(source)
        found += ref.found
        for method, image in (("p2p", edited), ("regen", regen)):
            r, t = probes.read(image), tallies[method]
            t["success"] += getattr(r, kind) == tgt[kind]
            same = {a: ref.found and getattr(r, a) == getattr(ref, a) for a in kept}
            for a, ok in same.items():
                t[a] += ok
            t["preserved"] += all(same.values())
            t["iou"] += probes.mask_iou(r.mask, ref.mask) if ref.found else 0.0
    out = {f"{m}_{k}": v / n for m, t in tallies.items() for k, v in t.items()}
    return {**out, "source_found": found / n, "images": images}


# ---------------------------------------------------------------------------------------------------------------
# Prompt-to-Prompt edits of real images: world-rendered scenes through each inversion
# ---------------------------------------------------------------------------------------------------------------

P2P_REAL_PRESERVED = ("position", "size", "colour", "shape", "background")  # the edited attribute is left out


def p2p_real_cases(kind: str, n: int, seed: int = 0) -> list[tuple[world.Scene, str, world.Scene, str]]:
    """n (source scene, its full caption, target scene, its caption) for an edit of `kind` on a real image: the
    scenes of `world.heldout_prompts(n, seed)` (held-out combinations, every detail captioned: size, colour,
    shape, position, background), the attribute swapped for another base value (as `p2p_cases` draws it, from a
    generator seeded with (seed, kind)). The two captions differ in that one word, as Replace needs."""
    import dataclasses

    import numpy as np

    if kind not in P2P_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}: one of {P2P_KINDS}")
    rng = np.random.default_rng([seed, P2P_KINDS.index(kind), 1])
    cases = []
    for prompt, scene in world.heldout_prompts(n, seed):
        options = _swap_options(kind, {a: getattr(scene, a) for a in ("shape", "colour", "background")})
        target = dataclasses.replace(scene, **{kind: str(rng.choice(options))})
        cases.append((scene, prompt, target, world.caption(target)))
    return cases


def p2p_real_edit_scores(pipe, kind: str, controller_for, methods: Sequence[str], n: int = 4, seed: int = 0,
                         guidance_scale: float = EVAL_GUIDANCE, num_inference_steps: int = EVAL_STEPS,
                         inversions: dict | None = None, options: dict | None = None) -> dict:
    """Prompt-to-Prompt on real images against regenerating the target prompt from the inverted latent, per
    inversion method, on `p2p_real_cases(kind, n, seed)`. Each case's image is `world.render(scene)` (never
    generated by a model), inverted with its caption by `customize.methods.inversion.invert(..., method)`; P2P
    is `edit(pipe, caption, target, 0, controller_for(caption, target), inversion=inv)`, "regen" the same call
    with Replace(0, 0) (no attention control: the target prompt sampled from the inversion's x_T, with the
    inversion's unconditional embeddings; acceptance 1 tests that this equals a plain generation from the
    latent). `inversions` caches {(method, scene index): Inversion} across kinds (the scenes are the same for
    every kind); `options` {method: kwargs} go to `invert` (null-text's inner_steps).

    Preservation is measured against the rendered scene's truth, not against a reading of the reconstruction:
    the photo is what the user wants kept, so a reconstruction that already moved the shape counts against the
    method. Returned, per method m and for "{m}" (P2P), "{m}_regen" and "{m}_recon" (the edit's row 0, the
    image sampled back; its "success" is that every attribute reads as the truth):
      {x}_success     the edited attribute reads as the target scene's
      {x}_preserved   position, size and the two untouched of shape / colour / background read as the scene's
      {x}_<attribute> each preserved attribute alone
      {x}_iou         mean IoU of the shape's probe mask with the scene's true mask (world.shape_mask)
    plus "real_read" (the probe reads every attribute of the rendered image as its truth: the ceiling),
    "{m}_seconds" (median inversion seconds) and "images": per method, per case [real, recon, P2P, regen]."""
    import statistics

    from customize.attention import Replace
    from customize.inference import edit
    from customize.methods.inversion import invert

    inversions = {} if inversions is None else inversions
    options = options or {}
    cases = p2p_real_cases(kind, n, seed)
    kept = [a for a in P2P_REAL_PRESERVED if a != kind]
    every = P2P_REAL_PRESERVED

    def tally(out: dict, key: str, image, scene: world.Scene, target: world.Scene, edited: bool) -> None:
        r = probes.read(image)
        want = target if edited else scene
        checked = kept if edited else every
        same = {a: r.found and getattr(r, a) == getattr(want, a) for a in checked}
        t = out.setdefault(key, {"success": 0, "preserved": 0, "iou": 0.0, **{a: 0 for a in kept}})
        t["success"] += (getattr(r, kind) == getattr(target, kind)) if edited else all(same.values())
        for a in kept:
            t[a] += same[a]
        t["preserved"] += all(same[a] for a in kept)
        t["iou"] += probes.mask_iou(r.mask, world.shape_mask(scene))

    tallies, images, seconds, real_read = {}, {m: [] for m in methods}, {m: [] for m in methods}, 0
    for i, (scene, prompt, target, target_prompt) in enumerate(cases):
        real = world.render(scene)
        r = probes.read(real)
        real_read += r.found and all(getattr(r, a) == getattr(scene, a) for a in every)
        for m in methods:
            key = (m, seed, i)
            if key not in inversions:
                inversions[key] = invert(pipe, real, prompt, m, num_inference_steps=num_inference_steps,
                                         guidance_scale=guidance_scale, **options.get(m, {}))
            done = inversions[key]
            seconds[m].append(done.seconds)
            recon, p2p = edit(pipe, prompt, target_prompt, 0, controller_for(prompt, target_prompt), inversion=done)
            _, regen = edit(pipe, prompt, target_prompt, 0, Replace(0.0, 0.0), inversion=done)
            tally(tallies, m, p2p, scene, target, True)
            tally(tallies, f"{m}_regen", regen, scene, target, True)
            tally(tallies, f"{m}_recon", recon, scene, target, False)
            images[m].append([real, recon, p2p, regen])
    out = {f"{x}_{k}": v / n for x, t in tallies.items() for k, v in t.items()}
    out.update({f"{m}_seconds": statistics.median(s) for m, s in seconds.items()})
    return {**out, "real_read": real_read / n, "images": images}
# InstructPix2Pix edits of held-out images
# ---------------------------------------------------------------------------------------------------------------

IP2P_ATTRIBUTES = ("colour", "background", "shape", "size", "position")
# s_I, s_T of the toy's edits: chosen on the validation edits (`ip2p_cases(48, IP2P_VALIDATION_SEED, "train")`),
# not on the held-out ones. The pipelines' and the paper's starting values are 1.5 / 7.5, but SD's 7.5 is its
# text-to-image scale, and the toy base's is 3 (EVAL_GUIDANCE). Validation preservation of the bench's
# exact-pairs model: 52% at 1.5 / 7.5, 83% at 1.5 / 3, 71% at 3 / 2, 90% at 2 / 3 and at 2 / 2 (edit success
# 90-100%); trained twice as long (9600 steps) it reads 73, 83, 83 and 98% at 1.5 / 7.5, 1.5 / 3, 3 / 2 and 2 / 2,
# which breaks the tie.
IP2P_IMAGE_GUIDANCE = 2.0
IP2P_TEXT_GUIDANCE = 2.0
IP2P_VALIDATION_SEED = 2  # validation edits: training-split scenes of a stream no training pair is drawn from


def ip2p_cases(n: int, seed: int = 1, split: str = "heldout") -> list:
    """n edits `world.edit_pair(seed, i, split)`. The default is the held-out set: scenes of the (colour, shape,
    background) triples kept out of every training split, from a stream seed the training pairs do not use
    (they are drawn from seed 0 on the training split), so no input image was seen in training. Validation (for
    choosing guidance): split="train", seed=IP2P_VALIDATION_SEED."""
    return [world.edit_pair(seed, i, split) for i in range(n)]


def ip2p_edit_scores(pipe, n: int = 64, seed: int = 1, image_guidance_scale: float = IP2P_IMAGE_GUIDANCE,
                     guidance_scale: float = IP2P_TEXT_GUIDANCE, num_inference_steps: int = EVAL_STEPS,
                     split: str = "heldout") -> dict:
    """An InstructPix2Pix pipeline on `ip2p_cases(n, seed, split)`: edit i = `customize.inference.instruct_edit(pipe,
    render(source), instruction, seed=i)`; the probes read the input and the edit.

    Returned (shares of the n cases):
      ip2p_success     the instructed attribute reads as the edit pair's target
      ip2p_preserved   every other attribute (of colour, background, shape, size, position) reads as in the input
      ip2p_exact       both at once (what the P2P data filter keeps)
      ip2p_<kind>      success of the cases of each edit kind (colour, background, size, position)
    plus "images": per case [input, edit, exact target] (PIL)."""
    from customize.inference import instruct_edit

    cases = ip2p_cases(n, seed, split)
    success = preserved = exact = 0
    per_kind = {k: [0, 0] for k in world.EDIT_KINDS}
    images = []
    for i, e in enumerate(cases):
        source, target = world.render(e.source), world.render(e.target)
        edited = instruct_edit(pipe, source, e.instruction, i, image_guidance_scale=image_guidance_scale,
                               guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
        images.append([source, edited, target])
        ref, r = probes.read(source), probes.read(edited)
        ok = r.found and getattr(r, e.kind) == getattr(e.target, e.kind)
        kept = ref.found and r.found and all(getattr(r, a) == getattr(ref, a) for a in IP2P_ATTRIBUTES if a != e.kind)
        success, preserved, exact = success + ok, preserved + kept, exact + (ok and kept)
        per_kind[e.kind][0] += ok
        per_kind[e.kind][1] += 1
    out = {"ip2p_success": success / n, "ip2p_preserved": preserved / n, "ip2p_exact": exact / n}
    out.update({f"ip2p_{k}": hits / total if total else float("nan") for k, (hits, total) in per_kind.items()})
    return {**out, "images": images}
