"""The environment report and its verdict (`customize env`), and what a known-bad pair of libraries does: the
text-encoder LoRA is injected without transformers' version gate, and loading one refuses in one line."""

import pytest
import torch

from customize import cli, env
from customize.formats.lora import LoraLayer, LoraState, load_lora_files, lora_state_from_model, save_lora
from customize.methods import lora
from customize.models import tiny_pipeline

BROKEN = {"transformers": "5.24.0", "peft": "0.21.2"}


def test_the_known_bad_pair_is_named_with_its_fix():
    found = [p for p in env.problems(dict(BROKEN)) if p.fatal]
    assert len(found) == 1
    text = str(found[0])
    assert "transformers 5.24.0" in text and "peft 0.21.2" in text and "0.22.0" in text
    assert "pip install 'transformers<5.24.0'" in text and "constraints.txt" in text
    assert "\n" not in text
    with pytest.raises(env.IncompatibleEnvironment, match="transformers 5.24.0 refuses peft 0.21.2"):
        env.check(dict(BROKEN))


@pytest.mark.parametrize("versions", [
    {"transformers": "5.23.0", "peft": "0.21.2"},  # before the gate
    {"transformers": "5.24.0", "peft": "0.22.0"},  # the peft the gate asks for
    {"transformers": "5.30.1", "peft": "0.23.1"},
    {"transformers": None, "peft": "0.21.2"},
])
def test_good_pairs_pass(versions):
    assert not [p for p in env.problems(versions) if p.fatal]
    env.check(versions)


def test_the_installed_set_is_not_known_bad():
    """The suite runs on the tested set (constraints.txt); the conftest stops the run on a known-bad one."""
    assert not [p for p in env.problems() if p.fatal]


def test_a_version_outside_the_declared_range_is_a_warning_not_a_refusal():
    versions = env.installed_versions()
    versions["diffusers"] = "0.99.0"  # pyproject asks for diffusers < 0.50
    found = [p for p in env.problems(versions) if "diffusers 0.99.0" in p.what]
    assert len(found) == 1 and not found[0].fatal and "outside the range" in found[0].what
    assert "- warning: diffusers 0.99.0" in env.report(versions)


def test_customize_env_prints_a_pasteable_report(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("Python", "torch", "CUDA available", "diffusers", "transformers", "peft", "accelerate", "datasets",
                 "xformers", "bitsandbytes"):
        assert f"- {name}" in out, name
    assert f"- torch: {torch.__version__}" in out
    assert f"- transformers: {env.installed_versions()['transformers']}" in out
    assert "### verdict" in out and "no known-bad combination found" in out
    assert cli.main(["env", "--check"]) == 0


def test_customize_env_check_fails_on_a_known_bad_pair(monkeypatch, capsys):
    monkeypatch.setattr(env, "installed_versions", lambda names=env.PACKAGES: {n: BROKEN.get(n, "1.0") for n in names})
    monkeypatch.setattr(env, "transformers_min_peft", lambda v, ask_installed=True: "0.22.0")
    assert cli.main(["env", "--check"]) == cli.EXIT_ERROR
    assert "- PROBLEM: transformers 5.24.0 refuses peft 0.21.2" in capsys.readouterr().out


def test_text_encoder_lora_is_injected_without_the_transformers_gate(monkeypatch):
    """transformers' own add_adapter (the hook with the version gate) is never called: training a text-encoder
    LoRA works on a transformers release that refuses the installed peft."""
    from transformers import PreTrainedModel

    def gated(*args, **kwargs):
        raise ImportError("The version of PEFT you are using is not compatible, please use a version >= 0.22.0")

    monkeypatch.setattr(PreTrainedModel, "add_adapter", gated)
    pipe = tiny_pipeline("sdxl")
    cfg = lora.LoRAConfig(pretrained_model_name_or_path="tiny-sdxl", train_text_encoder=True, rank=2)
    params = lora.trainable_parameters(pipe, cfg)
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        assert lora.ADAPTER in module.peft_config
        assert any(".lora_A." in n for n, _ in module.named_parameters())
    state = lora_state_from_model(lora.adapted_modules(pipe, cfg))
    assert any(k.startswith("text_encoder.") and k.endswith(".q_proj") for k in state.layers)
    assert len(params) == sum(p.requires_grad for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
                              for p in m.parameters())


def test_loading_a_text_encoder_lora_on_a_known_bad_pair_refuses_before_loading(tmp_path, monkeypatch):
    pipe = tiny_pipeline("sd")
    width = pipe.text_encoder.config.hidden_size
    te = LoraState({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
                    LoraLayer(torch.randn(2, width), torch.randn(width, 2), 2.0)})
    path = save_lora(te, tmp_path, "diffusers")
    monkeypatch.setattr(env, "transformers_min_peft", lambda v, ask_installed=True: "99.0")
    with pytest.raises(env.IncompatibleEnvironment, match="refuses peft .* fix: pip install"):
        load_lora_files(pipe, [(path, 1.0)])
    assert not any(pipe.get_list_adapters().values())
