"""Sampling settings of a trained toy mask ControlNet, scored on the bench's held-out control cases.

    python bench/toy_control_sweep.py outputs/bench-toy-quality/controlnet-mask --seeds 0,1,2 \\
        '{}' '{"controlnet_conditioning_scale": 2.0}' '{"controlnet_conditioning_scale": 4.0}'

The folder is a saved ControlNet (`bench/toy_quality.py --rows controlnet-mask` leaves one in
<output_dir>/controlnet-mask); each setting is a JSON object of pipeline keywords (controlnet_conditioning_scale,
guidance_scale, control_guidance_start / _end, num_inference_steps) given to `quality.control_scores`, so a row
here is the bench's controlnet-mask row at that setting without retraining. One line per (seed, setting): IoU,
IoU >= 0.5, shape, colour + bg and the seconds it took (docs/findings.md, 'ControlNet on masks').
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    from customize import control
    from customize.bench import single_thread_unless_set
    from customize.toy import experiments, quality, world

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("controlnet", help="a saved ControlNet folder")
    p.add_argument("settings", nargs="*", default=["{}"], help="JSON objects of pipeline keywords")
    p.add_argument("--base", default=str(experiments.BASE_DIR))
    p.add_argument("--seeds", default="0", help="comma-separated case and sampling seeds")
    p.add_argument("--n_control", type=int, default=48)
    args = p.parse_intermixed_args(argv)
    single_thread_unless_set()

    base = experiments.load_base(args.base)
    pipe = control.controlnet_pipeline(base, control.load_controlnet(args.controlnet, base, dtype=torch.float32))
    pipe.set_progress_bar_config(disable=True)
    settings = [json.loads(s) for s in args.settings]
    print("seed | setting | IoU | IoU>=0.5 | shape | colour+bg | s")
    for seed in (int(x) for x in args.seeds.split(",")):
        cases = world.heldout_control_cases(args.n_control, seed)
        for setting in settings:
            start = time.perf_counter()
            s = quality.control_scores(pipe, cases, seed, **setting).scores
            print(f"{seed} | {json.dumps(setting)} | {s['control_iou']:.3f} | {s['control_hit']:.0%} | "
                  f"{s['control_shape']:.0%} | {s['control_prompt']:.0%} | {time.perf_counter() - start:.0f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
