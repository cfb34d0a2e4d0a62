"""The committed toy base model and what the customization methods do to it, measured by the probes.

Sizes are cut to keep this file near 5 minutes on a 2-core CPU (the full numbers come from
bench/toy_quality.py): the base model is scored on the full 200 held-out captions, the LoRA runs use the
default settings and fewer evaluation seeds.

Every training run here uses training seed TRAIN_SEED = 0, on purpose: the thresholds below are what seed 0
reaches, not what every seed reaches. Over training seeds 0-7 (README, "The toy world";
`bench/toy_background_study.py --variants defaults --train_seeds 0-7`) the default DreamBooth-LoRA's subject
fidelity on the unseen backgrounds is 85, 85, 98, 94, 77, 90, 71 and 67% and seed 3's prompt fidelity 69%, so a
0.7 bar would fail for some seeds. Training 8 seeds is too slow for a test; the spread over seeds is the bench's
job. Changing TRAIN_SEED (or anything that changes seed 0's run) means re-measuring the thresholds."""

import numpy as np
import pytest
import torch

from customize.toy import experiments, probes, quality, world

pytestmark = pytest.mark.skipif(not experiments.base_available(), reason="no toy base model in data/toy/base")

TRAIN_SEED = 0  # the training seed the thresholds were measured for (see the module docstring)


@pytest.fixture(autouse=True, scope="module")  # module scope: set up before the module's training fixtures
def _one_thread():
    # Tiny tensors: a second thread only spins while the other core is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_pipe():
    return experiments.load_base()


def test_committed_model_is_small_and_loads_offline_in_plain_diffusers():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    size = sum(f.stat().st_size for f in experiments.BASE_DIR.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"data/toy/base is {size / 2**20:.1f} MB"
    pipe = StableDiffusionPipeline.from_pretrained(experiments.BASE_DIR)
    assert not any(f.suffix == ".bin" for f in experiments.BASE_DIR.rglob("*"))  # safetensors only
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.num_train_timesteps) == ("scaled_linear", 0.00085, 1000)
    tok = CLIPTokenizer.from_pretrained(experiments.BASE_DIR / "tokenizer")
    assert tok.convert_ids_to_tokens(tok(world.SUBJECT.identifier).input_ids)[1:-1] == [f"{world.SUBJECT.identifier}</w>"]
    image = pipe("a large red square on a blue background", num_inference_steps=10, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)


def test_base_model_draws_held_out_captions(base_pipe):
    """On 200 combinations never trained on: colour, shape, background and the size word each >= 95%, the
    position phrase >= 80% (measured: 100 / 97 / 100 / 100 / 100% at the scoring guidance 3; the base before
    position grounding drew the asked position in 25%, chance 20%: bench/toy_position.py)."""
    scores = quality.base_accuracy(base_pipe, n=200).scores
    for attr in quality.BASE_ATTRIBUTES + ("size",):
        assert scores[attr] >= 0.95, scores
    assert scores["position"] >= 0.8, scores
    # and the base has never seen the subject: nothing subject-like comes out of the identifier or class word
    assert quality.subject_scores(base_pipe, seeds_per_prompt=2).scores["subject_fidelity"] <= 0.1
    assert quality.class_drift(base_pipe, n=24).scores["class_drift"] <= 0.1


def test_probe_agrees_with_itself_on_a_generated_image(base_pipe):
    """The probes give the same answer for the same generated image, and the mask they report is the shape."""
    img = quality.sample(base_pipe, ["a large green circle in the center on a white background"], seeds=[3])[0]
    a, b = probes.read(img), probes.read(np.asarray(img))
    assert (a.shape, a.colour, a.background) == (b.shape, b.colour, b.background)
    assert a.found and 0.1 < a.mask.mean() < 0.6


# Prior preservation as bench/toy_quality.py runs it: class images "a shape on a <bg> background", every background.
PRIOR = {"with_prior": True, "class_backgrounds": world.BASE_COLOURS}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-lora")
    return {False: experiments.dreambooth_lora(out / "lora", seed=TRAIN_SEED),
            True: experiments.dreambooth_lora(out / "prior", seed=TRAIN_SEED, **PRIOR)}


def test_dreambooth_lora_learns_the_subject_on_unseen_backgrounds(lora_runs, base_pipe):
    """Acceptance 2: the LoRA draws the subject (its shape AND colour, never seen by the base) on the backgrounds
    the 5 images never showed, and draws the background asked for (12 images here; the bench measures 48 per
    training seed). The 0.7 bars hold for TRAIN_SEED 0 (98% subject fidelity in the bench), not for every seed:
    seeds 2-7 give 67-71% (the subject on red is lost; docs/findings.md, 'The subject without a layout
    phrase'). How long training takes is measured by bench/toy_quality.py, not tested."""
    run = lora_runs[False]
    assert quality.subject_scores(base_pipe, seeds_per_prompt=4).scores["subject_fidelity"] == 0.0
    scores = quality.subject_scores(run.pipe, seeds_per_prompt=4).scores
    assert scores["subject_fidelity"] >= 0.7 and scores["prompt_fidelity"] >= 0.7, scores


def test_prior_preservation_reduces_class_drift(lora_runs, tmp_path):
    """Acceptance 3: without prior preservation the class prompt drifts to the subject; with it, the drift is at
    least halved. With the untrained "sks" the prior also takes part of the subject away; with the identifier as a
    trained word (pivotal tuning) the prior keeps the class and the subject is learned. (bench/toy_quality.py
    measures every method on more images: at training seeds 0-4 pivotal + prior gave subject fidelity 98, 98,
    94, 88, 69%, drift 0-2%; LoRA + prior at seed 0 50%, drift 2%.)"""
    without = quality.class_drift(lora_runs[False].pipe, n=24).scores["class_drift"]
    with_prior = quality.class_drift(lora_runs[True].pipe, n=24).scores["class_drift"]
    assert without >= 0.5, without  # the drift is real
    assert with_prior <= 0.5 * without, (without, with_prior)
    sks_prior = quality.subject_scores(lora_runs[True].pipe, seeds_per_prompt=4).scores["subject_fidelity"]
    run = experiments.pivotal(tmp_path / "pivotal-prior", seed=TRAIN_SEED, **PRIOR)
    assert quality.class_drift(run.pipe, n=24).scores["class_drift"] <= 0.5 * without
    scores = quality.subject_scores(run.pipe, seeds_per_prompt=4, prompt_for=run.prompt_for).scores
    assert scores["subject_fidelity"] >= 0.7 and scores["prompt_fidelity"] >= 0.7, scores
    assert scores["subject_fidelity"] > sks_prior, (sks_prior, scores)


def test_textual_inversion_cannot_draw_what_the_base_cannot(tmp_path, lora_runs):
    """At test size (docs/findings.md, 'Textual inversion cannot draw a new shape'): a new word alone cannot make
    the frozen generator draw a shape and colour it never learned, while DreamBooth-LoRA, which changes the
    generator, can (the paper's subject-fidelity order); the word leaves the rest of the prompt in charge (the
    background asked for)."""
    run = experiments.textual_inversion(tmp_path / "ti", seed=TRAIN_SEED, max_train_steps=200)
    assert run.prompt_for("a sks shape") == "a <sks> shape" and run.trained_parameters == 64
    ti = quality.subject_scores(run.pipe, seeds_per_prompt=4, prompt_for=run.prompt_for).scores
    lora = quality.subject_scores(lora_runs[False].pipe, seeds_per_prompt=4).scores
    assert ti["subject_fidelity"] < lora["subject_fidelity"], (ti, lora)
    assert ti["prompt_fidelity"] >= 0.7, ti


def test_style_lora_transfers_to_shapes_it_never_saw(tmp_path, base_pipe):
    """Acceptance 4: stripes on >= 70% of images of shapes absent from the style images, which the base model
    never draws striped."""
    assert quality.style_presence(base_pipe, n=24).scores["style_presence"] <= 0.1
    run = experiments.style_lora(tmp_path / "style", seed=TRAIN_SEED)
    scores = quality.style_presence(run.pipe, n=24).scores
    assert scores["style_presence"] >= 0.7, scores


def test_demo_writes_its_grid(tmp_path, capsys):
    from PIL import Image

    from customize.toy import demo

    assert demo.main(["--output_dir", str(tmp_path), "--steps", "20", "--samples", "2"]) == 0
    grid = Image.open(tmp_path / "demo_grid.png")
    cols = max(2, experiments.NUM_SUBJECT_IMAGES)
    assert grid.size == (cols * world.IMAGE_SIZE * 4, (1 + 2 * len(demo.DEMO_BACKGROUNDS)) * world.IMAGE_SIZE * 4)
    out = capsys.readouterr().out
    assert "subject fidelity" in out and "base + LoRA" in out


def test_captioned_class_images_name_their_background_and_resume(tmp_path):
    folder = experiments.captioned_class_images(tmp_path / "class", ("red", "blue"), 3)
    captions = [(folder / f"class-{i:05d}.txt").read_text() for i in range(3)]
    assert captions == ["a shape on a red background", "a shape on a blue background", "a shape on a red background"]
    from PIL import Image

    readings = probes.read_all([Image.open(folder / f"class-{i:05d}.png").convert("RGB") for i in range(3)])
    assert [r.background for r in readings] == ["red", "blue", "red"]  # the base draws what the caption says
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    experiments.captioned_class_images(folder, ("red", "blue"), 3)  # everything present: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    from customize.data import dreambooth_dataset

    ds = dreambooth_dataset(experiments.SUBJECT_DIR, "a sks shape", world.IMAGE_SIZE, class_data_dir=folder,
                            class_prompt="a shape", use_captions=True)
    assert [ds.class_data.prompt(i) for i in range(3)] == captions


def test_ip2p_scores_and_bench_table(tmp_path):
    """The ip2p rows' plumbing on an untrained model (conv_in widened, so it edits nothing on purpose), 2 steps:
    held-out inputs, the exact pairs' folder on the training split, the scores' keys and the verdict. What
    training reaches is measured by `bench/toy_quality.py --rows ip2p-exact,ip2p-p2p`, not tested (minutes)."""
    import importlib.util
    import sys
    from pathlib import Path

    from customize.methods import instruct_pix2pix as ip2p

    cases = quality.ip2p_cases(8)
    assert all((e.source.colour, e.source.shape, e.source.background) in world.HELD_OUT_COMBOS for e in cases)
    folder, made = experiments.ip2p_pairs(tmp_path / "pairs", "exact", n=3)
    assert made["pairs"] == 3 and len((folder / "metadata.jsonl").read_text().splitlines()) == 3
    pipe = ip2p.build_model(experiments.load_base())
    scores = quality.ip2p_edit_scores(pipe, n=2, num_inference_steps=2)
    assert len(scores.pop("images")) == 2
    assert {"ip2p_success", "ip2p_preserved", "ip2p_exact", "ip2p_colour"} <= set(scores)
    spec = importlib.util.spec_from_file_location("toy_quality", Path(__file__).parents[1] / "bench" / "toy_quality.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    results = {"ip2p-exact": {"ip2p_success": 0.9, "ip2p_preserved": 0.85},
               "ip2p-p2p": {"ip2p_success": 0.75, "ip2p_preserved": 0.7}}
    verdict = bench.ip2p_verdict(results)
    assert "not met" in verdict and "edit ok +15 points, kept +15 points" in verdict
    assert "ip2p-p2p" in bench.format_table(results, bench.IP2P_COLUMNS)
