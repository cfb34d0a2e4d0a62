"""Benchmark: the from-scratch core (UNet + DDPMScheduler) against diffusers (UNet2DModel + DDPMScheduler) of the
same architecture, trained on scikit-learn's 8x8 digits for the same wall-clock budget each.

    python bench/ddpm_digits.py --minutes 6 --output_dir outputs/bench_ddpm_digits

Both models start from the same weights and are trained by the shared engine (customize.training.train) with
the same method (customize.methods.ddpm), batch order and hyper-parameters, one after the other. The number of
steps each gets is its budget divided by its step time, measured by a short probe run through the engine.
Then, from each model's EMA weights, 1000 class-conditional samples (100 per digit) are drawn with 50 DDIM
steps (our DDIMScheduler for ours, diffusers' for diffusers) and scored against the real digits:

  confidence   mean max-probability of a logistic-regression digit classifier fitted on the real digits
               (beside it: the same on held-out real digits, 2-fold, and on uniform noise)
  agreement    fraction of samples the classifier assigns to the class they were drawn for
  FD (PCA-20)  Frechet distance between Gaussians fitted to real and generated digits in the space of the
               first 20 principal components of the real digits (pixel units 0..16); beside it the distance
               between two halves of the real set
  steps/s      training speed in the timed runs, and an interleaved forward+backward micro-benchmark that is
               fair under a shared CPU (both models alternate every few steps)

Writes samples.png (ours left, diffusers right; 10 per digit) and results.json into --output_dir.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from customize.core import DDPMScheduler, UNet, sample
from customize.core.train import ddpm_loss
from customize.data.folder import DigitsDataset, load_digits_array, unit_to_digits
from customize.methods.ddpm import DDPM, DDPMConfig, DDPMModel, load_ddpm
from customize.training import parse_config, train

NUM_CLASSES = 10
PCA_DIM = 20


@dataclass
class BenchConfig:
    minutes: float = field(default=6.0, metadata={"help": "Training wall-clock budget per model."})
    threads: int = field(default=1, metadata={"help": "torch threads (1 keeps the comparison clean on a shared CPU)."})
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
    num_samples: int = 1000
    num_inference_steps: int = 50
    steps: int | None = field(default=None, metadata={"help": "Train this many steps instead of the time budget."})
    probe_steps: int = 20
    microbench_rounds: int = 7
    skip_reference: bool = field(default=False, metadata={"help": "Train and score only ours (for tuning)."})


class Timed:
    """The DDPM method with a clock in `after_step`, to measure steady-state step times of the engine's loop."""

    def __init__(self):
        self.method = DDPM()
        self.stamps: list[float] = []

    def __getattr__(self, name):
        return getattr(self.method, name)

    def after_step(self, model, cfg) -> None:
        self.stamps.append(time.perf_counter())

    def steps_per_second(self, skip: int = 2) -> float:
        s = self.stamps[skip:]
        return (len(s) - 1) / (s[-1] - s[0])


def train_config(bench: BenchConfig, output_dir: Path, steps: int) -> DDPMConfig:
    return DDPMConfig(
        dataset_name="digits", class_conditional=True, resolution=8, output_dir=str(output_dir), seed=bench.seed,
        max_train_steps=steps, train_batch_size=bench.train_batch_size, learning_rate=bench.learning_rate,
        lr_warmup_steps=min(bench.lr_warmup_steps, steps // 10), lr_scheduler="cosine", use_ema=True,
        ema_decay=bench.ema_decay, snr_gamma=bench.snr_gamma, ddpm_num_steps=bench.ddpm_num_steps,
        ddpm_beta_schedule=bench.ddpm_beta_schedule, prediction_type=bench.prediction_type,
        block_out_channels=bench.block_out_channels, layers_per_block=bench.layers_per_block,
        attention_levels=bench.attention_levels, attention_head_dim=bench.attention_head_dim,
        validation_steps=0, checkpointing_steps=0, report_to="none", progress=False,
    )


def build_models(bench: BenchConfig):
    """Ours and diffusers', same architecture and the same initial weights (diffusers' seeded init)."""
    import diffusers

    from customize.methods.ddpm import build_model

    cfg = train_config(bench, Path(bench.output_dir), 1)
    template = build_model(cfg, channels=1, classes=[str(d) for d in range(NUM_CLASSES)])
    torch.manual_seed(bench.seed)
    theirs = diffusers.UNet2DModel(**template.unet.diffusers_config())
    ours = UNet.from_diffusers(theirs)
    schedule = dict(num_train_timesteps=bench.ddpm_num_steps, beta_schedule=bench.ddpm_beta_schedule,
                    prediction_type=bench.prediction_type)
    return (DDPMModel(ours, DDPMScheduler(**schedule), template.classes),
            DDPMModel(theirs, diffusers.DDPMScheduler(**schedule), template.classes))


def microbench(models: dict[str, DDPMModel], dataset, bench: BenchConfig, steps_per_turn: int = 3) -> dict[str, float]:
    """Median forward+backward time of the training loss per model, the models alternating every few steps so
    both see the same background load."""
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


def run_training(name: str, model: DDPMModel, dataset, bench: BenchConfig, steps_per_second: float | None) -> dict:
    steps = bench.steps or max(1, int(bench.minutes * 60 * steps_per_second))
    timed = Timed()
    out = Path(bench.output_dir) / name
    start = time.perf_counter()
    train(timed, model, dataset, train_config(bench, out, steps))
    wall = time.perf_counter() - start
    return {"steps": steps, "wall_s": wall, "steps_per_s": timed.steps_per_second(), "dir": str(out)}


def probe(model: DDPMModel, dataset, bench: BenchConfig) -> float:
    """Steady-state steps/s of the engine loop, from a short run on a throwaway copy of the weights."""
    import copy

    timed = Timed()
    train(timed, copy.deepcopy(model), dataset,
          train_config(bench, Path(bench.output_dir) / "probe", bench.probe_steps))
    return timed.steps_per_second()


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
        from sklearn.linear_model import LogisticRegression

        images, labels = load_digits_array()
        self.real = images.reshape(len(images), -1)  # (1797, 64)
        self.labels = labels

        def classifier():
            return LogisticRegression(C=10.0, max_iter=5000)

        self.clf = classifier().fit(self.real / 16, labels)
        self.pca = PCA(PCA_DIM, random_state=seed).fit(self.real)
        rng = np.random.RandomState(seed)
        perm = rng.permutation(len(self.real))
        half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        held_out = []
        for fit, score in ((half_a, half_b), (half_b, half_a)):
            held_out.append(classifier().fit(self.real[fit] / 16, labels[fit]).predict_proba(self.real[score] / 16).max(1))
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


def draw(name: str, folder: str, bench: BenchConfig) -> tuple[np.ndarray, np.ndarray]:
    """num_samples class-conditional DDIM samples from the saved (EMA) weights, in digit units (N, 8, 8)."""
    labels = torch.arange(bench.num_samples) % NUM_CLASSES
    generator = torch.Generator().manual_seed(bench.seed)
    if name == "ours":
        from customize.core import DDIMScheduler

        model = load_ddpm(folder)
        unet, scheduler = model.unet, DDIMScheduler.from_config(model.noise_scheduler.config)
    else:
        import diffusers

        unet = diffusers.UNet2DModel.from_pretrained(Path(folder) / "unet").eval()
        scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    x = sample(unet, scheduler, (bench.num_samples, 1, 8, 8), num_inference_steps=bench.num_inference_steps,
               class_labels=labels, generator=generator)
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


def main(argv: list[str] | None = None) -> dict:
    bench = parse_config(BenchConfig, argv)
    torch.set_num_threads(bench.threads)
    out = Path(bench.output_dir)
    dataset = DigitsDataset(resolution=8)
    ours, theirs = build_models(bench)
    models = {"ours": ours} if bench.skip_reference else {"ours": ours, "diffusers": theirs}
    params = sum(p.numel() for p in ours.unet.parameters())
    print(f"UNet: {params / 1e6:.2f} M parameters, channels {bench.block_out_channels}, batch {bench.train_batch_size}, "
          f"{bench.minutes} min per model, {bench.threads} thread(s)")

    micro = microbench(models, dataset, bench)
    results: dict = {"config": asdict(bench), "parameters": params, "microbench_s": micro, "models": {}}
    for name, model in models.items():
        rate = None if bench.steps else probe(model, dataset, bench)
        results["models"][name] = run_training(name, model, dataset, bench, rate)
        print(f"{name:9s} trained {results['models'][name]['steps']} steps in {results['models'][name]['wall_s']:.0f} s "
              f"({results['models'][name]['steps_per_s']:.2f} steps/s)", flush=True)

    scorer = Scorer(bench.seed)
    samples = {}
    for name, r in results["models"].items():
        start = time.perf_counter()
        samples[name], labels = draw(name, r["dir"], bench)
        r.update(scorer.score(samples[name], labels), sampling_s=time.perf_counter() - start)
    results["reference"] = scorer.reference
    save_grid(samples, labels, out / "samples.png")

    ref = scorer.reference
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
        print(f"\nsteps/s ours/diffusers: {results['speed_ratio_training']:.3f} in the timed runs, "
              f"{results['speed_ratio_microbench']:.3f} interleaved forward+backward "
              f"({micro['ours'] * 1e3:.1f} ms vs {micro['diffusers'] * 1e3:.1f} ms)")
    print(f"samples: {out / 'samples.png'}")
    from customize.utils import atomic_path

    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


if __name__ == "__main__":
    main()
