"""The one training loop of the toolkit, on accelerate.

    result = train(method, model, dataset, cfg)

`method` supplies the math through the hooks of the method protocol (customize/training/method.py, which says
when each is called: `trainable_parameters`, `loss`, `save`; optionally `prepare`, `collate`, `after_step`,
`validate`, `model_card`, and `state_dict` / `load_state_dict` for state kept with the checkpoints); this file
supplies everything else: devices, the optimizer and LR schedule, gradient accumulation and clipping, mixed
precision, EMA, checkpoints and exact resume (the method's state included: no method reads a checkpoint),
trackers, validation grids, validation scores and their curve, and the final save.

Design points (the why):
- The method's modules are never wrapped. A method calls `pipe.unet(...)` on the plain module, so
  data-parallel gradient averaging is done here, once per optimizer step, by an all-reduce of the trained
  gradients (the same mean DistributedDataParallel computes, without its forward wrapper, which would hide
  `unet.config` and break methods that call sub-modules directly). The price is no overlap of communication
  with the backward pass; FSDP and DeepSpeed are not supported.
- The data stream (customize.data.sampling) is a pure function of (seed, epoch, index): each epoch's order
  comes from a generator seeded with (seed, epoch), and every example is produced under python/numpy/torch
  RNGs seeded with (seed, epoch, index). Random crops and flips are therefore identical whatever the number of workers, and a
  resumed run replays the stream from the exact micro-batch where the checkpoint was taken.
- The loop's own randomness (noise, timesteps, dropout) uses the global RNGs, seeded per process and saved in
  every checkpoint by accelerate. Validation runs with those RNGs saved and restored, so turning it on or off
  does not change the trained weights.
Resume after a kill gives bitwise the same weights on CPU (tests/test_resume.py); on GPU only up to the
nondeterminism of its kernels.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from customize.data.sampling import EpochBatchSampler, SeededDataset, seeded_rng
from customize.errors import TrainingError
from customize.training import checkpoint as ckpt
from customize.training.config import CUDA_GRAPH_MODES, TrainConfig
from customize.training.ema import EMA
from customize.training.method import METHOD_STATE_FILE, check_method, method_name
from customize.training.optim import build_lr_scheduler, build_optimizer, param_groups
from customize.training.tracking import (record_validation, record_validation_scores, resolve_trackers, tracker_config,
                                         write_model_card)

logger = logging.getLogger(__name__)

# Elements per all-reduce bucket: big enough to amortise the call, small enough that flattening a full UNet's
# gradients does not need a second full copy of them.
_ALLREDUCE_BUCKET_NUMEL = 2**25


@dataclass
class TrainResult:
    global_step: int
    losses: list[float]  # one per optimizer step from step 1: mean over accumulation and processes
    logs: list[dict] = field(default_factory=list)  # scalars of the steps run in this call (loss, lr, extras)
    output_dir: str = ""
    resumed_from: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    validation_images: list[str] = field(default_factory=list)
    validation_logs: list[dict] = field(default_factory=list)  # {"step": s, name: value} per validation with scalars


# ---------------------------------------------------------------------------------------------------------------
# Modules and parameters
# ---------------------------------------------------------------------------------------------------------------


def find_modules(model) -> dict[str, torch.nn.Module]:
    """The nn.Modules a model is made of: itself if it is one; a diffusers pipeline's components; a dict's
    values; or the attributes of a plain object (a dataclass bundle). Shared modules are listed once."""
    if isinstance(model, torch.nn.Module):
        items = [("model", model)]
    elif isinstance(getattr(model, "components", None), dict):
        items = list(model.components.items())
    elif isinstance(model, dict):
        items = list(model.items())
    else:
        items = list(vars(model).items()) if hasattr(model, "__dict__") else []
    out: dict[str, torch.nn.Module] = {}
    seen: set[int] = set()
    for name, value in items:
        if isinstance(value, torch.nn.Module) and id(value) not in seen:
            seen.add(id(value))
            out[name] = value
    return out


def parameter_names(modules: dict[str, torch.nn.Module], params: list[torch.nn.Parameter]) -> list[str]:
    """Stable names for the trained parameters ("unet.conv_in.weight"); a parameter owned by none of the
    modules is named by its position."""
    by_id: dict[int, str] = {}
    for mname, module in modules.items():
        for pname, p in module.named_parameters():
            by_id.setdefault(id(p), f"{mname}.{pname}")
    return [by_id.get(id(p), f"param.{i}") for i, p in enumerate(params)]


def _enable_tf32() -> None:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _enable_gradient_checkpointing(name: str, module: torch.nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers ModelMixin
        module.enable_gradient_checkpointing()
    elif hasattr(module, "gradient_checkpointing_enable"):  # transformers PreTrainedModel
        module.gradient_checkpointing_enable()
    else:
        logger.warning("gradient_checkpointing: %s (%s) has no checkpointing switch; it runs without",
                       name, type(module).__name__)


def _enable_xformers(modules: dict[str, torch.nn.Module]) -> None:
    if importlib.util.find_spec("xformers") is None:
        raise ImportError("enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                          "(or drop the flag: PyTorch's scaled_dot_product_attention is the default)")
    for module in modules.values():
        if hasattr(module, "enable_xformers_memory_efficient_attention"):
            module.enable_xformers_memory_efficient_attention()


def _compile(module: torch.nn.Module, device: torch.device, mode: str = "default") -> None:
    """Compile in place (nn.Module.compile), so the object, its state_dict keys and any peft adapters stay as
    they are. On CPU the graph is captured with the 'eager' backend: it checks the module traces without
    needing a C++ toolchain or minutes of kernel generation. On CUDA `mode` picks inductor's mode
    ("reduce-overhead" records CUDA graphs)."""
    if device.type == "cuda":
        module.compile(backend="inductor", mode=mode)
    else:
        module.compile(backend="eager")


def _records_cuda_graphs(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the compiled modules will run as CUDA graphs (torch.compile's "reduce-overhead" and "max-autotune"
    modes on a GPU); refuses the one setting they break."""
    if not (cfg.compile and device.type == "cuda" and cfg.compile_mode in CUDA_GRAPH_MODES):
        return False
    if cfg.gradient_accumulation_steps > 1:
        # The first micro-batch's gradient lives in the graphs' memory pool and the next replay overwrites it
        # (pytorch/pytorch#169545): the accumulated gradient would be silently wrong.
        raise ValueError(f"compile_mode={cfg.compile_mode} records CUDA graphs, which do not survive gradient "
                         f"accumulation (gradient_accumulation_steps={cfg.gradient_accumulation_steps}): use "
                         "gradient_accumulation_steps 1 with a larger train_batch_size, or compile_mode default")
    return True


def _average_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    """Mean of every trained gradient over processes (what DDP computes). A parameter without a gradient on
    every process keeps none, as in a single-process run."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=accelerator.device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    active = [p for p, h in zip(params, has_grad.tolist()) if h]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for p in active:
        per_kind = buckets.setdefault((p.grad.dtype, p.grad.device), [[]])
        if sum(g.numel() for g in per_kind[-1]) + p.grad.numel() > _ALLREDUCE_BUCKET_NUMEL and per_kind[-1]:
            per_kind.append([])
        per_kind[-1].append(p.grad)
    for per_kind in buckets.values():
        for grads in per_kind:
            flat = torch._utils._flatten_dense_tensors(grads)  # (sum of numels,)
            dist.all_reduce(flat)
            flat /= accelerator.num_processes
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)


def _broadcast_parameters(params: list[torch.nn.Parameter], accelerator) -> None:
    """Start every process from rank 0's trained weights (random adapter inits may differ per process)."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def _split_loss(out) -> tuple[torch.Tensor, dict]:
    """(loss, extras); extras stay tensors (no host sync here) until the engine logs them."""
    if isinstance(out, dict):
        if "loss" not in out:
            raise KeyError("a method's loss returned a dict without the 'loss' entry")
        extras = {k: v.detach().float() if torch.is_tensor(v) else float(v) for k, v in out.items() if k != "loss"}
        return out["loss"], extras
    return out, {}


def _reset_accelerate_state_if_needed(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state; a second `train` in the same process (tests, notebooks) with
    another precision would be refused, so the precision-dependent part is reset (the process group is kept)."""
    from accelerate.state import AcceleratorState, GradientState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def train(method, model, dataset, cfg: TrainConfig) -> TrainResult:
    """Train `model` with `method` on `dataset` as configured by `cfg` (see the module docstring). With
    cfg.use_ema the trained parameters end holding the EMA weights, which are also what is saved."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, send_to_device, set_seed
    from tqdm.auto import tqdm

    hooks = check_method(method)  # every hook there and callable as the engine calls it, before anything is built
    output_dir = Path(cfg.output_dir)
    # Refuse what the output folder and the resume cannot do before anything is built or written (the recipes call
    # it once more before they load the model).
    ckpt.check_run_folder(cfg)
    _reset_accelerate_state_if_needed(cfg.mixed_precision)
    trackers = resolve_trackers(cfg.report_to)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The schedule is stepped here once per optimizer step; accelerate would otherwise step it once per process.
        step_scheduler_with_optimizer=False,
    )
    device = accelerator.device
    cudagraph_steps = _records_cuda_graphs(cfg, device)
    # Different noise on every process (seed + rank), the same data order everywhere (the sampler's own seed).
    set_seed(cfg.seed, device_specific=True)
    if cfg.allow_tf32:
        _enable_tf32()

    modules = find_modules(model)
    was_training = {name: m.training for name, m in modules.items()}
    groups = param_groups(hooks.trainable_parameters(model, cfg), cfg.learning_rate)
    if cfg.scale_lr:
        factor = cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
        for g in groups:
            g["lr"] *= factor
    params = [p for g in groups for p in g["params"]]
    if cfg.mixed_precision == "fp16" and any(p.dtype == torch.float16 for p in params):
        raise ValueError("mixed_precision=fp16 needs float32 trained parameters (the grad scaler cannot unscale "
                         "fp16 gradients): cast only frozen weights to fp16, or train in bf16")
    cfg.check_runtime()  # fp16 without a GPU, 8-bit Adam / xformers not installed (parse_config checked it first)
    trained_ids = {id(p) for p in params}
    for m in modules.values():
        m.to(device)
    for p in params:
        if p.device != device:  # a parameter held outside the model's modules
            p.data = p.data.to(device)
        p.requires_grad_(True)
    names = parameter_names(modules, params)
    trained = {n: m for n, m in modules.items() if any(id(p) in trained_ids for p in m.parameters())}
    for name, m in modules.items():
        m.train(name in trained)
    if cfg.gradient_checkpointing:
        for name, m in trained.items():
            _enable_gradient_checkpointing(name, m)
    if cfg.enable_xformers_memory_efficient_attention:
        _enable_xformers(modules)

    if hooks.prepare is not None:
        prepared = hooks.prepare(model, dataset, cfg, accelerator)
        dataset = dataset if prepared is None else prepared
    _broadcast_parameters(params, accelerator)
    if cfg.compile:
        for m in trained.values():
            _compile(m, device, cfg.compile_mode)

    optimizer = build_optimizer(groups, cfg, device)
    lr_scheduler = build_lr_scheduler(optimizer, cfg)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    ema = EMA(params, cfg.ema_decay) if cfg.use_ema else None

    sampler = EpochBatchSampler(len(dataset), cfg.train_batch_size, cfg.seed,
                                accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        collate_fn=hooks.collate or default_collate,
        num_workers=cfg.dataloader_num_workers,
        # The sampler runs in this process, so workers kept across epochs still see each epoch's new order.
        persistent_workers=cfg.dataloader_num_workers > 0,
        pin_memory=device.type == "cuda",
        # Worker seeds come from this generator, not the global RNG that the loss draws noise from.
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    if accelerator.is_main_process:
        if cfg.overwrite_output_dir:
            removed = ckpt.remove_checkpoints(output_dir)
            if removed:
                logger.warning("overwrite_output_dir: removed the checkpoints of the earlier run in %s (%s)",
                               output_dir, ", ".join(p.name for p in removed))
        ckpt.remove_partial(output_dir)
    accelerator.wait_for_everyone()
    global_step, losses = 0, []
    # Again, now that leftovers of killed writes are cleaned up (a checkpoint moved aside may be back).
    resume = ckpt.check_run_folder(cfg)
    if resume is not None:
        # Last thing before the loop: it restores the RNG streams, and nothing may draw from them in between.
        tensors, ema_tensors, state = ckpt.load_checkpoint(accelerator, resume, use_ema=ema is not None,
                                                           shapes={n: tuple(p.shape) for n, p in zip(names, params)})
        with torch.no_grad():
            for name, p in zip(names, params):
                p.copy_(tensors[name])
        if ema is not None:
            ema.load_state_tensors(ema_tensors, names, state["ema_updates"])
        global_step, losses = state["global_step"], list(state["losses"])
        method_state = ckpt.load_method_state(resume)
        if hooks.has_state:
            if method_state is None:
                raise TrainingError(f"{resume} holds no method state ({METHOD_STATE_FILE}), which this method "
                                    f"({method_name(method)}) keeps with its checkpoints: it was written by another "
                                    "method or an older version; resume with what wrote it, or start over with "
                                    "--overwrite_output_dir")
            hooks.load_state_dict(method_state)  # draws no random numbers (the protocol): the RNGs are restored
        elif method_state is not None:
            raise TrainingError(f"{resume} holds method state ({METHOD_STATE_FILE}) that this method "
                                f"({method_name(method)}) cannot take back (it has no load_state_dict): it was "
                                "written by another method; resume with that one, or start over with "
                                "--overwrite_output_dir")
        geometry = (accelerator.num_processes, cfg.train_batch_size, cfg.gradient_accumulation_steps)
        if tuple(state["geometry"]) != geometry:
            logger.warning("resuming %s with (processes, batch, accumulation) = %s instead of %s: the data order "
                           "will not match an uninterrupted run", resume, geometry, tuple(state["geometry"]))
        logger.info("resumed from %s at step %d", resume, global_step)

    if trackers:
        accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config(cfg))

    result = TrainResult(global_step=global_step, losses=losses, output_dir=str(output_dir),
                         resumed_from=str(resume) if resume is not None else None)

    def validate(step: int) -> None:
        if hooks.validate is None:
            return
        if accelerator.is_main_process:
            for m in trained.values():
                m.eval()
            with seeded_rng(cuda=True), torch.no_grad(), (ema.swapped_in() if ema else contextlib.nullcontext()):
                out = hooks.validate(model, cfg, step)
            for m in trained.values():
                m.train()
            images, scalars = (out.get("images") or [], out.get("logs") or {}) if isinstance(out, dict) else (out, {})
            if images:
                result.validation_images.append(str(record_validation(accelerator, list(images), step, output_dir)))
            if scalars:
                scalars = {k: float(v) for k, v in scalars.items()}
                accelerator.log(scalars, step=step)
                result.validation_logs.append({"step": step, **scalars})
                record_validation_scores(scalars, step, output_dir)
        accelerator.wait_for_everyone()

    def last_good() -> str:
        """The diverged run's last checkpoint (each one is checked finite before it is written), if any."""
        last = result.checkpoints[-1] if result.checkpoints else result.resumed_from
        if last is None:
            return "no checkpoint of this run was written before"
        return f"the last finite checkpoint is {last}"

    def check_finite(step: int) -> None:
        """Refuse to publish non-finite weights (a checkpoint or the final save): a diverged run stops here."""
        tensors = list(zip(names, params)) + (list(zip(names, ema.shadow)) if ema is not None else [])
        finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors]).cpu()
        if not bool(finite.all()):
            bad = [n for (n, _), ok in zip(tensors, finite.tolist()) if not ok]
            raise FloatingPointError(
                f"the trained weights are not finite after step {step} (nan or inf in {len(bad)} tensors, e.g. "
                f"{bad[0]}): the run diverged and nothing was saved for this step; {last_good()}. Start over with "
                "a lower learning_rate, max_grad_norm above 0, or bf16 instead of fp16"
            )

    def save_checkpoint(step: int) -> None:
        check_finite(step)
        state = {
            "global_step": step,
            "losses": losses,
            "ema_updates": ema.num_updates if ema else 0,
            "geometry": [accelerator.num_processes, cfg.train_batch_size, cfg.gradient_accumulation_steps],
            "seed": cfg.seed,
            "settings": ckpt.run_settings(cfg),
        }
        path = ckpt.save_checkpoint(
            accelerator, output_dir, step,
            trainable={n: p.detach() for n, p in zip(names, params)},
            ema=ema.state_tensors(names) if ema else None,
            state=state, total_limit=cfg.checkpoints_total_limit,
            method_state=hooks.state_dict() if hooks.has_state else None,
        )
        result.checkpoints.append(str(path))

    ga = cfg.gradient_accumulation_steps
    micro = global_step * ga
    epoch, skip = divmod(micro, sampler.batches_per_epoch)
    progress = tqdm(total=cfg.max_train_steps, initial=global_step, desc="steps",
                    disable=not (cfg.progress and accelerator.is_local_main_process))
    window_loss = torch.zeros((), device=device)
    window_extras: dict = {}
    pending: list[tuple] = []

    def flush_logs() -> None:
        for step, loss_t, lr, extras, grad_norm in pending:
            step_loss = float(loss_t)
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"loss is {step_loss} at step {step}: lower learning_rate, use bf16 instead of fp16, "
                    f"or check the data ({last_good()})"
                )
            logs = {"loss": step_loss, "lr": lr, **{k: float(v) for k, v in extras.items()}}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            losses.append(step_loss)
            result.logs.append(logs)
            accelerator.log(logs, step=step)
        if pending:
            progress.update(len(pending))
            progress.set_postfix(loss=f"{losses[-1]:.4g}", lr=f"{result.logs[-1]['lr']:.3g}", refresh=False)
        pending.clear()

    while global_step < cfg.max_train_steps:
        sampler.set_epoch(epoch, skip=skip)
        for batch in loader:
            batch = send_to_device(batch, device, non_blocking=True)
            if cudagraph_steps:
                # A new step of the recorded CUDA graphs: the previous step's outputs may be overwritten from here.
                torch.compiler.cudagraph_mark_step_begin()
            with accelerator.autocast():
                loss, extras = _split_loss(hooks.loss(model, batch, cfg))
            # Each micro-batch loss is a mean over its examples; dividing by the accumulation count makes the
            # summed gradient that of the mean over the whole accumulated batch.
            accelerator.backward(loss / ga)
            window_loss += loss.detach().float()
            for k, v in extras.items():
                window_extras[k] = window_extras.get(k, 0.0) + v / ga
            micro += 1
            if micro % ga:
                continue

            _average_gradients(params, accelerator)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            optimizer.step()
            if not optimizer.step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if hooks.after_step is not None:
                hooks.after_step(model, cfg, global_step)
            if ema is not None:
                ema.step()

            # Kept on the device; read back every logging_steps so a GPU step need not wait for the host.
            pending.append((global_step, accelerator.reduce(window_loss / ga, reduction="mean"),
                            lr_scheduler.get_last_lr()[0], window_extras,
                            grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm))
            window_loss = torch.zeros((), device=device)
            window_extras = {}
            checkpoint_now = cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0
            if (global_step % max(cfg.logging_steps, 1) == 0 or checkpoint_now
                    or global_step >= cfg.max_train_steps):
                flush_logs()

            if checkpoint_now:
                save_checkpoint(global_step)
            if cfg.validation_steps and global_step % cfg.validation_steps == 0:
                validate(global_step)
            if global_step >= cfg.max_train_steps:
                break
        epoch, skip = epoch + 1, 0
    progress.close()

    accelerator.wait_for_everyone()
    if cfg.validation_steps and global_step % cfg.validation_steps != 0:
        validate(global_step)
    check_finite(global_step)
    if ema is not None:
        # The run's result is the averaged weights, in memory as in the saved files: a caller that goes on with
        # `model` (an experiment scoring it, a pipeline built on it) uses what was published.
        ema.copy_to()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        hooks.save(model, cfg, str(output_dir))
        card = hooks.model_card(cfg) if hooks.model_card is not None else None
        if card is not None:
            write_model_card(card, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    for name, m in modules.items():
        m.train(was_training[name])
    result.global_step = global_step
    return result
