"""The training loop: one loop for both methods (LCD and reflow), on accelerate.

A step draws a batch from the objective's dataset (rows of the precomputed cache or of the couplings: no VAE
encoder or text encoder in the loop) through a DataLoader prepared by accelerate, asks the method's objective for a
loss on it, and updates only the LoRA parameters. With ``data_mode: streaming`` the dataset is an iterable of images
and captions that splits itself over processes and workers (:mod:`stepdistill.data.streaming`): its DataLoader is
not prepared (batches are moved to the device here), the objective runs the VAE and text encoder on each batch, and
each checkpoint records every process's stream positions (:class:`~stepdistill.data.streaming.StreamState`). The same loop runs under DDP, FSDP and DeepSpeed: every process
calls ``save_state``, the adapter is read with ``accelerator.get_state_dict`` (gathered from shards where an engine
shards it), the logged loss is the mean over processes, and the process-group timeout is a config key
(``process_group_timeout_minutes``). The teacher is the same
UNet with its adapter disabled (peft), so a LoRA run holds one copy of the base model. The LoRA sits on
the pipeline's denoiser: its ``unet`` (SD 1.x/2.x/SDXL; LCD or reflow) or, for flow-matching pipelines
(SD3, FLUX.1; reflow only), its ``transformer`` -- the loop is the same, only the targets, the objective's
model call and the output layout differ (see :func:`stepdistill.lora.save_trained_adapter`). The batches
come from a seeded index stream and the rest of a step's randomness from a generator seeded by (seed, step,
micro-step, process) (:mod:`.batches`), so a resumed run replays exactly the batches, noise and timesteps an
uninterrupted one would have used.
Checkpoints (LoRA weights, optimizer, LR scheduler, RNG states) are written to a temporary directory
and renamed into place, so a crash never leaves a half-written checkpoint behind (:mod:`.checkpoints`).

Nothing is written before the checks pass (:mod:`.preflight`): a fresh run refuses an output directory that
holds another run unless ``overwrite``; ``train_config.json`` is written once the model, data and adapter are
ready. A non-finite loss, or non-finite adapter weights at a checkpoint or at the end, stops the run with
:class:`~stepdistill.errors.TrainingDiverged`: no checkpoint or adapter is written from a diverged state, and
the last good checkpoint stays.
"""
from __future__ import annotations

import contextlib
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
    send_to_device,
    set_seed,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm
from transformers.integrations import unset_hf_deepspeed_config

from .. import lora
from ..atomic import atomic_write_text
from ..data.streaming import StreamState
from ..engines import deepspeed_zero_stage
from ..errors import CheckpointError, StepdistillError, TrainingDiverged
from ..methods import build_objective
from ..models.family import (
    LCM_LORA_TARGET_MODULES,
    default_target_modules,
    denoiser_of,
    family_of,
)
from .batches import make_dataloader, next_batch, step_generator, step_global_seed, stream_position
from .checkpoints import (
    LORA_STATE,
    adapter_settings,
    check_adapter_settings,
    check_checkpoint,
    check_state_shapes,
    list_checkpoints,
    new_run_id,
    read_record,
    resume_candidates,
    save_checkpoint,
    warn_fallback,
)
from .config import TrainConfig
from .ema import AdapterEMA, check_ema_engine
from .heldout import heldout_loss
from .preflight import (
    check_mixed_precision,
    check_model_source,
    check_output_dir,
    clear_previous_run,
    load_model,
)


class TrainingInterrupted(RuntimeError):
    """Raised by the ``interrupt_after`` test hook to simulate a crash."""


__all__ = ["TrainingInterrupted", "list_checkpoints", "setup_adapter_and_optimizer", "step_generator", "train",
           "training_step"]


def lora_target_modules(config: TrainConfig, model) -> list[str]:
    """``config.lora_target_modules``; its default (LCM-LoRA's UNet list) means the model's own default
    (:func:`stepdistill.models.family.default_target_modules`: the SD3 / FLUX lists for those transformers)."""
    targets = list(config.lora_target_modules)
    return default_target_modules(model) if targets == LCM_LORA_TARGET_MODULES else targets


def setup_adapter_and_optimizer(config: TrainConfig, denoiser, accelerator):
    """The trainable side of :func:`train`: a LoRA on the frozen ``denoiser`` (optionally started from
    ``config.init_lora``), LoRA parameters kept in fp32 under fp16/bf16, gradient checkpointing, AdamW (8-bit with
    bitsandbytes) and the LR schedule. Returns ``(params, optimizer, lr_scheduler)``; ``bench/bench_training.py``
    builds its timed step with it too."""
    denoiser.requires_grad_(False)
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    lora.add_lora_to_unet(denoiser, rank=config.lora_rank, alpha=alpha,
                          target_modules=lora_target_modules(config, denoiser), dropout=config.lora_dropout)
    if config.init_lora:  # continue from an earlier adapter (e.g. InstaFlow's 2nd stage from the reflow LoRA)
        n = lora.init_adapter_from_file(denoiser, config.init_lora)
        accelerator.print(f"adapter initialised from {config.init_lora} ({n} layers)")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    if weight_dtype != torch.float32:
        denoiser.to(weight_dtype)
        cast_training_params(denoiser, dtype=torch.float32)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional: 8-bit AdamW only
        except ImportError as e:
            raise ImportError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                              weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)
    return params, optimizer, lr_scheduler


def training_step(accelerator, wrapped, objective, optimizer, lr_scheduler, params, config: TrainConfig, batch, gen):
    """One micro-batch of :func:`train`'s loop: the objective's loss on ``batch`` (a collated batch of its dataset,
    on the device), backward, and (at the end of an accumulation cycle) clipping, optimizer and LR-schedule steps.
    Returns ``(loss, logs)``."""
    with accelerator.accumulate(wrapped):
        loss, logs = objective.loss(wrapped, accelerator.unwrap_model(wrapped), batch, gen)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, logs


def train(config: TrainConfig, interrupt_after: int | None = None) -> Path:
    """Run the distillation described by ``config``; returns the directory holding the LoRA."""
    output_dir = Path(config.output_dir)
    check_output_dir(config)  # refuse before anything is loaded or written
    check_model_source(config.pretrained_model)
    timeout = timedelta(minutes=config.process_group_timeout_minutes)
    cpu = use_cpu()
    # the first PartialState starts the process group (under torchrun / accelerate launch): with the timeout
    check_mixed_precision(config, PartialState(cpu=cpu, timeout=timeout).device)
    candidates = resume_candidates(config) if config.resume_from_checkpoint else []
    log_with = config.report_to if config.report_to not in (None, "none") else None
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
        cpu=cpu,
    )

    set_seed(config.seed)  # the LoRA initialisation draws from the global RNG
    with zero3_init_disabled(accelerator):  # the frozen text encoder / VAE stay whole (used outside the engine)
        pipe = load_model(config.pretrained_model, device=str(accelerator.device), dtype=torch.float32)
    denoiser = denoiser_of(pipe)  # the UNet, or the SD3 / FLUX transformer: the LoRA goes here
    family = family_of(pipe)
    objective = build_objective(config, pipe, accelerator)  # also builds/loads the data cache
    streaming = isinstance(objective.dataset, IterableDataset)  # data_mode: streaming (VAE/text encoder per step)
    if not config.validation_prompts and not streaming:  # the cache/couplings exist: only the denoiser trains
        offload_unused_components(pipe, denoiser)
    params, optimizer, lr_scheduler = setup_adapter_and_optimizer(config, denoiser, accelerator)
    loader = make_dataloader(objective.dataset, config.train_batch_size, config.seed,
                             getattr(objective, "collate", None), config.dataloader_num_workers)
    if streaming:  # each process reads its own streams: the loader is not sharded again by prepare()
        set_deepspeed_micro_batch(accelerator, config.train_batch_size)
        wrapped, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
        stream_state = StreamState(accelerator.num_processes, objective.dataset.local_streams,
                                   accelerator.process_index)
    else:
        sampler = loader.sampler  # the IndexStream; prepare() keeps this object (its start is set on resume)
        wrapped, optimizer, loader, lr_scheduler = accelerator.prepare(denoiser, optimizer, loader, lr_scheduler)
    params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP2 replaces them with sharded ones
    getattr(objective, "after_prepare", lambda: None)()  # e.g. an optimizer over the parameters as sharded
    ema = None  # ema_decay: the adapter's moving average (.ema); what the run writes at its end
    if config.ema_decay:
        check_ema_engine(accelerator)
        ema = AdapterEMA([(n, p) for n, p in accelerator.unwrap_model(wrapped).named_parameters() if p.requires_grad],
                         config.ema_decay)
    for extra in getattr(objective, "checkpoint_objects", list)():  # objective state (e.g. a discriminator)
        accelerator.register_for_checkpointing(extra)  # saved in each checkpoint and resumed with it
    if streaming:
        accelerator.register_for_checkpointing(stream_state)  # where every stream of every process stands

    def save_hook(models, weights, path):  # on every process: get_state_dict gathers sharded weights (collective)
        sd = lora_state_dict(accelerator, wrapped)
        if accelerator.is_main_process:
            save_file(sd, os.path.join(path, LORA_STATE))
            if ema is not None:
                ema.save(path)
        while weights:  # DDP / one process: accelerate would save the whole denoiser; the LoRA file is enough
            weights.pop()

    def load_hook(models, path):
        if not models:  # FSDP / DeepSpeed restore the (sharded) model themselves from the checkpoint
            return
        state = load_file(os.path.join(path, LORA_STATE))
        raw = accelerator.unwrap_model(wrapped)
        check_state_shapes(Path(path), state, get_peft_model_state_dict(raw))
        set_peft_model_state_dict(raw, state)
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, run_id = 0, new_run_id()
    if candidates:
        resume, global_step = resume_from(accelerator, config, candidates)
        if ema is not None:
            ema.load(resume)
        run_id = read_record(resume).get("run_id") or run_id
        accelerator.print(f"resumed from {resume} at step {global_step}")
    if accelerator.is_main_process:  # the checks passed and everything loaded: now the run's records
        if config.overwrite and not candidates:
            gone = clear_previous_run(output_dir)
            if gone:
                accelerator.print(f"--overwrite: removed the previous run's {', '.join(gone[:4])}"
                                  + (" ..." if len(gone) > 4 else ""))
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "train_config.json", json.dumps(config.__dict__, indent=1, default=str))
    if log_with:
        accelerator.init_trackers("stepdistill", config={k: str(v) for k, v in config.__dict__.items()})

    settings = adapter_settings(config)
    if streaming:  # each stream from its next unread sample; workers rotated to continue the round-robin
        objective.dataset.start = stream_state.start_of(accelerator.process_index)
        objective.dataset.rotation = global_step * config.gradient_accumulation_steps % objective.dataset.local_streams
    else:
        sampler.start = stream_position(global_step, config.gradient_accumulation_steps, accelerator.num_processes,
                                        config.train_batch_size)
    batches = iter(loader)
    last_heldout = None  # the last held-out loss measured (validation_couplings_dir): it goes into the card
    measure_heldout = getattr(objective, "heldout", None) is not None
    bar = tqdm(range(config.max_train_steps), initial=global_step, desc=f"{config.method} distillation",
               disable=not accelerator.is_local_main_process)
    wrapped.train()
    with bar:  # closed (its line ended) on an error too, so a message starts on a line of its own
        while global_step < config.max_train_steps:
            losses = []
            for micro in range(config.gradient_accumulation_steps):
                gen = step_generator(config.seed, global_step, micro, accelerator.process_index)
                batch = next_batch(batches)  # (a DataLoader's first batch draws its base seed from the global RNG)
                torch.manual_seed(step_global_seed(config.seed, global_step, micro, accelerator.process_index))
                if streaming:
                    stream_state.consumed(batch["stream_position"])
                    batch = send_to_device(batch, accelerator.device)
                loss, logs = training_step(accelerator, wrapped, objective, optimizer, lr_scheduler, params, config,
                                           batch, gen)
                check_finite_loss(accelerator, loss, global_step + 1, config)
                losses.append(loss.detach().float())
            global_step += 1
            if ema is not None:
                ema.update()
            mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")  # over processes
            logs = {"loss": mean_loss.item(), "lr": lr_scheduler.get_last_lr()[0], **logs}
            if measure_heldout and (global_step == config.max_train_steps or (
                    config.validation_steps and global_step % config.validation_steps == 0)):
                with adapter_as_written(ema, wrapped):
                    logs["heldout_loss"] = last_heldout = heldout_loss(accelerator, wrapped, objective, config)
                if accelerator.is_local_main_process:
                    bar.write(f"step {global_step}: held-out loss {logs['heldout_loss']:.4g} (training loss "
                              f"{logs['loss']:.4g})")
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4g}")
            if log_with:
                accelerator.log(logs, step=global_step)
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                check_finite_weights(params, global_step, config)
                if streaming:
                    stream_state.gather(accelerator)  # every process's stream positions into the checkpoint
                save_checkpoint(accelerator, output_dir, global_step, config.checkpoints_total_limit, run_id, settings)
            if (accelerator.is_main_process and config.validation_steps and config.validation_prompts
                    and global_step % config.validation_steps == 0):
                with adapter_as_written(ema, wrapped):
                    objective.validate(pipe, accelerator, global_step)
            if interrupt_after is not None and global_step >= interrupt_after:
                raise TrainingInterrupted(f"interrupted after step {global_step} (test hook)")

    if ema is not None:
        ema.copy_to_params()  # the adapter written is the average
    check_finite_weights(params, global_step, config)
    accelerator.wait_for_everyone()
    state = lora_state_dict(accelerator, wrapped)  # every process: gathered from shards under FSDP / DeepSpeed
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(wrapped)
        metadata = {**objective.card(config), "num_processes": accelerator.num_processes,
                    "distributed_type": str(accelerator.distributed_type).rsplit(".", 1)[-1]}
        if ema is not None:
            metadata["ema_decay"] = config.ema_decay
        if last_heldout is not None:  # a run resumed at its end measured none
            metadata["heldout_loss"] = round(last_heldout, 6)
        header = {f"stepdistill.{k}": str(v) for k, v in metadata.items()}
        tag = family.base_model_tag(raw)
        lora.save_trained_adapter(output_dir, raw, tag, header, metadata["title"], state=state)
        if config.save_diffusers_format:
            lora.save_trained_adapter(output_dir / "diffusers", raw, tag, header, metadata["title"], format="diffusers",
                                      state=state)
        atomic_write_text(output_dir / "stepdistill_card.json", json.dumps(metadata, indent=1))
        layout = "transformer.* layout" if family.is_flow else "kohya layout"
        atomic_write_text(output_dir / "README.md", model_card_markdown(metadata, layout))
        if config.validation_prompts:
            wrapped.eval()  # no lora_dropout in the images
            objective.validate(pipe, accelerator, global_step)
    accelerator.wait_for_everyone()  # no process starts anything else while the main one is still writing
    accelerator.end_training()
    return output_dir


@contextlib.contextmanager
def adapter_as_written(ema, model):
    """Within the block ``model`` holds the adapter the run will write -- the moving average (``ema``), if any --
    in evaluation mode (no ``lora_dropout`` in a measurement or an image); the trained weights and training mode
    come back after it."""
    with ema.swapped_in() if ema is not None else contextlib.nullcontext():
        model.eval()
        try:
            yield
        finally:
            model.train()


@contextlib.contextmanager
def zero3_init_disabled(accelerator):
    """Under DeepSpeed ZeRO-3, transformers partitions a model as it loads (``zero.Init``) whenever accelerate has
    registered the DeepSpeed config with it, which accelerate 1.15 does for every ZeRO-3 run, ``zero3_init_flag:
    false`` included. The text encoders and the VAE run outside the DeepSpeed engine (caching, streaming,
    validation), so they must load whole: the registration is lifted while the pipeline loads. The denoiser is
    partitioned when ``accelerator.prepare`` hands it to the engine."""
    if deepspeed_zero_stage(accelerator) != 3:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def use_cpu() -> bool:
    """Train on the CPU: ``ACCELERATE_USE_CPU`` (as ``accelerate launch --cpu`` sets it), or several processes
    (``WORLD_SIZE`` > 1: torchrun) on a machine without CUDA -- a plain ``PartialState()`` would leave them unaware of
    each other (distributed type NO), each training alone and writing the same files; with ``cpu`` they form a gloo
    group (MULTI_CPU)."""
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def lora_state_dict(accelerator, wrapped) -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft names, fp32, CPU) from ``accelerator.get_state_dict`` -- a full state dict gathered
    from the shards under FSDP / DeepSpeed ZeRO-3, so call it on every process; processes other than the main one
    may get an empty dict there."""
    full = accelerator.get_state_dict(wrapped)
    if not full:
        return {}
    sd = get_peft_model_state_dict(accelerator.unwrap_model(wrapped), state_dict=full)
    return {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}


def set_deepspeed_micro_batch(accelerator, batch_size: int):
    """DeepSpeed takes its micro-batch size from the prepared DataLoader; a streaming run prepares none, so set it."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


def offload_unused_components(pipe, denoiser):
    """Move the pipeline's other modules (VAE, text encoders) to the CPU: once the cache or couplings exist the
    loop only runs the denoiser."""
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module) and component is not denoiser:
            component.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resume_from(accelerator, config: TrainConfig, candidates: list[Path]) -> tuple[Path, int]:
    """Load the first complete checkpoint of ``candidates`` (newest first for ``latest``); a damaged one is named
    and skipped for the previous one. Returns ``(checkpoint, step)``."""
    for i, checkpoint in enumerate(candidates):
        try:
            step = check_checkpoint(checkpoint)
            check_adapter_settings(checkpoint, config)
            try:
                accelerator.load_state(str(checkpoint))
            except StepdistillError:
                raise  # the adapter does not fit (check_state_shapes): every checkpoint of the run would fail alike
            except (OSError, RuntimeError, ValueError, EOFError, KeyError) as e:
                raise CheckpointError(f"{checkpoint} cannot be loaded ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''})") from e
            return checkpoint, step
        except CheckpointError as e:
            if i + 1 == len(candidates):
                more = "" if i else (" (the only checkpoint)" if config.resume_from_checkpoint == "latest" else "")
                raise CheckpointError(f"{e}{more}; no complete checkpoint to resume from: resume from another "
                                      "checkpoint, or start a fresh run (--overwrite)") from None
            warn_fallback(e, candidates[i + 1])
    raise AssertionError("unreachable")


def _last_good_checkpoint(config: TrainConfig) -> str:
    found = list_checkpoints(config.output_dir)
    return (f"the last good checkpoint is {found[-1]}" if found
            else f"no checkpoint was written before (checkpointing_steps={config.checkpointing_steps})")


def check_finite_loss(accelerator, loss: torch.Tensor, step: int, config: TrainConfig):
    """Stop the run (every process) when the loss is NaN or infinite."""
    value = loss.detach().float()
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item():
        shown = value.item() if value.numel() == 1 else float("nan")
        raise TrainingDiverged(f"the loss is {shown} at step {step} (learning_rate={config.learning_rate:g}); "
                               f"stopped without writing an adapter, {_last_good_checkpoint(config)}: lower "
                               "learning_rate and start again with --overwrite")


def check_finite_weights(params, step: int, config: TrainConfig):
    """Stop the run before a checkpoint or the adapter is written from non-finite LoRA weights."""
    bad = sum(int(not torch.isfinite(p.detach()).all()) for p in params)
    if bad:
        raise TrainingDiverged(f"{bad} of {len(params)} LoRA tensors are not finite at step {step} "
                               f"(learning_rate={config.learning_rate:g}); stopped without writing an adapter, "
                               f"{_last_good_checkpoint(config)}: lower learning_rate and start again with --overwrite")


def model_card_markdown(card: dict, layout: str = "kohya layout") -> str:
    lines = [f"# {card.get('title', 'stepdistill adapter')}", "",
             f"A {card['method_name']} LoRA for `{card['base_model']}`, trained with stepdistill.", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in card.items() if k not in ("title",)]
    module = card.get("scheduler_module", "diffusers")
    kwargs = "".join(f", {k}={v!r}" for k, v in (card.get("scheduler_kwargs") or {}).items())
    lines += ["", "```python", "from diffusers import DiffusionPipeline",
              f"from {module} import {card['scheduler']}",
              f"pipe = DiffusionPipeline.from_pretrained({card['base_model']!r})",
              f"pipe.load_lora_weights('.')  # pytorch_lora_weights.safetensors ({layout})",
              f"pipe.scheduler = {card['scheduler']}.from_config(pipe.scheduler.config{kwargs})",
              (f"image = pipe(prompt, num_inference_steps={card['recommended_steps']}, "
               f"guidance_scale={card['recommended_guidance']}).images[0]"), "```", ""]
    return "\n".join(lines)
