"""Benchmark: the from-scratch core (UNet + DDPMScheduler) against diffusers (UNet2DModel + DDPMScheduler) of the
same architecture, trained on scikit-learn's 8x8 digits for the same wall-clock budget.

    python bench/ddpm_digits.py --minutes 8 --output_dir outputs/bench_ddpm_digits

Both models start from the same weights and are trained by the shared engine (customize.training.train) with
the same method (customize.methods.ddpm), data order, noise and hyper-parameters. They train at the same time,
one process and one thread each, so on a shared machine both see the same background load; after `--minutes`
both processes are stopped (SIGKILL) and each is scored from its last checkpoint (the engine writes one every
`--checkpointing_steps`; its EMA weights are used). The learning rate is constant after warm-up, because the
number of steps a model will reach is what is being measured. From each model 1000 class-conditional samples
(100 per digit) are drawn with 25 DDIM steps (our DDIMScheduler for ours, diffusers' for diffusers) and scored
against the real digits:

  confidence   mean max-probability of a logistic-regression digit classifier fitted on the real digits
               (beside it: the same on held-out real digits, 2-fold, and on uniform noise)
  agreement    fraction of samples the classifier assigns to the class they were drawn for
  FD (PCA-20)  Frechet distance between Gaussians fitted to real and generated digits in the space of the
               first 20 principal components of the real digits (pixel units 0..16); beside it the distance
               between two halves of the real set
  steps/s      training speed in the concurrent runs, from each run's first checkpoint to its last (start-up
               excluded), and an interleaved forward+backward micro-benchmark (models alternate every few steps)

Writes samples.png (ours left, diffusers right; 10 per digit) and results.json into --output_dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from customize.core import DDIMScheduler, DDPMScheduler, sample
from customize.core.train import ddpm_loss
from customize.data.folder import DigitsDataset, load_digits_array, unit_to_digits
from customize.methods.ddpm import DDPM, DDPMConfig, DDPMModel, build_model, load_ddpm, save_ddpm
from customize.training import checkpoint as ckpt
from customize.training import parse_config, train

NUM_CLASSES = 10
PCA_DIM = 20
MODELS = ("ours", "diffusers")
# The engine runs until it is stopped at the budget; this only has to be out of reach.
UNREACHABLE_STEPS = 10**9


@dataclass
class BenchConfig:
    minutes: float = field(default=8.0, metadata={"help": "Wall-clock training budget; both models train at once."})
    threads: int = field(default=1, metadata={"help": "torch threads per model (1 keeps the comparison clean)."})
    output_dir: str = "outputs/bench_ddpm_digits"
    seed: int = 0
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 2
    attention_levels: str = "1"
    attention_head_dim: int = 32
    train_batch_size: int = 64
    learning_rate: float = 2e-3
    lr_warmup_steps: int = 100
    ema_decay: float = 0.995
    snr_gamma: float | None = 5.0
    ddpm_num_steps: int = 1000
    ddpm_beta_schedule: str = field(default="squaredcos_cap_v2", metadata={
        "help": "cosine: the linear schedule destroys 8x8 images within the first few hundred steps (Nichol & "
                "Dhariwal 2021); at 800 steps cosine scored 0.953 / FD 13 against linear's 0.937 / FD 19."})
    prediction_type: str = "epsilon"
    checkpointing_steps: int = field(default=20, metadata={"help": "Steps between the checkpoints scored at the end."})
    num_samples: int = 1000
    num_inference_steps: int = field(default=25, metadata={
        "help": "DDIM steps per sample. Few steps are also the better samples here: from the same weights, 10 / 25 / "
                "50 / 100 / 200 steps gave confidence 0.955 / 0.953 / 0.950 / 0.943 / 0.927 (min-SNR weighting "
                "trains the low-noise end least, and more steps spend more of the chain there)."})
    microbench_rounds: int = 7
    skip_reference: bool = field(default=False, metadata={"help": "Train and score only ours (for tuning)."})
    worker: str | None = field(default=None, metadata={"help": "Internal: train one model ('ours' or 'diffusers')."})


def train_config(bench: BenchConfig, name: str) -> DDPMConfig:
    return DDPMConfig(
        dataset_name="digits", class_conditional=True, resolution=8, output_dir=str(Path(bench.output_dir) / name),
        seed=bench.seed, max_train_steps=UNREACHABLE_STEPS, train_batch_size=bench.train_batch_size,
        learning_rate=bench.learning_rate, lr_warmup_steps=bench.lr_warmup_steps, lr_scheduler="constant_with_warmup",
        use_ema=True, ema_decay=bench.ema_decay, snr_gamma=bench.snr_gamma, ddpm_num_steps=bench.ddpm_num_steps,
        ddpm_beta_schedule=bench.ddpm_beta_schedule, prediction_type=bench.prediction_type,
        block_out_channels=bench.block_out_channels, layers_per_block=bench.layers_per_block,
        attention_levels=bench.attention_levels, attention_head_dim=bench.attention_head_dim,
        validation_steps=0, checkpointing_steps=bench.checkpointing_steps, checkpoints_total_limit=2,
        report_to="none", progress=False, dataloader_num_workers=0,
    )


def scheduler_kwargs(bench: BenchConfig) -> dict:
    return dict(num_train_timesteps=bench.ddpm_num_steps, beta_schedule=bench.ddpm_beta_schedule,
                prediction_type=bench.prediction_type)


def init_folder(bench: BenchConfig) -> Path:
    return Path(bench.output_dir) / "init"


def save_initial_weights(bench: BenchConfig) -> int:
    """diffusers' seeded init of the architecture, saved once; both models start from it. Returns #params."""
    import diffusers

    template = build_model(train_config(bench, "init"), channels=1, classes=[str(d) for d in range(NUM_CLASSES)])
    torch.manual_seed(bench.seed)
    theirs = diffusers.UNet2DModel(**template.unet.diffusers_config())
    save_ddpm(DDPMModel(theirs, DDPMScheduler(**scheduler_kwargs(bench)), template.classes), init_folder(bench))
    return sum(p.numel() for p in theirs.parameters())


def load_model(name: str, bench: BenchConfig) -> DDPMModel:
    """Ours (core UNet + our DDPMScheduler) or diffusers' (UNet2DModel + DDPMScheduler), at the initial weights."""
    if name == "ours":
        model = load_ddpm(init_folder(bench))
        return DDPMModel(model.unet.train(), DDPMScheduler(**scheduler_kwargs(bench)), model.classes)
    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(init_folder(bench) / "unet")
    return DDPMModel(unet.train(), diffusers.DDPMScheduler(**scheduler_kwargs(bench)), [str(d) for d in range(NUM_CLASSES)])


def worker(bench: BenchConfig) -> None:
    """One model's training run on the shared engine; it ends when the parent stops it."""
    torch.set_num_threads(bench.threads)
    train(DDPM(), load_model(bench.worker, bench), DigitsDataset(resolution=8), train_config(bench, bench.worker))


def train_concurrently(bench: BenchConfig, names: list[str], argv: list[str]) -> dict[str, dict]:
    """Start one worker process per model, stop all of them after the budget, read their last checkpoints."""
    env = {**os.environ, "OMP_NUM_THREADS": str(bench.threads)}
    procs = {}
    for name in names:
        log = open(Path(bench.output_dir) / f"{name}.log", "w")
        procs[name] = subprocess.Popen([sys.executable, __file__, *argv, "--worker", name], env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
    def stamp(c: Path) -> float:  # when the checkpoint was complete
        return (c / ckpt.STATE_FILE).stat().st_mtime

    start = time.time()
    first: dict[str, tuple[int, float]] = {}  # each run's first checkpoint: the clock starts after start-up
    while time.time() - start < bench.minutes * 60:
        failed = [n for n, p in procs.items() if p.poll() is not None]
        if failed:
            for p in procs.values():
                p.kill()
            raise RuntimeError(f"training of {failed[0]} stopped early; see {bench.output_dir}/{failed[0]}.log")
        for name in names:
            found = ckpt.list_checkpoints(Path(bench.output_dir) / name)
            if name not in first and found:
                first[name] = (ckpt.checkpoint_step(found[0]), stamp(found[0]))
        time.sleep(0.5)
    for p in procs.values():
        p.send_signal(signal.SIGKILL)
        p.wait()
    runs = {}
    for name in names:
        found = ckpt.list_checkpoints(Path(bench.output_dir) / name)
        if name not in first or ckpt.checkpoint_step(found[-1]) == first[name][0]:
            raise RuntimeError(f"{name} wrote fewer than 2 checkpoints in {bench.minutes} min: raise --minutes "
                               "or lower --checkpointing_steps")
        step = ckpt.checkpoint_step(found[-1])
        runs[name] = {"steps": step, "checkpoint": str(found[-1]), "wall_s": bench.minutes * 60,
                      "steps_per_s": (step - first[name][0]) / (stamp(found[-1]) - first[name][1])}
    return runs


def load_checkpoint_ema(name: str, checkpoint: str, bench: BenchConfig) -> DDPMModel:
    """The model with the EMA weights of an engine checkpoint (saved under '<module>.<parameter>' names)."""
    from safetensors.torch import load_file

    model = load_model(name, bench)
    shadows = load_file(str(Path(checkpoint) / ckpt.EMA_FILE))
    model.unet.load_state_dict({k.removeprefix("unet."): v for k, v in shadows.items()}, strict=True)
    return DDPMModel(model.unet.eval(), model.noise_scheduler, model.classes)


def microbench(models: dict[str, DDPMModel], dataset, bench: BenchConfig, steps_per_turn: int = 3) -> dict[str, float]:
    """Median forward+backward time of the training loss per model, the models alternating every few steps so
    both see the same background load."""
    torch.set_num_threads(bench.threads)
    g = torch.Generator().manual_seed(bench.seed)
    idx = torch.randint(0, len(dataset), (bench.train_batch_size,), generator=g)
    x0, y = dataset.images[idx], dataset.labels[idx]
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(bench.microbench_rounds + 1):
        for name, m in models.items():
            m.unet.train()
            for _ in range(steps_per_turn):
                t0 = time.perf_counter()
                ddpm_loss(m.unet, m.noise_scheduler, x0, y, snr_gamma=bench.snr_gamma)["loss"].backward()
                if round_:  # round 0 warms up both
                    times[name].append(time.perf_counter() - t0)
            m.unet.zero_grad(set_to_none=True)
    return {name: statistics.median(v) for name, v in times.items()}


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of two feature sets."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


class Scorer:
    """Classifier and PCA fitted on the real digits (pixel units 0..16, flattened to 64 features)."""

    def __init__(self, seed: int):
        from sklearn.decomposition import PCA

        from customize.demo import digit_classifier

        images, labels = load_digits_array()
        self.real = images.reshape(len(images), -1)  # (1797, 64)
        self.labels = labels
        self.clf = digit_classifier()
        self.pca = PCA(PCA_DIM, random_state=seed).fit(self.real)
        rng = np.random.RandomState(seed)
        perm = rng.permutation(len(self.real))
        half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        held_out = []
        for fit, score in ((half_a, half_b), (half_b, half_a)):
            held_out.append(digit_classifier(fit).predict_proba(self.real[score] / 16).max(1))
        self.reference = {
            "confidence_real_heldout": float(np.concatenate(held_out).mean()),
            "confidence_uniform_noise": float(self.clf.predict_proba(rng.uniform(0, 1, (1000, 64))).max(1).mean()),
            "fd_real_vs_real": frechet_distance(self.pca.transform(self.real[half_a]), self.pca.transform(self.real[half_b])),
        }

    def score(self, digits: np.ndarray, labels: np.ndarray) -> dict:
        flat = digits.reshape(len(digits), -1)
        proba = self.clf.predict_proba(flat / 16)
        return {
            "confidence": float(proba.max(1).mean()),
            "agreement": float((proba.argmax(1) == labels).mean()),
            "fd_pca20": frechet_distance(self.pca.transform(self.real), self.pca.transform(flat)),
        }


def draw(name: str, model: DDPMModel, bench: BenchConfig) -> tuple[np.ndarray, np.ndarray]:
    """num_samples class-conditional DDIM samples, in digit units (N, 8, 8)."""
    labels = torch.arange(bench.num_samples) % NUM_CLASSES
    if name == "ours":
        scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    else:
        import diffusers

        scheduler = diffusers.DDIMScheduler.from_config(model.noise_scheduler.config)
    x = sample(model.unet, scheduler, (bench.num_samples, 1, 8, 8), num_inference_steps=bench.num_inference_steps,
               class_labels=labels, generator=torch.Generator().manual_seed(bench.seed))
    return unit_to_digits(x[:, 0]).numpy(), labels.numpy()


def save_grid(samples: dict[str, np.ndarray], labels: np.ndarray, path: Path, per_class: int = 10, zoom: int = 4):
    """One block per model (ours first): row k holds `per_class` samples of digit k. Ink is dark on white,
    cells are framed by a light grey line, models are separated by a dark bar."""
    from PIL import Image

    from customize.data.images import save_image_atomic

    def framed(d):  # (8, 8) -> (9, 9) with a light grey (value 3 of 16) line right and below
        return np.pad(d, ((0, 1), (0, 1)), constant_values=3.0)

    blocks = []
    for digits in samples.values():
        rows = [np.concatenate([framed(digits[labels == k][i]) for i in range(per_class)], axis=1)
                for k in range(NUM_CLASSES)]
        blocks.append(np.concatenate(rows, axis=0))
        blocks.append(np.full((blocks[-1].shape[0], 3), 16.0))
    grid = np.concatenate(blocks[:-1], axis=1)
    img = Image.fromarray((255 - grid / 16 * 255).clip(0, 255).astype(np.uint8), mode="L")
    save_image_atomic(img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST), path)


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = parse_config(BenchConfig, argv)
    if bench.worker:
        return worker(bench)
    torch.set_num_threads(bench.threads)
    out = Path(bench.output_dir)
    for name in MODELS:  # a fresh start: old checkpoints would be resumed from or scored
        shutil.rmtree(out / name, ignore_errors=True)
    params = save_initial_weights(bench)
    names = ["ours"] if bench.skip_reference else list(MODELS)
    print(f"UNet: {params / 1e6:.2f} M parameters, channels {bench.block_out_channels}, batch {bench.train_batch_size}; "
          f"{bench.minutes} min of training, {len(names)} model(s) at once, {bench.threads} thread(s) each", flush=True)

    dataset = DigitsDataset(resolution=8)
    micro = microbench({n: load_model(n, bench) for n in names}, dataset, bench)
    results: dict = {"config": asdict(bench), "parameters": params, "microbench_s": micro}
    results["models"] = train_concurrently(bench, names, argv)
    for name, r in results["models"].items():
        print(f"{name:9s} {r['steps']} steps in {r['wall_s']:.0f} s ({r['steps_per_s']:.2f} steps/s)", flush=True)

    scorer = Scorer(bench.seed)
    samples = {}
    for name, r in results["models"].items():
        start = time.perf_counter()
        samples[name], labels = draw(name, load_checkpoint_ema(name, r["checkpoint"], bench), bench)
        r.update(scorer.score(samples[name], labels), sampling_s=time.perf_counter() - start)
    results["reference"] = ref = scorer.reference
    save_grid(samples, labels, out / "samples.png")

    print(f"\n{'':10s}{'confidence':>12s}{'agreement':>11s}{'FD (PCA-20)':>13s}{'steps/s':>9s}")
    for name, r in results["models"].items():
        print(f"{name:10s}{r['confidence']:12.3f}{r['agreement']:11.3f}{r['fd_pca20']:13.2f}{r['steps_per_s']:9.2f}")
    print(f"{'real':10s}{ref['confidence_real_heldout']:12.3f}{'':11s}{ref['fd_real_vs_real']:13.2f}"
          f"   (held-out real digits; FD between two halves of the real set)")
    print(f"{'noise':10s}{ref['confidence_uniform_noise']:12.3f}   (uniform noise images)")
    if "diffusers" in results["models"]:
        r_o, r_d = results["models"]["ours"], results["models"]["diffusers"]
        results["speed_ratio_training"] = r_o["steps_per_s"] / r_d["steps_per_s"]
        results["speed_ratio_microbench"] = micro["diffusers"] / micro["ours"]
        print(f"\nsteps/s ours/diffusers: {results['speed_ratio_training']:.3f} in the concurrent training runs, "
              f"{results['speed_ratio_microbench']:.3f} interleaved forward+backward "
              f"({micro['ours'] * 1e3:.1f} ms vs {micro['diffusers'] * 1e3:.1f} ms)")
    print(f"samples: {out / 'samples.png'}")
    from customize.utils import atomic_path

    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


if __name__ == "__main__":
    main()
