"""Peak memory of a Prompt-to-Prompt edit with and without the attention store, on the tiny SDXL pipeline
(customize.models.tiny_pipeline("sdxl"): SDXL's layout in small, two text encoders, pooled embeddings, added
time ids; its transformer blocks at 1/2 of the latent grid) at a size the CPU runs: 256 px, latents 128 x 128,
attention layers 64 x 64 = 4096 pixels (SDXL's down_blocks.1 / up_blocks.1 grid at 1024 px).

    python bench/p2p_memory.py [--size 256] [--steps 3]

Each configuration runs in a fresh process (one thread) and reports its peak resident set size
(resource.getrusage(RUSAGE_SELF).ru_maxrss, which counts torch's allocations; tracemalloc would not: it sees
Python's allocator only), and the same process's RSS after loading the pipeline, before sampling: the
difference is what sampling added. Configurations:

  generate            customize.inference.generate of the source and target prompts (no controller)
  edit                edit with Replace(0.8, 0.4): cross-attention maps explicit on every layer; self-attention
                      left to SDPA (the layers are above self_max_pixels = 1024)
  edit+store          the same with an AttentionStore of the cross-attention maps (max_pixels 4096), as
                      `customize edit` records for its heat maps (customize.attention.Observed)
  edit+store-self     the store also keeps the self-attention maps (4096 x 4096 per row) of those layers
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CONFIGS = ("generate", "edit", "edit+store", "edit+store-self")
SOURCE, TARGET = "a red circle on a blue background", "a red square on a blue background"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(config: str, size: int, steps: int) -> dict:
    import time

    import torch

    from customize.attention import AttentionStore, Observed, Replace
    from customize.inference import edit, generate
    from customize.models import tiny_pipeline

    torch.set_num_threads(1)
    pipe = tiny_pipeline("sdxl")
    pipe.set_progress_bar_config(disable=True)
    loaded = _rss_mib()
    start = time.perf_counter()
    common = dict(num_inference_steps=steps, height=size, width=size, output_type="latent")
    if config == "generate":
        generate(pipe, [SOURCE, TARGET], [0, 0], batch_size=2, **common)
    else:
        controller = Replace(0.8, 0.4)
        if config != "edit":
            store = AttentionStore(max_pixels=(size // 4) ** 2, self_attention=config == "edit+store-self")
            controller = Observed(controller, store)
        edit(pipe, SOURCE, TARGET, 0, controller, **common)
    return {"config": config, "loaded_mib": loaded, "peak_mib": _rss_mib(), "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # the child process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one, a.size, a.steps)))
        return 0
    rows = []
    for config in CONFIGS:
        done = subprocess.run([sys.executable, __file__, "--one", config, "--size", str(a.size), "--steps",
                               str(a.steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_mib"] - rows[0]["loaded_mib"]
    print(f"tiny SDXL, {a.size} px (latents {a.size // 2}^2, attention layers {a.size // 4}^2), {a.steps} steps, "
          "peak RSS (getrusage ru_maxrss), one thread")
    print(f"{'config':<16} {'peak MiB':>9} {'sampling MiB':>13} {'x generate':>11} {'s':>6}")
    for r in rows:
        added = r["peak_mib"] - r["loaded_mib"]
        print(f"{r['config']:<16} {r['peak_mib']:9.0f} {added:13.0f} {added / base:11.2f} {r['seconds']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
