"""The method protocol (customize/training/method.py): a method is checked once against it, hooks learn the global
step, and a method's own state is saved with every checkpoint and given back on resume (no method reads one)."""

import ast
import json
from pathlib import Path

import pytest
import torch
from engine_toy import ToyConfig, ToyData, ToyMethod, ToyModel, run

from customize.methods import dreambooth, lora
from customize.methods.ddpm import DDPM
from customize.methods.pivotal import PivotalTuning
from customize.methods.textual_inversion import TextualInversion
from customize.training import TrainingError, train
from customize.training.method import (
    METHOD_STATE_FILE,
    METHOD_TENSORS_FILE,
    OPTIONAL_HOOKS,
    REQUIRED_HOOKS,
    check_method,
)

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(tmp_path, **kw) -> ToyConfig:
    return ToyConfig(output_dir=str(tmp_path / kw.pop("name", "run")), **kw)


class StatefulToy(ToyMethod):
    """ToyMethod with state of its own: the steps it saw, and a tensor that follows the weights."""

    def __init__(self, crash_at: int | None = None):
        super().__init__()
        self.steps: list[int] = []
        self.running = torch.zeros(4)
        self.crash_at = crash_at
        self.loaded: list[dict] = []

    def after_step(self, model, cfg, step):
        super().after_step(model, cfg, step)
        if step == self.crash_at:
            raise KeyboardInterrupt  # a kill inside step `crash_at`, after the checkpoint before it
        self.steps.append(step)
        self.running += model.body[0].weight.detach()[0]

    def state_dict(self):
        return {"steps": list(self.steps), "phase": "late" if len(self.steps) > 2 else "early",
                "running": self.running}

    def load_state_dict(self, state):
        self.loaded.append(state)
        self.steps, self.running = list(state["steps"]), state["running"].clone()


def test_every_shipped_method_satisfies_the_protocol():
    for method in (dreambooth, lora, PivotalTuning(), TextualInversion(), DDPM(), ToyMethod(), StatefulToy()):
        hooks = check_method(method)
        assert all(callable(getattr(hooks, name)) for name in REQUIRED_HOOKS)
    assert check_method(PivotalTuning()).has_state and not check_method(lora).has_state
    assert REQUIRED_HOOKS == {"trainable_parameters": ("model", "cfg"), "loss": ("model", "batch", "cfg"),
                              "save": ("model", "cfg", "out_dir")}
    assert OPTIONAL_HOOKS["after_step"] == ("model", "cfg", "step")
    assert OPTIONAL_HOOKS["validate"] == ("model", "cfg", "step")


@pytest.mark.parametrize("missing", sorted(REQUIRED_HOOKS))
def test_a_method_missing_a_required_hook_is_refused_naming_it(missing, tmp_path):
    hooks = {name: getattr(ToyMethod, name) for name in REQUIRED_HOOKS if name != missing}
    method = type("Incomplete", (), hooks)()
    args = ", ".join(REQUIRED_HOOKS[missing])
    with pytest.raises(TypeError, match=rf"the method Incomplete lacks the required hook {missing}\({args}\)"):
        train(method, ToyModel(), ToyData(4, True), cfg_for(tmp_path))
    assert not (tmp_path / "run").exists(), "the method must be refused before anything is written"


def test_hooks_of_the_wrong_shape_are_refused_naming_them(tmp_path):
    class OldAfterStep(ToyMethod):
        def after_step(self, model, cfg):  # written before hooks got the step
            pass

    with pytest.raises(TypeError, match=r"hook after_step\(model, cfg\), but the engine calls after_step\(model, cfg, "
                                        r"step\)"):
        train(OldAfterStep(), ToyModel(), ToyData(4, True), cfg_for(tmp_path))

    class NotCallable(ToyMethod):
        validate = "every 10 steps"

    with pytest.raises(TypeError, match=r"validate = 'every 10 steps', which is not callable"):
        check_method(NotCallable())

    class HalfState(ToyMethod):
        def state_dict(self):
            return {}

    with pytest.raises(TypeError, match=r"has state_dict but lacks the hook load_state_dict\(state\)"):
        check_method(HalfState())


def test_hooks_learn_the_global_step_also_after_a_resume(tmp_path):
    common = dict(max_train_steps=5, checkpointing_steps=2, deterministic=True)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path, **common), StatefulToy(crash_at=3))
    method = StatefulToy()
    run(cfg_for(tmp_path, resume_from_checkpoint="latest", **common), method)
    assert method.steps == [1, 2, 3, 4, 5]  # 1, 2 from the checkpoint's state, then the steps the resume ran


def test_method_state_round_trips_through_a_checkpoint(tmp_path):
    """A run killed inside step 4 and resumed from checkpoint-3 ends with the method state, as well as the weights,
    of the uninterrupted run; the state comes back from the checkpoint folder, tensors as tensors."""
    common = dict(max_train_steps=6, checkpointing_steps=3, learning_rate=1e-2)
    straight = StatefulToy()
    ref, _ = run(cfg_for(tmp_path, name="ref", **common), straight)
    assert straight.loaded == []

    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path, name="cut", **common), StatefulToy(crash_at=4))
    saved = tmp_path / "cut" / "checkpoint-3"
    assert json.loads((saved / METHOD_STATE_FILE).read_text()) == {
        "state": {"steps": [1, 2, 3], "phase": "late"}, "tensors": ["running"]}
    assert (saved / METHOD_TENSORS_FILE).is_file()

    resumed = StatefulToy()
    model, result = run(cfg_for(tmp_path, name="cut", resume_from_checkpoint="latest", **common), resumed)
    assert result.resumed_from.endswith("checkpoint-3")
    [state] = resumed.loaded
    assert state["steps"] == [1, 2, 3] and state["phase"] == "late" and isinstance(state["running"], torch.Tensor)
    assert resumed.steps == straight.steps == [1, 2, 3, 4, 5, 6]
    assert torch.equal(resumed.running, straight.running)
    for a, b in zip(ref.body.parameters(), model.body.parameters()):
        assert torch.equal(a, b)


def test_checkpoints_without_or_with_foreign_method_state_are_refused(tmp_path):
    common = dict(max_train_steps=4, checkpointing_steps=2)
    run(cfg_for(tmp_path, name="plain", max_train_steps=2, checkpointing_steps=2))  # ToyMethod keeps no state
    assert not (tmp_path / "plain" / "checkpoint-2" / METHOD_STATE_FILE).exists()
    with pytest.raises(TrainingError, match=rf"holds no method state \({METHOD_STATE_FILE}\), which this method "
                                            r"\(StatefulToy\) keeps"):
        run(cfg_for(tmp_path, name="plain", resume_from_checkpoint="latest", **common), StatefulToy())

    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path, name="stateful", **common), StatefulToy(crash_at=3))
    with pytest.raises(TrainingError, match=r"\(ToyMethod\) cannot take back \(it has no load_state_dict\)"):
        run(cfg_for(tmp_path, name="stateful", resume_from_checkpoint="latest", **common), ToyMethod())

    (tmp_path / "stateful" / "checkpoint-2" / METHOD_STATE_FILE).write_text('{"state": {"steps": [1, 2]')
    with pytest.raises(TrainingError, match=rf"{METHOD_STATE_FILE} cannot be read as JSON.*damaged"):
        run(cfg_for(tmp_path, name="stateful", resume_from_checkpoint="latest", **common), StatefulToy())


def test_state_that_is_not_json_is_refused_naming_the_entry(tmp_path):
    class Unsaveable(StatefulToy):
        def state_dict(self):
            return {"steps": self.steps, "when": object()}

    with pytest.raises(TypeError, match=r"state_dict\(\) entry 'when' is neither a tensor nor JSON"):
        run(cfg_for(tmp_path, max_train_steps=2, checkpointing_steps=1), Unsaveable())


def test_no_method_reads_checkpoints():
    """The engine is the only code that knows checkpoints: no method imports the checkpoint module."""
    for file in sorted((ROOT / "customize" / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("customize.training.checkpoint") for n in names), \
                f"{file.relative_to(ROOT)}:{node.lineno} imports {names}"
