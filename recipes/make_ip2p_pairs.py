"""InstructPix2Pix's data recipe in miniature: (input caption, instruction, edited caption) rows -> training
triplets drawn by a text-to-image model with Prompt-to-Prompt (same layout in both images), filtered by a
consistency score (customize.methods.ip2p_data explains the recipe and the scores).

    python recipes/make_ip2p_pairs.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --rows captions.jsonl --output_dir data/p2p-pairs --seeds 0 1 2 3 --self_replace_steps 0.2 0.5 0.8 \
        --min_score 0.7 --num_inference_steps 50

    # the toy world: rows from its edit kinds, the probe score, the toy base model
    python recipes/make_ip2p_pairs.py --pretrained_model_name_or_path outputs/toy-base --toy 200 \
        --score probe --min_score 1.0 --output_dir data/toy-p2p-pairs

--rows is a JSON-lines file, one {"input": caption, "edit": instruction, "output": edited caption} per line. The
output folder (metadata.jsonl with input_image_file_name, edited_image_file_name, edit_prompt) is what
recipes/train_instruct_pix2pix.py --train_data_dir reads; pairs.json beside it lists every candidate's score.
"""

from __future__ import annotations

import argparse
import json
import sys

from customize.cli import run_recipe


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Text-to-image model (or tiny-sd).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rows", help='JSON-lines file of {"input", "edit", "output"} caption rows.')
    src.add_argument("--toy", type=int, metavar="N", help="N rows from the toy world's edit kinds.")
    p.add_argument("--toy_seed", type=int, default=0, help="Seed of the toy world's rows.")
    p.add_argument("--output_dir", required=True, help="Image folder to write (replaced whole).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="Candidate seeds per row.")
    p.add_argument("--self_replace_steps", type=float, nargs="+", default=[0.2, 0.5, 0.8],
                   help="Candidate fractions p of steps with the self-attention maps replaced.")
    p.add_argument("--cross_replace_steps", type=float, nargs="+", default=[0.8, 0.0],
                   help="Candidate fractions q of steps with the cross-attention maps edited (0 lets a layout edit, "
                        "a new position or size, move the shape: the source's word maps hold the old layout).")
    p.add_argument("--score", choices=("pixel", "probe"), default="pixel",
                   help="pixel: 1 - mean |x - x'| / 255 (any model); probe: the toy world's probes (with --toy).")
    p.add_argument("--min_score", type=float, default=None, help="Keep a pair scoring at least this (pixel: 0.7, "
                                                                 "probe: 1.0).")
    p.add_argument("--max_score", type=float, default=None, help="... and at most this (pixel: 0.999: x' is not x).")
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--resolution", type=int, default=None, help="Image size (unset: the model's).")
    p.add_argument("--device", default=None)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.score == "probe" and args.toy is None:
        raise ValueError("--score probe reads toy-world images: use it with --toy N")
    return args


def main(argv: list[str] | None = None):
    args = parse(argv)
    from customize.methods import ip2p_data
    from customize.models import load_pipeline

    rows = ip2p_data.toy_rows(args.toy, args.toy_seed) if args.toy is not None else ip2p_data.read_rows(args.rows)
    probe = args.score == "probe"
    lo = args.min_score if args.min_score is not None else (1.0 if probe else 0.7)
    hi = args.max_score if args.max_score is not None else (1.0 if probe else 0.999)
    pipe = load_pipeline(args.pretrained_model_name_or_path, device=args.device)
    kept, report = ip2p_data.make_pairs(
        pipe, rows, seeds=args.seeds, self_replace_steps=args.self_replace_steps,
        cross_replace_steps=args.cross_replace_steps,
        score=ip2p_data.toy_probe_score if probe else ip2p_data.pixel_consistency, min_score=lo, max_score=hi,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, height=args.resolution,
        width=args.resolution, progress=args.progress,
    )
    folder = ip2p_data.write_pairs(args.output_dir, kept)
    from customize.utils import atomic_path

    with atomic_path(folder / "pairs.json") as tmp:
        tmp.write_text(json.dumps({"rows": len(rows), "kept": len(kept), "min_score": lo, "max_score": hi,
                                   "candidates": report}, indent=1) + "\n")
    print(f"{len(kept)} of {len(rows)} rows kept (score in [{lo}, {hi}]) -> {folder}")
    return folder


if __name__ == "__main__":
    sys.exit(run_recipe(main))
