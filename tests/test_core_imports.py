"""customize.core stands alone: it imports neither the training engine nor diffusers, also when it trains (its
loss is the toolkit's one denoising loss, which lives in the core)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: builds a tiny core UNet, takes one DDPM loss and its gradient, samples two steps,
# and prints which customize / Hugging Face modules got imported.
PROBE = """
import json, sys, torch
import customize.core.train as train
from customize.core import DDPMScheduler, UNet, UNetConfig
torch.manual_seed(0)
unet = UNet(UNetConfig(sample_size=8, in_channels=1, out_channels=1, channels=(8, 16), layers_per_level=1,
                       down_attention=(False, True), norm_groups=4))
scheduler = DDPMScheduler(num_train_timesteps=50)
out = train.ddpm_loss(unet, scheduler, torch.randn(2, 1, 8, 8), snr_gamma=5.0)
out["loss"].backward()
train.sample(unet, scheduler, (1, 1, 8, 8), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("customize", "diffusers", "accelerate", "peft", "transformers"))))
"""


def test_core_trains_without_importing_the_engine_or_diffusers():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "customize.core.losses" in modules
    leaked = [m for m in modules if m.startswith("customize.training") or m.split(".")[0] != "customize"]
    assert not leaked, f"customize.core imported {leaked}"


def test_no_core_source_names_the_engine_or_diffusers():
    """Also the imports a call path of the probe above does not reach (those inside functions)."""
    for file in sorted((ROOT / "customize" / "core").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert not name.startswith("customize.training") and top not in ("diffusers", "transformers",
                                                                                 "accelerate", "peft"), \
                    f"{file.relative_to(ROOT)}:{node.lineno} imports {name}"
