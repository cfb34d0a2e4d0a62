"""LoRA on the shared engine: identity at init, files that plain diffusers loads to the same image, frozen base
weights, fused == unfused, alpha kept, wrong-family files refused, atomic writes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from customize.formats.lora import LoraCompatibilityError, load_lora_files
from customize.methods import lora
from customize.models import load_pipeline, tiny_pipeline
from customize.training import parse_config, train
from customize.training import sd

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32  # tiny pipelines: sample_size 16 latents, VAE factor 2
# The committed toy model's first UNet level has ResNets and no attention, so its first LoRA key is a convolution's:
# the layout in which diffusers once dropped every attention key of a mixed-layout file.
MODELS = {"sd": "tiny-sd", "sdxl": "tiny-sdxl", "toy": str(ROOT / "data" / "toy" / "base")}


def _images(folder: Path, n: int = 2, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _args(tmp_path: Path, kind: str, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", MODELS[kind], "--instance_data_dir", str(_images(tmp_path / "inst")),
        "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "out"), "--resolution", str(RESOLUTION),
        "--max_train_steps", "3", "--train_batch_size", "2", "--learning_rate", "3e-2", "--rank", "4", "--lora_alpha", "8",
        "--report_to", "none", "--progress", "false", "--seed", "1", *extra,
    ]


def _image(pipe, prompt="a photo of sks dog"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


def _snapshot(module):
    """Base weights by their pre-peft names (peft moves W of an adapted layer to `<layer>.base_layer.weight`)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items() if ".lora_" not in k}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_at_init_equals_base(kind):
    pipe = tiny_pipeline(kind)
    cfg = lora.LoRAConfig(pretrained_model_name_or_path=f"tiny-{kind}", train_text_encoder=True, rank=4, lora_alpha=8)
    latents = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    prompts = ["a photo of sks dog", "a red circle"]
    time_ids = sd.time_ids((RESOLUTION, RESOLUTION), (0, 0), (RESOLUTION, RESOLUTION))
    with torch.no_grad():
        cond = sd.encode_prompts(pipe, prompts)
        base = sd.unet_predict(pipe.unet, latents, t, cond, time_ids)
    params = lora.trainable_parameters(pipe, cfg)
    ups = [p for n, m in lora.adapted_modules(pipe, cfg).items() for k, p in m.named_parameters() if "lora_B" in k]
    assert ups and all(torch.count_nonzero(p) == 0 for p in ups)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        cond_lora = sd.encode_prompts(pipe, prompts)
        adapted = sd.unet_predict(pipe.unet, latents, t, cond_lora, time_ids)
    for key in cond:
        assert torch.equal(cond[key], cond_lora[key])
    assert torch.equal(base, adapted)


def test_trainable_parameters_are_only_lora_and_targets_follow_the_option():
    pipe = tiny_pipeline("sd")
    cfg = lora.LoRAConfig(pretrained_model_name_or_path="tiny-sd", lora_target="all-linear")
    params = lora.trainable_parameters(pipe, cfg)
    trained = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert len(trained) == len(params) and all(".lora_" in n for n in trained)
    assert any(".ff.net.2.lora_A" in n for n in trained) and any(".attn2.to_k.lora_A" in n for n in trained)
    assert not any(p.requires_grad for m in (pipe.vae, pipe.text_encoder) for p in m.parameters())
    # calling it again (a resumed run) reuses the adapter instead of adding a second one
    assert len(lora.trainable_parameters(pipe, cfg)) == len(params)

    attention_only = tiny_pipeline("sd")
    lora.trainable_parameters(attention_only, lora.LoRAConfig(pretrained_model_name_or_path="tiny-sd"))
    names = {n for n, p in attention_only.unet.named_parameters() if p.requires_grad}
    assert names and not any(".ff." in n for n in names)

    kv = tiny_pipeline("sd")
    lora.trainable_parameters(kv, lora.LoRAConfig(pretrained_model_name_or_path="tiny-sd", lora_target="cross-kv"))
    layers = {n.split(".lora_")[0] for n, p in kv.unet.named_parameters() if p.requires_grad}
    assert layers and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in layers)
    assert len(layers) == 2 * sum(1 for n, _ in kv.unet.named_modules() if n.endswith("attn2"))


def _lora_tensors(module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A" / "<module>.lora_B": weight} whatever the adapter is called ("default", "default_0")."""
    out = {}
    for name, m in module.named_modules():
        for part in ("lora_A", "lora_B"):
            for layer in getattr(m, part, {}).values():
                out[f"{name}.{part}"] = layer.weight
    return out


@pytest.mark.parametrize(
    "kind,train_text_encoder,target",
    [("sd", False, "attention"), ("sd", True, "attention"), ("sdxl", False, "attention"), ("sdxl", True, "attention"),
     ("sd", False, "attention+conv"), ("toy", False, "attention+conv")],
    ids=["sd-unet", "sd-unet+te", "sdxl-unet", "sdxl-unet+te", "sd-unet-conv", "toy-unet-conv"],
)
def test_trained_lora_loads_in_plain_diffusers_with_the_same_image(tmp_path, kind, train_text_encoder, target):
    """The recipe's steps (parse, load, dataset, train); then a fresh seeded pipeline + load_lora_weights gives the
    in-memory model's image, base weights are bitwise untouched, and fusing the LoRA changes nothing."""
    extra = (["--train_text_encoder"] if train_text_encoder else []) + ["--lora_target", target]
    cfg = parse_config(lora.LoRAConfig, _args(tmp_path, kind, *extra))
    pipe = load_pipeline(cfg.pretrained_model_name_or_path)
    frozen = {name: _snapshot(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    base_image = _image(pipe)
    result = train(lora, pipe, lora.build_dataset(pipe, cfg), cfg)
    assert result.global_step == 3 and all(np.isfinite(result.losses))

    for name, before in frozen.items():
        after = _snapshot(getattr(pipe, name))
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} base weights changed"
    trained_image = _image(pipe)
    assert np.abs(trained_image - base_image).max() > 1e-3, "training did not move the LoRA"

    out = tmp_path / "out"
    keys = load_file(out / lora.LORA_WEIGHT_NAME).keys()
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys) == train_text_encoder
    assert any(k.startswith("text_encoder_2.") for k in keys) == (train_text_encoder and kind == "sdxl")
    card = (out / "README.md").read_text()
    assert MODELS[kind] in card and "a photo of sks dog" in card and "4 / 8" in card

    fresh = load_pipeline(MODELS[kind])
    fresh.load_lora_weights(str(out))
    # every trained tensor arrives (an image alone can miss a part whose update is still tiny after 3 steps)
    for name, module in lora.adapted_modules(pipe, cfg).items():
        trained, loaded = _lora_tensors(module), _lora_tensors(getattr(fresh, name))
        assert trained.keys() == loaded.keys(), f"{name}: {sorted(trained.keys() ^ loaded.keys())[:4]}"
        assert all(torch.equal(trained[k].float(), loaded[k].float()) for k in trained), name
    loaded_image = _image(fresh)
    assert np.abs(loaded_image - trained_image).max() <= 1e-4
    fresh.fuse_lora()
    assert np.abs(_image(fresh) - loaded_image).max() <= 1e-4


FAMILY_KEYS = {"sd": ("sd1", "sd_v1"), "sdxl": ("sdxl", "sdxl_base_v1-0")}  # kind -> (family, kohya's version name)


@pytest.mark.parametrize("kind,fmt", [("sd", "diffusers"), ("sd", "kohya"), ("sdxl", "diffusers"), ("sdxl", "kohya"),
                                      ("sdxl", "peft")])
def test_every_lora_format_from_training_loads_in_plain_diffusers_with_its_metadata(tmp_path, kind, fmt, monkeypatch,
                                                                                   capsys):
    """--lora_format: the run's file goes through customize.formats' writer (diffusers' save_lora_weights is never
    called), loads with load_lora_weights (diffusers' kohya loader for kohya) to the in-memory image, and says in its
    metadata what it is: each module's alpha, the base family, the trigger words and the run's settings."""
    import json

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    from customize.formats import LoraTraining, convert_lora, detect_lora_family, read_lora

    def refused(*args, **kwargs):
        raise AssertionError("diffusers' save_lora_weights was called: every LoRA goes through customize.formats")

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "save_lora_weights", refused)
    cfg = parse_config(lora.LoRAConfig, _args(tmp_path, kind, "--train_text_encoder", "--lora_format", fmt,
                                              "--max_train_steps", "2"))
    pipe = load_pipeline(cfg.pretrained_model_name_or_path)
    base_image = _image(pipe)
    train(lora, pipe, lora.build_dataset(pipe, cfg), cfg)
    trained_image = _image(pipe)
    assert np.abs(trained_image - base_image).max() > 1e-3, "training did not move the LoRA"

    out = tmp_path / "out"
    name = "out.safetensors" if fmt == "kohya" else lora.LORA_WEIGHT_NAME  # kohya: named after the output folder
    assert [p.name for p in out.glob("*.safetensors")] == [name]
    assert f"`{name}` ({fmt} format)" in (out / "README.md").read_text()
    fresh = load_pipeline(MODELS[kind])
    fresh.load_lora_weights(str(out), weight_name=name)
    assert np.abs(_image(fresh) - trained_image).max() <= 1e-4

    state = read_lora(out / name)
    assert state.format == fmt and {layer.alpha for layer in state.layers.values()} == {8.0}
    assert {key.split(".")[0] for key in state.layers} == {"unet", "text_encoder"} | ({"text_encoder_2"} if kind == "sdxl" else set())
    with safe_open(str(out / name), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    family, kohya_version = FAMILY_KEYS[kind]
    if fmt == "kohya":
        assert sum(k.endswith(".alpha") for k in keys) == len(state.layers)  # alpha per module
        assert meta["ss_base_model_version"] == kohya_version and meta["ss_network_alpha"] == "8"
        assert meta["modelspec.trigger_phrase"] == "a photo of sks dog" and meta["ss_sd_model_name"] == MODELS[kind]
        assert (meta["ss_learning_rate"], meta["ss_max_train_steps"], meta["ss_resolution"]) == ("0.03", "2", "(32, 32)")
    else:
        adapter = json.loads(meta["lora_adapter_metadata"])  # alpha, as load_lora_weights reads it
        assert adapter["unet.lora_alpha"] == 8 and adapter["text_encoder.lora_alpha"] == 8
        assert meta["customize.base_family"] == family and meta["customize.base_model"] == MODELS[kind]
        assert json.loads(meta["customize.trigger_words"]) == ["a photo of sks dog"]
        settings = json.loads(meta["customize.training"])
        assert (settings["learning_rate"], settings["max_train_steps"], settings["rank"]) == (0.03, 2, 4)
    assert detect_lora_family(state) == family  # the tiny models' widths alone do not tell
    info = _inspect(out, capsys)  # `customize inspect <output folder>`, whatever the file's name
    assert (info["format"], info["family"]) == (fmt, family)
    assert "a photo of sks dog" in (info["metadata"].get("modelspec.trigger_phrase") or info["metadata"]["customize.trigger_words"])
    # a conversion keeps what the file says about the run
    other = convert_lora(out / name, tmp_path / "converted", "diffusers" if fmt == "kohya" else "kohya", family=family)
    kept = LoraTraining.from_metadata(read_lora(other).metadata)
    assert kept.trigger_words == ("a photo of sks dog",) and kept.base_model == MODELS[kind]
    assert kept.settings.get("learning_rate", 0.03) == 0.03


def _inspect(path, capsys) -> dict:
    import json

    from customize.cli import main

    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_nothing_in_customize_calls_diffusers_lora_writer():
    """Every LoRA file the toolkit writes goes through customize.formats.save_lora (one writer, one metadata)."""
    import ast

    calls = []
    for path in (ROOT / "customize").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("save_lora_weights", "write_lora_layers"):
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not calls, calls


def test_lora_format_option():
    assert lora.LoRAConfig().lora_format == "diffusers" and "lora_format" in lora.LoRAConfig.RESUME_FREE
    with pytest.raises(ValueError, match="lora_format must be one of diffusers, peft, kohya, got 'a1111'"):
        lora.LoRAConfig(lora_format="a1111")
    cfg = lora.LoRAConfig(lora_format="kohya", output_dir="outputs/sks-dog")
    assert cfg.lora_file_name() == "sks-dog.safetensors" and "<lora:sks-dog:1>" in lora.model_card(cfg)


def test_lora_of_another_family_is_refused(tmp_path):
    pipe = tiny_pipeline("sd")
    cfg = lora.LoRAConfig(pretrained_model_name_or_path="tiny-sd", train_text_encoder=True)
    lora.trainable_parameters(pipe, cfg)
    lora.save(pipe, cfg, tmp_path)
    with pytest.raises(LoraCompatibilityError, match=r"made for .* but the model is SDXL(.|\n)*do not fit"):
        load_lora_files(tiny_pipeline("sdxl"), [(tmp_path, 1.0)])


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    pipe = tiny_pipeline("sd")
    cfg = lora.LoRAConfig(pretrained_model_name_or_path="tiny-sd")
    lora.trainable_parameters(pipe, cfg)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lora.save(pipe, cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_resolution_is_refused_before_any_output(tmp_path):
    from customize.training import parse_config

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import train_dreambooth_lora
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    args = _args(tmp_path, "sd")
    args[args.index("--resolution") + 1] = "33"
    with pytest.raises(ValueError, match=r"33 is not a positive multiple of the VAE downsampling factor 2; use 32 or 34 "
                                         r"\(this model's native size is 32\)"):
        train_dreambooth_lora.main(args)
    assert not (tmp_path / "out").exists()
    assert parse_config(lora.LoRAConfig, args).resolution == 33  # the refusal comes from the model, not the parser
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match=r"resolution 1 is not a positive multiple of .* 2; use 2 \(this model's "
                                         r"native size is 32\)$"):
        sd.check_resolution(pipe, 1)
    with pytest.raises(ValueError, match="resolution must be a positive number of pixels.*got 0.*native size"):
        parse_config(lora.LoRAConfig, [*args, "--resolution", "0"])  # before the model loads


def test_lora_alpha_zero_is_refused_not_read_as_unset():
    assert lora.alpha(lora.LoRAConfig(rank=8)) == 8 and lora.alpha(lora.LoRAConfig(rank=8, lora_alpha=2)) == 2
    for bad in (0.0, -4.0):
        with pytest.raises(ValueError, match="lora_alpha must be > 0.*leave it out for alpha = rank"):
            lora.LoRAConfig(lora_alpha=bad)


def test_captions_past_the_tokenizer_length_warn_once(monkeypatch, caplog):
    monkeypatch.setattr(sd, "_TRUNCATION", {"checked": set(), "warned": False})
    pipe = tiny_pipeline("sd")
    long = "a photo of sks dog " + "on a red table " * 40
    with caplog.at_level("WARNING", logger="customize.training.sd"):
        sd.tokenize(pipe, ["a photo of sks dog"])
        assert not caplog.records
        ids = sd.tokenize(pipe, [long, "a dog", long + "again"])
        sd.tokenize(pipe, [long + "and more"])
    assert ids[0].shape == (3, pipe.tokenizer.model_max_length)  # still cut, as the pipeline does
    (record,) = caplog.records
    message = record.getMessage()
    assert "2 of 3 caption(s)" in message and "77 tokens" in message and "'a photo of sks dog on a red" in message


def test_recipe_runs_as_a_plain_script_and_writes_the_in_process_result(tmp_path):
    """`python recipes/train_dreambooth_lora.py ...` (what accelerate launch runs per process) writes bitwise the
    LoRA that the same configuration trains in this process."""
    args = _args(tmp_path / "a", "sd", "--max_train_steps", "2")
    # Same intra-op thread count as this process: a different one changes float reduction order (not bitwise).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, str(ROOT / "recipes" / "train_dreambooth_lora.py"), *args], check=True, env=env,
                   cwd=tmp_path, capture_output=True)
    cfg = parse_config(lora.LoRAConfig, args)
    cfg.output_dir = str(tmp_path / "b")
    pipe = load_pipeline(cfg.pretrained_model_name_or_path)
    train(lora, pipe, lora.build_dataset(pipe, cfg), cfg)
    script, here = load_file(tmp_path / "a" / "out" / lora.LORA_WEIGHT_NAME), load_file(tmp_path / "b" / lora.LORA_WEIGHT_NAME)
    assert script.keys() == here.keys() and all(torch.equal(script[k], here[k]) for k in script)


def test_bf16_training_keeps_fp32_lora_over_bf16_frozen_weights(tmp_path):
    cfg = parse_config(lora.LoRAConfig, _args(tmp_path, "sdxl", "--mixed_precision", "bf16", "--train_text_encoder",
                                              "--validation_prompt", "a photo of sks dog", "--validation_steps", "3",
                                              "--num_validation_images", "1", "--validation_inference_steps", "2"))
    pipe = load_pipeline(cfg.pretrained_model_name_or_path)
    result = train(lora, pipe, lora.build_dataset(pipe, cfg), cfg)
    assert all(np.isfinite(result.losses)) and result.validation_images
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        dtypes = {(".lora_" in n, p.dtype) for n, p in module.named_parameters()}
        assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    saved = load_file(tmp_path / "out" / lora.LORA_WEIGHT_NAME)
    assert {v.dtype for v in saved.values()} == {torch.float32}


def test_resumed_lora_run_writes_the_uninterrupted_weights(tmp_path):
    """A fresh process re-injects the adapter and the engine restores it: stop at step 3 (checkpoint at 2),
    resume to 4, and the file equals a straight 4-step run bitwise (cached features, random flips, text encoder)."""
    def run(out, steps, *extra):
        args = _args(tmp_path, "sd", "--train_text_encoder", "--random_flip", "--checkpointing_steps", "2",
                     "--max_train_steps", str(steps), "--output_dir", str(tmp_path / out), *extra)
        cfg = parse_config(lora.LoRAConfig, args)
        pipe = load_pipeline(cfg.pretrained_model_name_or_path)
        return train(lora, pipe, lora.build_dataset(pipe, cfg), cfg)

    run("straight", 4)
    run("resumed", 3)
    assert run("resumed", 4, "--resume_from_checkpoint", "latest").resumed_from.endswith("checkpoint-2")
    a = load_file(tmp_path / "straight" / lora.LORA_WEIGHT_NAME)
    b = load_file(tmp_path / "resumed" / lora.LORA_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_style_lora_trains_on_per_image_captions(tmp_path):
    folder = _images(tmp_path / "style", n=3)
    captions = ["a red circle in the style of sks", "a blue square in the style of sks", "a green triangle"]
    for i, caption in enumerate(captions):
        (folder / f"{i}.txt").write_text(caption)
    args = _args(tmp_path, "sdxl", "--use_captions", "--max_train_steps", "2")
    args[args.index("--instance_data_dir") + 1] = str(folder)
    cfg = parse_config(lora.LoRAConfig, args)
    pipe = load_pipeline(cfg.pretrained_model_name_or_path)
    dataset = lora.build_dataset(pipe, cfg)
    assert [dataset[i]["instance"]["prompt"] for i in range(3)] == captions
    result = train(lora, pipe, dataset, cfg)
    assert result.global_step == 2 and (tmp_path / "out" / lora.LORA_WEIGHT_NAME).is_file()


def test_recipe_reports_bad_input_in_one_line(tmp_path):
    """A recipe run from the shell turns the toolkit's input errors into one line and exit status 1, as the
    `customize` command does (a traceback only on request), and leaves no output folder behind."""
    args = _args(tmp_path, "sd", "--rank", "0")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CUSTOMIZE_TRACEBACK", None)
    script = str(ROOT / "recipes" / "train_dreambooth_lora.py")
    done = subprocess.run([sys.executable, script, *args], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1
    assert "train_dreambooth_lora.py: error: rank must be >= 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, script, *args], env={**env, "CUSTOMIZE_TRACEBACK": "1"}, cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "ValueError: rank must be >= 1" in done.stderr


def test_recipes_ask_for_the_base_model():
    from customize.models import load_base_pipeline

    with pytest.raises(ValueError, match="--pretrained_model_name_or_path is required"):
        load_base_pipeline(lora.LoRAConfig(output_dir="unused"))


def test_run_recipe_passes_other_exceptions_through():
    from customize.cli import run_recipe

    assert run_recipe(lambda argv: None) == 0

    def broken(argv):
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        run_recipe(broken)
