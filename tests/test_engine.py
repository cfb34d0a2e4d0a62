"""The training engine on a toy method (tests/engine_toy.py) and on a tiny diffusers UNet with a peft LoRA."""

import json
import math

import pytest
import torch
from engine_toy import ToyConfig, ToyData, ToyMethod, ToyModel, run
from safetensors.torch import load_file

from customize.training import TrainConfig, TrainingError, parse_config, train
from customize.training import checkpoint as ckpt
from customize.training.ema import EMA


def cfg_for(tmp_path, **kw) -> ToyConfig:
    return ToyConfig(output_dir=str(tmp_path / kw.pop("name", "run")), **kw)


def test_loss_goes_down(tmp_path):
    _, result = run(cfg_for(tmp_path, max_train_steps=80, learning_rate=3e-2, train_batch_size=4))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.2 * first, (first, last)
    assert result.global_step == 80 and len(result.losses) == 80


def test_grad_accumulation_equals_big_batch(tmp_path):
    """2 micro-batches of 1 accumulated == 1 batch of 2: the same examples, the same mean gradient."""
    big, _ = run(cfg_for(tmp_path, name="big", deterministic=True, max_train_steps=3, train_batch_size=2))
    acc, _ = run(cfg_for(tmp_path, name="acc", deterministic=True, max_train_steps=3, train_batch_size=1,
                         gradient_accumulation_steps=2))
    for a, b in zip(big.body.parameters(), acc.body.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    init = ToyModel(True)
    assert not torch.allclose(init.body[0].weight, big.body[0].weight), "training did not change the weights"


def test_frozen_parameters_bitwise_unchanged_and_hooks_called(tmp_path):
    torch.manual_seed(0)
    model = ToyModel().eval()
    frozen = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    trained = {k: v.clone() for k, v in model.body.state_dict().items()}
    method = ToyMethod()
    cfg = cfg_for(tmp_path, max_train_steps=4, learning_rate=1e-2)
    train(method, model, ToyData(8, False), cfg)
    for k, v in model.frozen.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(not torch.equal(v, trained[k]) for k, v in model.body.state_dict().items() if k.endswith("weight"))
    assert method.calls == ["after_step"] * 4 + ["save"]
    saved = load_file(str(tmp_path / "run" / "toy.safetensors"))
    assert torch.equal(saved["0.weight"], model.body[0].weight.detach())
    assert (tmp_path / "run" / "README.md").read_text().startswith("# toy")
    assert not model.training, "the engine must give the model back in the mode it got it"


def test_checkpoint_limit_and_partial_checkpoints(tmp_path):
    out = tmp_path / "run"
    (out / ".checkpoint-3.tmp").mkdir(parents=True)  # a save killed midway
    (out / "checkpoint-1").mkdir()  # no trainer_state.json: not a complete checkpoint
    assert ckpt.resolve_resume(out, "latest") is None
    _, result = run(cfg_for(tmp_path, max_train_steps=7, checkpointing_steps=2, checkpoints_total_limit=2))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert not (out / ".checkpoint-3.tmp").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    state = json.loads((out / "checkpoint-6" / ckpt.STATE_FILE).read_text())
    assert state["global_step"] == 6 and state["losses"] == result.losses[:6]
    assert ckpt.resolve_resume(out, "latest") == out / "checkpoint-6"
    assert ckpt.resolve_resume(out, "checkpoint-4") == out / "checkpoint-4"
    with pytest.raises(TrainingError, match="checkpoint-5"):
        ckpt.resolve_resume(out, "checkpoint-5")


def test_in_process_resume_is_bitwise_exact_and_validation_does_not_perturb(tmp_path):
    """Interrupted at step 4 (of 9, with accumulation, padding at epoch ends, EMA, dropout, augmentation, loss
    noise) and resumed == uninterrupted; the resumed run also validates, the reference does not."""
    common = dict(max_train_steps=9, train_batch_size=3, gradient_accumulation_steps=2, n_examples=7,
                  learning_rate=1e-2, use_ema=True, ema_decay=0.9, lr_scheduler="cosine", lr_warmup_steps=2)
    ref, ref_result = run(cfg_for(tmp_path, name="ref", **common))

    class Crash(Exception):
        pass

    class CrashingMethod(ToyMethod):
        def after_step(self, model, cfg, step):
            super().after_step(model, cfg, step)
            if len(self.calls) == 5:  # inside step 5, after checkpoint-4 was written
                raise Crash

    with pytest.raises(Crash):
        run(cfg_for(tmp_path, name="cut", checkpointing_steps=4, **common), CrashingMethod())
    method = ToyMethod(validate_images=True)
    resumed, result = run(cfg_for(tmp_path, name="cut", resume_from_checkpoint="latest", validation_steps=2,
                                  report_to="tensorboard", **common), method)
    assert result.resumed_from.endswith("checkpoint-4")
    for a, b in zip(ref.body.parameters(), resumed.body.parameters()):
        assert torch.equal(a, b)
    assert result.losses == ref_result.losses
    # EMA weights are what the method saved and what the model holds after training; the raw weights (the same
    # run without EMA, which does not change the optimisation) are neither.
    ref_saved = load_file(str(tmp_path / "ref" / "toy.safetensors"))
    cut_saved = load_file(str(tmp_path / "cut" / "toy.safetensors"))
    assert all(torch.equal(ref_saved[k], cut_saved[k]) for k in ref_saved)
    assert all(torch.equal(ref_saved[k], v.detach()) for k, v in ref.body.state_dict().items())
    raw, _ = run(cfg_for(tmp_path, name="raw", **{**common, "use_ema": False}))
    assert not torch.equal(ref_saved["0.weight"], raw.body[0].weight.detach())
    # Validation: steps 6, 8 and the final step 9, as PNG grids and TensorBoard images.
    assert [c for c in method.calls if c.startswith("validate")] == ["validate:6", "validate:8", "validate:9"]
    grids = sorted(p.name for p in (tmp_path / "cut" / "validation").iterdir())
    assert grids == ["step-000006.png", "step-000008.png", "step-000009.png"]
    assert list((tmp_path / "cut" / "logs").rglob("events.out.tfevents*"))


def test_non_finite_weights_are_never_published(tmp_path):
    """A weight turned NaN is caught before the checkpoint or the final save that would hold it; the error names
    the last finite checkpoint (or says there is none), and a resume from it goes on."""
    with pytest.raises(FloatingPointError, match="not finite after step 2.*no checkpoint of this run was written"):
        run(cfg_for(tmp_path, name="final", max_train_steps=2, checkpointing_steps=0, poison_after=2))
    assert not (tmp_path / "final" / "toy.safetensors").exists()
    out = tmp_path / "ckpt"
    with pytest.raises(FloatingPointError,
                       match=f"not finite after step 3.*last finite checkpoint is {out}/checkpoint-2"):
        run(cfg_for(tmp_path, name="ckpt", max_train_steps=5, checkpointing_steps=1, poison_after=3))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    model, result = run(cfg_for(tmp_path, name="ckpt", max_train_steps=5, checkpointing_steps=1,
                                resume_from_checkpoint="latest"))
    assert result.resumed_from.endswith("checkpoint-2") and result.global_step == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_mistakes_are_training_errors(tmp_path):
    """Trained tensors that differ from the checkpoint's by name or shape (what another rank, target set or method
    gives) are a TrainingError (a ValueError: one line from the recipes), not a KeyError or a RuntimeError; so is a
    checkpoint holding non-finite values. Checked on a checkpoint without saved settings (an older version), where
    the settings comparison cannot catch them first."""
    from safetensors.torch import save_file

    out = tmp_path / "run"
    run(cfg_for(tmp_path, max_train_steps=2, checkpointing_steps=2))
    state_file = out / "checkpoint-2" / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["settings"]
    state_file.write_text(json.dumps(state))
    resume = cfg_for(tmp_path, max_train_steps=3, resume_from_checkpoint="latest")

    class FirstLayerOnly(ToyMethod):
        def trainable_parameters(self, model, cfg):
            model.requires_grad_(False)
            return list(model.body[0].parameters())

    with pytest.raises(TrainingError, match="holds 2 trained tensors this run does not train.*rank, lora_target"):
        run(resume, FirstLayerOnly())
    trainable = out / "checkpoint-2" / ckpt.TRAINABLE_FILE
    tensors = load_file(str(trainable))
    good = dict(tensors)
    tensors["model.body.0.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(trainable))
    with pytest.raises(TrainingError, match=r"model.body.0.weight is \(8, 4\) in the checkpoint and \(16, 4\)"):
        run(resume)
    tensors = dict(good)
    tensors["model.body.0.weight"] = torch.full((16, 4), float("nan"))
    save_file(tensors, str(trainable))
    with pytest.raises(TrainingError, match="holds non-finite values"):
        run(resume)
    assert issubclass(TrainingError, ValueError)


def test_lr_schedule_scale_lr_and_logged_extras(tmp_path):
    _, result = run(cfg_for(tmp_path, max_train_steps=6, learning_rate=0.01, lr_scheduler="linear",
                            lr_warmup_steps=2, scale_lr=True, train_batch_size=2, gradient_accumulation_steps=3))
    peak = 0.01 * 2 * 3
    lrs = [log["lr"] for log in result.logs]
    # diffusers' linear schedule: warm-up k/2 then (6 - k)/(6 - 2), read after each of the 6 steps.
    expected = [peak * f for f in (1 / 2, 1.0, 3 / 4, 2 / 4, 1 / 4, 0.0)]
    assert lrs == pytest.approx(expected)
    assert all("pred_mean" in log and "grad_norm" in log for log in result.logs)


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    cfg = cfg_for(tmp_path, max_train_steps=3, mixed_precision="bf16")
    torch.manual_seed(cfg.seed)
    model = ToyModel(cfg.deterministic)
    before = {k: v.clone() for k, v in model.body.state_dict().items()}
    result = train(ToyMethod(), model, ToyData(cfg.n_examples, cfg.deterministic), cfg)
    assert all(math.isfinite(x) for x in result.losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = model.body.state_dict()
    assert all(not torch.equal(v, after[k]) for k, v in before.items()), "bf16 training did not change the weights"


def test_workers_do_not_change_the_result(tmp_path):
    """Augmentation is seeded per example, so 2 persistent workers give the weights of the in-process loader."""
    a, _ = run(cfg_for(tmp_path, name="w0", max_train_steps=6, n_examples=5, train_batch_size=2))
    b, _ = run(cfg_for(tmp_path, name="w2", max_train_steps=6, n_examples=5, train_batch_size=2,
                       dataloader_num_workers=2))
    for x, y in zip(a.body.parameters(), b.body.parameters()):
        assert torch.equal(x, y)


def test_missing_tracker_package_falls_back(monkeypatch, caplog):
    import importlib.util

    from customize.training import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    assert tracking.resolve_trackers("tensorboard") == []
    assert "pip install tensorboard" in caplog.text
    assert tracking.resolve_trackers("none") == []


def test_ema_formula():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5)
    values, shadow = [1.0, 2.0, 4.0], 0.0
    for n, v in enumerate(values):
        with torch.no_grad():
            p.fill_(v)
        ema.step()
        d = min(0.5, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * v
    assert ema.shadow[0] == pytest.approx(torch.full((3,), shadow))
    with ema.swapped_in():
        assert torch.equal(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), torch.full((3,), 4.0))


def test_errors_say_what_to_do(tmp_path):
    class NanMethod(ToyMethod):
        def loss(self, model, batch, cfg):
            return model.body(batch["x"]).sum() * float("nan")

    with pytest.raises(FloatingPointError, match="lower learning_rate"):
        train(NanMethod(), ToyModel(), ToyData(4, True), cfg_for(tmp_path, max_train_steps=2))
    with pytest.raises(TypeError, match="lacks the required hook save"):
        train(type("NoSave", (), {"trainable_parameters": ToyMethod.trainable_parameters, "loss": ToyMethod.loss})(),
              ToyModel(), ToyData(4, True), cfg_for(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        run(cfg_for(tmp_path, n_examples=0))
    with pytest.raises(ValueError, match="mixed_precision"):
        ToyConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="compile_mode must be one of.*reduce-overhead"):
        ToyConfig(compile_mode="reduce_overhead")
    with pytest.raises(ValueError, match="float32 trained parameters"):
        train(ToyMethod(), ToyModel().half(), ToyData(4, True), cfg_for(tmp_path, mixed_precision="fp16"))
    with pytest.raises(TrainingError, match="no such checkpoint"):
        run(cfg_for(tmp_path, resume_from_checkpoint=str(tmp_path / "nope")))
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="pip install bitsandbytes"):
            run(cfg_for(tmp_path, use_8bit_adam=True))
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ImportError, match="pip install xformers"):
            run(cfg_for(tmp_path, enable_xformers_memory_efficient_attention=True))


def test_cuda_graphs_are_used_only_where_they_hold():
    """CUDA graphs (compile_mode reduce-overhead / max-autotune on a GPU) get a step mark each micro-batch, and
    are refused with gradient accumulation, which they would silently corrupt. Decided from the device's type, so
    this runs without a GPU."""
    from customize.training.engine import _records_cuda_graphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    graphs = dict(compile=True, compile_mode="reduce-overhead")
    assert _records_cuda_graphs(ToyConfig(**graphs), cuda)
    assert _records_cuda_graphs(ToyConfig(compile=True, compile_mode="max-autotune"), cuda)
    assert not _records_cuda_graphs(ToyConfig(**graphs), cpu)
    assert not _records_cuda_graphs(ToyConfig(compile=True, compile_mode="default", gradient_accumulation_steps=4), cuda)
    assert not _records_cuda_graphs(ToyConfig(compile_mode="reduce-overhead", gradient_accumulation_steps=4), cuda)
    with pytest.raises(ValueError, match="gradient_accumulation_steps 1 with a larger train_batch_size"):
        _records_cuda_graphs(ToyConfig(**graphs, gradient_accumulation_steps=2), cuda)


def test_parse_config_cli_yaml_json(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class Cfg(TrainConfig):
        pretrained_model_name_or_path: str = field(kw_only=True)
        rank: int = 4

    cfg = parse_config(ToyConfig, ["--max_train_steps", "7", "--use_ema", "--checkpoints_total_limit", "3",
                                   "--learning_rate", "2e-4", "--deterministic", "false"])
    assert (cfg.max_train_steps, cfg.use_ema, cfg.checkpoints_total_limit, cfg.learning_rate) == (7, True, 3, 2e-4)
    assert cfg.deterministic is False and cfg.resume_from_checkpoint is None

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("max_train_steps: 11\nlearning_rate: 0.001\nuse_ema: true\nmixed_precision: bf16\n")
    cfg = parse_config(ToyConfig, ["--config", str(yaml_file), "--learning_rate", "0.5"])
    assert (cfg.max_train_steps, cfg.learning_rate, cfg.use_ema, cfg.mixed_precision) == (11, 0.5, True, "bf16")

    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"pretrained_model_name_or_path": "tiny-sd", "rank": 8}))
    cfg = parse_config(Cfg, ["--config", str(json_file)])
    assert (cfg.pretrained_model_name_or_path, cfg.rank) == ("tiny-sd", 8)

    yaml_file.write_text("max_train_step: 3\n")
    with pytest.raises(ValueError, match="unknown option.*max_train_step"):
        parse_config(ToyConfig, ["--config", str(yaml_file)])
    with pytest.raises(ValueError, match="--max_train_step"):  # no silent prefix match of --max_train_steps
        parse_config(ToyConfig, ["--max_train_step", "3"])


@pytest.mark.parametrize("text, error", [
    ("max_train_steps: 2.9\n", r"max_train_steps: 2\.9 \(float\) is not an integer; write a whole number, e\.g\. 3"),
    ("max_train_steps: ten\n", r"max_train_steps: 'ten' \(str\) is not an integer"),
    ("learning_rate: fast\n", r"learning_rate: 'fast' \(str\) is not a number"),
    ("learning_rate: [0.1]\n", r"learning_rate: \[0\.1\] \(a list\) is not a number"),
    ("use_ema: maybe\n", r"use_ema: 'maybe' \(str\) is not true or false"),
    ("seed: null\n", r"seed: null is not an integer; give a value or leave the key out"),
    ("mixed_precision: no\n", r"mixed_precision: False \(bool\) is not a string; put the word in quotes, e\.g\. "
                              r"mixed_precision: 'no'"),
    ("checkpoints_total_limit: 1.5\n", r"checkpoints_total_limit: 1\.5 \(float\) is not an integer or null"),
    ("max_train_steps: [\n", r"not valid YAML: .* at line 2, column 1"),
])
def test_config_file_values_are_type_checked(tmp_path, text, error):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=rf"config file .*c\.yaml: {error}"):
        parse_config(ToyConfig, ["--config", str(tmp_path / "c.yaml")])


def test_config_file_values_read_as_the_flags_read_them(tmp_path):
    from customize.methods.ddpm import DDPMConfig

    # PyYAML reads 1e-4 (no dot) as a string; quoted numbers and yes / no are what the flags would accept too
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nmax_train_steps: '7'\nuse_ema: yes\nema_decay: 0\n"
                                     "checkpoints_total_limit: null\n")
    cfg = parse_config(ToyConfig, ["--config", str(tmp_path / "c.yaml")])
    assert (cfg.learning_rate, cfg.max_train_steps, cfg.use_ema, cfg.ema_decay) == (1e-4, 7, True, 0.0)
    assert isinstance(cfg.ema_decay, float) and cfg.checkpoints_total_limit is None
    (tmp_path / "d.yaml").write_text("block_out_channels: 32\n")
    with pytest.raises(ValueError, match=r"block_out_channels: 32 \(int\) is not a list of integers; .*\[32\]"):
        parse_config(DDPMConfig, ["--config", str(tmp_path / "d.yaml"), "--dataset_name", "digits"])
    (tmp_path / "d.yaml").write_text("block_out_channels: [16, 32.5]\n")
    with pytest.raises(ValueError, match=r"block_out_channels\[1\]: 32\.5"):
        parse_config(DDPMConfig, ["--config", str(tmp_path / "d.yaml"), "--dataset_name", "digits"])
    (tmp_path / "e.json").write_text('{"seed": 1,}')
    with pytest.raises(ValueError, match=r"e\.json: not valid JSON: .* line 1, column 12"):
        parse_config(ToyConfig, ["--config", str(tmp_path / "e.json")])


def test_options_the_machine_cannot_run_are_refused_while_parsing(monkeypatch):
    import importlib.util

    from customize.training import config

    monkeypatch.setattr(config, "_fp16_device_available", lambda: False)
    with pytest.raises(ValueError, match="mixed_precision fp16 needs a GPU .* use --mixed_precision bf16"):
        parse_config(ToyConfig, ["--mixed_precision", "fp16"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("bitsandbytes", "xformers") else real_find_spec(name, *a))
    for flag, package in (("--use_8bit_adam", "bitsandbytes"),
                          ("--enable_xformers_memory_efficient_attention", "xformers")):
        with pytest.raises(config.MissingDependencyError, match=f"needs {package}, which is not installed: pip install"):
            parse_config(ToyConfig, [flag])
    assert issubclass(config.MissingDependencyError, ValueError)  # customize.cli.USER_ERRORS: one line
    with pytest.raises(ValueError, match="learning_rate must be > 0, got -0.1"):
        ToyConfig(learning_rate=-0.1)


def test_every_option_has_a_help_text_and_shows_its_default():
    from customize.methods import ddpm, dreambooth, lora, pivotal, textual_inversion, ziplora
    from customize.toy.base import ToyBaseConfig
    from customize.training.config import build_config_parser

    for cls in (TrainConfig, dreambooth.DreamBoothConfig, lora.LoRAConfig, pivotal.PivotalConfig,
                textual_inversion.TextualInversionConfig, ddpm.DDPMConfig, ToyBaseConfig, ziplora.ZipLoRAConfig):
        parser = build_config_parser(cls)
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{cls.__name__}: --{action.dest} has no help text"
        text = " ".join(parser.format_help().split())
        # a subclass that only changes a default keeps the base field's help, with its own default
        assert "--max_train_steps MAX_TRAIN_STEPS, --max-train-steps MAX_TRAIN_STEPS Number of optimizer steps. " \
               f"(default: {cls.max_train_steps})" in text, cls
        assert f"(default: {cls.learning_rate})" in text and "--no_progress, --no-progress Turn progress off" in text


def test_lora_unet_with_gradient_checkpointing_and_compile(tmp_path):
    """A peft LoRA on a tiny diffusers UNet trains through the engine with gradient checkpointing and
    torch.compile on: base weights bitwise unchanged, LoRA B (zero at init) moved, state-dict keys intact."""
    from peft import LoraConfig

    from customize.models import tiny_pipeline

    pipe = tiny_pipeline("sd", seed=0)
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    base = {k: v.clone() for k, v in unet.state_dict().items() if "lora" not in k}
    keys = set(unet.state_dict())

    class LoraMethod:
        def trainable_parameters(self, pipe, cfg):
            pipe.vae.requires_grad_(False)
            pipe.text_encoder.requires_grad_(False)
            return [p for n, p in pipe.unet.named_parameters() if "lora" in n]

        def loss(self, pipe, batch, cfg):
            latents = batch["latents"]  # (B, 4, 16, 16)
            t = torch.randint(0, 1000, (latents.shape[0],))
            states = torch.randn(latents.shape[0], 77, pipe.unet.config.cross_attention_dim)
            out = pipe.unet(latents, t, encoder_hidden_states=states).sample
            return torch.nn.functional.mse_loss(out, torch.zeros_like(out))

        def save(self, pipe, cfg, out_dir):
            pass

    data = [{"latents": torch.randn(4, 16, 16)} for _ in range(2)]
    cfg = TrainConfig(output_dir=str(tmp_path / "lora"), max_train_steps=2, learning_rate=1e-2, report_to="none",
                      gradient_checkpointing=True, compile=True, progress=False)
    result = train(LoraMethod(), pipe, data, cfg)
    assert result.global_step == 2
    assert unet.is_gradient_checkpointing
    assert set(unet.state_dict()) == keys
    for k, v in unet.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, base[k]), k
    lora_b = [v for k, v in unet.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
