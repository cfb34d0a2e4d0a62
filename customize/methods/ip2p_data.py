"""InstructPix2Pix's data recipe in miniature (Brooks et al. 2023, section 3.1): training triplets (input image,
instruction, edited image) made by a text-to-image model from caption triples (input caption, instruction,
edited caption), with Prompt-to-Prompt (Hertz et al. 2022) so the two images share their layout.

For each row (input caption c, instruction e, edited caption c') and each candidate (seed, p, q):

    [x, x'] = Prompt-to-Prompt(c -> c', seed; self-attention replaced for the first fraction p of the steps,
              cross-attention replaced (word swap: `Replace`) or aligned (added / removed words: `Refine`)
              for the first fraction q)

x and x' start from the same latent, and x' takes x's attention maps, so it keeps x's composition and changes
what c' says. The paper draws 100 candidates per row with p ~ U(0.1, 0.9) (how much of the layout to keep is
edit-dependent: a colour change keeps all of it, a pose change little) and keeps the ones its CLIP filters pass
(image-image similarity of x and x', the directional similarity of the image change to the caption change),
at most 4 per row. The cross-attention fraction q is a candidate axis too: injected cross-attention carries the
source's word maps, and where a word's map is the layout (a position or size phrase on a model grounded in
them) it holds the old layout, so a layout edit needs q = 0 (on the toy base: 0 of 30 position rows pass at
q = 0.8, 27 of 30 at q = 0 with p = 0.4). Here the filter is a consistency score `score(x, x', row) -> float`
and a threshold:

  - `pixel_consistency` (default, any model): 1 - mean |x - x'| / 255, in [0, 1], with a band
    [min_score, max_score]: below min_score the layout was lost (the two images are unrelated), above
    max_score the edit did nothing (x' is x). A crude stand-in for CLIP's image-image similarity, with no
    notion of "did it do what the instruction says".
  - `toy_probe_score` (the toy world, customize.toy): the probes read both images; the score is 1 when the
    instructed attribute of x' is the edited caption's and every other attribute x' shows is the one x shows,
    the fraction of attributes that hold otherwise, and 0 when x has no readable shape. Threshold 1.0 keeps
    exact edits only: this is the paper's directional filter made exact by the world's ground truth.

The best-scoring candidate of each row is kept when it passes (the paper keeps up to 4). Rows come from a
JSON-lines file ({"input": c, "edit": e, "output": c'}, the paper's field names) or, on the toy world, from the
world's edit kinds (`toy_rows`: colour, background, size, position). The output is an image folder that
recipes/train_instruct_pix2pix.py reads: metadata.jsonl with input_image_file_name, edited_image_file_name,
edit_prompt, and the captions, the score, the seed and p of each kept pair.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

ATTRIBUTES = ("colour", "background", "shape", "size", "position")
KIND_ATTRIBUTE = {"colour": "colour", "background": "background", "size": "size", "position": "position"}


def read_rows(path: str | Path) -> list[dict]:
    """(input caption, instruction, edited caption) rows of a JSON-lines file, each line {"input": ..., "edit":
    ..., "output": ...} (other fields are kept); a bad line is a one-line error naming it."""
    from customize.methods.instruct_pix2pix import check_instruction

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file of caption rows")
    from customize.data.captions import jsonl_lines

    rows = []
    for _, where, row in jsonl_lines(path):
        missing = [k for k in ("input", "edit", "output") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f'{where}: needs "input" (caption), "edit" (instruction) and "output" (edited caption); '
                             f"it lacks {missing}")
        check_instruction(row["edit"], where)
        for key in ("input", "output"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise ValueError(f"{where}: the {key!r} caption is empty")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def toy_rows(n: int, seed: int = 0, split: str = "all") -> list[dict]:
    """The toy world's edit pairs as caption rows: the source scene's full caption, the instruction and the
    edited scene's caption, with the edit's kind and the edited scene's attributes (for `toy_probe_score`)."""
    from customize.toy import world

    rows = []
    for i in range(n):
        e = world.edit_pair(seed, i, split)
        rows.append({"input": world.caption(e.source), "edit": e.instruction, "output": world.caption(e.target),
                     "kind": e.kind, "target": {a: getattr(e.target, a) for a in ATTRIBUTES}})
    return rows


def pixel_consistency(source: Image.Image, edited: Image.Image, row: dict | None = None) -> float:
    """1 - mean |x - x'| / 255 over pixels and channels, in [0, 1] (1: identical)."""
    a = np.asarray(source.convert("RGB"), dtype=np.float32)
    b = np.asarray(edited.convert("RGB").resize(source.size), dtype=np.float32)
    return float(1.0 - np.abs(a - b).mean() / 255.0)


def toy_probe_score(source: Image.Image, edited: Image.Image, row: dict) -> float:
    """Toy world: the probes' reading of x and x' (module docstring). 1.0: the instructed attribute of x' is the
    row's target and every other attribute of x' equals x's; otherwise the fraction of the 5 attributes that
    hold; 0.0 when either image has no readable shape."""
    from customize.toy import probes

    before, after = probes.read(source), probes.read(edited)
    if not before.found or not after.found:
        return 0.0
    changed = KIND_ATTRIBUTE[row["kind"]]
    hits = [getattr(after, changed) == row["target"][changed]]
    hits += [getattr(after, a) == getattr(before, a) for a in ATTRIBUTES if a != changed]
    return float(np.mean(hits))


def controller_for(tokenizer, source: str, target: str, self_replace_steps: float, cross_replace_steps: float):
    """Replace for a word swap (same number of words), Refine otherwise (added or removed words)."""
    from customize.attention import Refine, Replace

    cls = Replace if len(source.split()) == len(target.split()) else Refine
    return cls(cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps)


def make_pairs(
    pipe,
    rows: Sequence[dict],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3),
    self_replace_steps: Sequence[float] = (0.2, 0.5, 0.8),
    cross_replace_steps: float | Sequence[float] = 0.8,
    score: Callable[[Image.Image, Image.Image, dict], float] = pixel_consistency,
    min_score: float = 0.7,
    max_score: float = 0.999,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
) -> tuple[list[dict], list[dict]]:
    """For every row, one Prompt-to-Prompt pair per (seed, p in self_replace_steps, q in cross_replace_steps: a
    number or a sequence of them) through `customize.inference.edit`, in that nesting order; the best-scoring
    candidate is kept when min_score <= score <= max_score. A candidate scoring max_score ends its row's search
    (none later could replace it), which with the exact probe filter (min_score = max_score = 1.0) draws the
    first passing candidate only. Returns (kept records for `write_pairs`, one report per candidate drawn: its
    seed, p, q and score)."""
    from tqdm.auto import tqdm

    from customize.inference import edit

    crosses = [float(cross_replace_steps)] if isinstance(cross_replace_steps, (int, float)) else \
        [float(q) for q in cross_replace_steps]
    candidates = list(itertools.product(seeds, self_replace_steps, crosses))
    if not candidates:
        raise ValueError("make_pairs needs at least one seed, one self_replace_steps and one cross_replace_steps")
    kept, report = [], []
    for row in tqdm(rows, desc="P2P pairs", disable=not progress):
        best = None
        for seed, p, q in candidates:
            controller = controller_for(pipe.tokenizer, row["input"], row["output"], p, q)
            source, edited = edit(pipe, row["input"], row["output"], seed, controller,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  height=height, width=width)
            s = float(score(source, edited, row))
            if min_score <= s <= max_score and (best is None or s > best["score"]):
                best = {"input_image": source, "edited_image": edited, "edit_prompt": row["edit"],
                        "input_text": row["input"], "edited_text": row["output"], "score": s, "seed": seed,
                        "self_replace_steps": p, "cross_replace_steps": q,
                        **({"kind": row["kind"]} if "kind" in row else {})}
            report.append({"edit": row["edit"], "seed": seed, "self_replace_steps": p, "cross_replace_steps": q,
                           "score": s})
            if best is not None and best["score"] >= max_score:
                break  # nothing can beat a candidate at max_score (ties keep the first): skip the rest
        if best is not None:
            kept.append(best)
    return kept, report


def write_pairs(folder: str | Path, kept: Sequence[dict]) -> Path:
    """The kept pairs as an image folder (written whole, atomically): input_image_file_name,
    edited_image_file_name, edit_prompt and the pair's captions, score, seed and p per metadata.jsonl line."""
    from customize.toy.world import write_imagefolder

    if not kept:
        raise ValueError("no pair passed the consistency filter: lower --min_score, or give more --seeds")
    return write_imagefolder(folder, list(kept))
