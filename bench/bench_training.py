"""LCD training throughput: the toolkit's design vs. a faithful re-statement of the reference recipe, side by side.

(a) toolkit: the objects ``stepdistill.training.loop.train`` builds (accelerate ``Accelerator``, ``LCDObjective`` with
    its latent/text cache, ``add_lora_to_unet`` on the pipeline's UNet, AdamW over the LoRA parameters,
    ``accelerator.prepare``), and the body of its loop: ``objective.loss`` (cached latents + embeddings; the teacher
    is the same UNet with the adapter disabled; cond + uncond batched into one forward) + ``accelerator.backward``
    + grad clipping + optimizer and LR-scheduler steps.
(b) reference: ``bench.common.ReferenceLCDStep``, diffusers' ``train_lcm_distill_lora_sd_wds.py`` step restated
    (VAE encode and text encoder every step, a separate deep-copied teacher UNet, two teacher passes, student and
    target passes), same LoRA rank/alpha/targets, batch size, optimizer and loss.

Both run in one process on the same model and data, interleaved block by block, so the speed-up is a measured
ratio. Data loading (decoding/resizing images) is excluded from both: the reference gets preprocessed pixel
tensors from memory, the toolkit its in-memory cache. The one-time cache build is timed separately.
Also times reflow training (``stepdistill.methods.reflow``).

    OMP_NUM_THREADS=1 python bench/bench_training.py --model toy --batch-size 32 --repeats 5
"""
from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ReferenceLCDStep, default_model, device_of, finish, interleaved,  # noqa: E402
                    markdown_table, median, spread)


def toolkit_trainer(config, device: torch.device, pipe=None):
    """Build what ``stepdistill.training.loop.train`` builds (on ``pipe`` when given: an fp32 pipeline on ``device``,
    else ``load_pipeline(config.pretrained_model)``); return (step function, cache-build seconds, pipe)."""
    import time

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from stepdistill.methods import build_objective
    from stepdistill.models.pipeline import load_pipeline
    from stepdistill.training.batches import make_dataloader
    from stepdistill.training.loop import setup_adapter_and_optimizer, step_generator, training_step

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device.type == "cpu")
    set_seed(config.seed)
    if pipe is None:
        pipe = load_pipeline(config.pretrained_model, device=str(accelerator.device), dtype=torch.float32)
    unet = pipe.unet
    t0 = time.perf_counter()
    objective = build_objective(config, pipe, accelerator)  # builds the latent/text cache
    cache_seconds = time.perf_counter() - t0
    params, optimizer, lr_scheduler = setup_adapter_and_optimizer(config, unet, accelerator)  # train()'s own setup
    loader = make_dataloader(objective.dataset, config.train_batch_size, config.seed)  # train()'s DataLoader
    wrapped, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    batches = iter(loader)
    wrapped.train()
    state = {"step": 0}

    def step():  # train()'s loop body (gradient_accumulation_steps = 1)
        gen = step_generator(config.seed, state["step"], 0, accelerator.process_index)
        training_step(accelerator, wrapped, objective, optimizer, lr_scheduler, params, config, next(batches), gen)
        state["step"] += 1

    return step, cache_seconds, pipe


def reference_trainer(model: str, config, device: torch.device, n_examples: int, resolution: int, base=None):
    """The reference step (``common.ReferenceLCDStep``) on ``base`` (an fp32 pipeline; default: load ``model``)
    with a pool of preprocessed pixel tensors of the same toy data; returns (step function, the step object)."""
    from stepdistill.data.sources import preprocess, toy_examples
    from stepdistill.models.pipeline import load_pipeline

    if base is None:
        base = load_pipeline(model, device=str(device), dtype=torch.float32)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    ref = ReferenceLCDStep(
        base.vae, base.text_encoder, base.tokenizer, base.unet, dict(base.scheduler.config),
        rank=config.lora_rank, alpha=config.lora_alpha or config.lora_rank, target_modules=config.lora_target_modules,
        learning_rate=config.learning_rate, num_ddim_timesteps=config.num_ddim_timesteps, w_min=config.w_min,
        w_max=config.w_max, loss_type=config.loss_type, huber_c=config.huber_c,
        timestep_scaling=config.timestep_scaling_factor, batch_size=config.train_batch_size, device=device,
        weight_dtype=weight_dtype, autocast_dtype=None if weight_dtype == torch.float32 else weight_dtype,
        max_grad_norm=config.max_grad_norm)
    examples = toy_examples(n_examples, seed=0)  # exactly what the toolkit's cache holds ("toy:N": 64 px)
    pixels = torch.from_numpy(np.stack([preprocess(ex.load_image(), resolution) for ex in examples]))
    captions = [ex.caption for ex in examples]
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)

    def step():
        idx = torch.randint(0, len(examples), (config.train_batch_size,), generator=gen)
        ref.step(pixels[idx], [captions[i] for i in idx.tolist()])

    return step, ref


def component_timers(ref, batch_size: int, resolution: int, device: torch.device) -> dict:
    """No-grad costs of the reference step's parts at batch B: VAE encode, text encoder, one UNet forward."""
    pixels = torch.zeros(batch_size, 3, resolution, resolution, device=device, dtype=ref.weight_dtype)
    ids = ref.tokenizer(["a large red circle in the center on a white background"] * batch_size, padding="max_length",
                        max_length=ref.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
    emb = ref.uncond_prompt_embeds[:batch_size]
    lat_size = resolution // (2 ** (len(ref.vae.config.block_out_channels) - 1))
    lat = torch.zeros(batch_size, ref.teacher_unet.config.in_channels, lat_size, lat_size, device=device,
                      dtype=ref.weight_dtype)
    t = torch.full((batch_size,), 500, device=device)

    @torch.no_grad()
    def vae():
        ref.vae.encode(pixels.to(ref.vae.dtype)).latent_dist.sample()

    @torch.no_grad()
    def text():
        ref.text_encoder(ids)

    @torch.no_grad()
    def unet():
        ref.teacher_unet(lat, t, encoder_hidden_states=emb).sample

    return {"VAE encode": vae, "text encoder": text, "UNet forward": unet}


def reflow_trainer(model: str, device: torch.device, args, work: Path):
    """Reflow training step through the same loop. Without ``--reflow-couplings`` a small coupling set is generated
    first (timed separately, one-time cost). Returns (step function, None, notes): the same shape as when a path
    is skipped."""
    import time

    from stepdistill.training.config import load_config

    notes = []
    couplings = args.reflow_couplings
    if couplings is None:
        from stepdistill.methods.reflow_couplings import generate_couplings
        from stepdistill.models.pipeline import load_pipeline
        from stepdistill.toy.world import evaluation_prompts

        couplings = str(work / "couplings")
        pipe = load_pipeline(model, device=str(device), dtype=torch.float32)
        t0 = time.perf_counter()
        generate_couplings(pipe, evaluation_prompts(args.reflow_pairs, seed=0), couplings, num_steps=8,
                           num_windows=args.reflow_windows, model_id=model, progress=False)
        notes.append(f"reflow couplings: {args.reflow_pairs} teacher ODE solves (8 DDIM steps, CFG 5, "
                     f"{args.reflow_windows} windows) generated here in {time.perf_counter() - t0:.2f} s (one-time)")
        del pipe
    config = load_config(None, **_config_kwargs(args, model, work / "reflow", method="reflow",
                                                 couplings_dir=couplings, reflow_windows=args.reflow_windows))
    step, _, _ = toolkit_trainer(config, device)
    step()
    return step, None, notes


def _config_kwargs(args, model, out: Path, **extra) -> dict:
    kw = dict(method="lcd", pretrained_model=model, output_dir=str(out), train_data=f"toy:{args.examples}",
              cache_dir=str(out / "cache"), lora_rank=args.rank, train_batch_size=args.batch_size,
              max_train_steps=10_000, report_to="none", validation_steps=0, checkpointing_steps=0,
              mixed_precision=args.mixed_precision, learning_rate=1e-4, w_min=5.0, w_max=15.0, loss_type="huber")
    kw.update({k: v for k, v in extra.items() if v is not None})
    return kw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'toy' (default, once committed) or a diffusers pipeline dir")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--examples", type=int, default=512, help="training examples (toy:N) in the cache / pixel pool")
    p.add_argument("--steps-per-block", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per path (interleaved)")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: no on CPU, bf16 on CUDA (both paths alike)")
    p.add_argument("--reflow-couplings", default=None, help="couplings dir for reflow (default: generate a small set)")
    p.add_argument("--reflow-pairs", type=int, default=64, help="couplings to generate when none are given")
    p.add_argument("--reflow-windows", type=int, default=4, help="PeRFlow windows of the reflow run")
    p.add_argument("--device", default=None)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    device = device_of(args.device)
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if device.type == "cuda" else "no"
    model = args.model or default_model()

    from stepdistill.training.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    config = load_config(None, **_config_kwargs(args, model, work / "lcd"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    toolkit_step, cache_seconds, pipe = toolkit_trainer(config, device)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ref_step, ref = reference_trainer(model, config, device, args.examples, resolution)
    components = component_timers(ref, config.train_batch_size, resolution, device)
    fns = {"toolkit": lambda: [toolkit_step() for _ in range(args.steps_per_block)],
           "reference": lambda: [ref_step() for _ in range(args.steps_per_block)]}
    reflow_step, reflow_skip, reflow_notes = reflow_trainer(model, device, args, work)
    if reflow_step is not None:
        fns["toolkit reflow"] = lambda: [reflow_step() for _ in range(args.steps_per_block)]
    times = interleaved({**fns, **components}, args.repeats, device, warmup=1)
    per_step = {k: [t / args.steps_per_block for t in v] for k, v in times.items() if k in fns}
    med = {k: median(v) for k, v in per_step.items()}
    bs = args.batch_size

    peak = {}
    if device.type == "cuda":  # peak memory of each path alone
        for name, fn in fns.items():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30

    rows = []
    for name in fns:
        row = [name, spread(per_step[name]), f"{1 / med[name]:.2f}", f"{bs / med[name]:.1f}",
               f"{med['reference'] / med[name]:.2f}x"]
        if peak:
            row.append(f"{peak[name]:.2f}")
        rows.append(row)
    header = ["path", "step time, median (min-max)", "steps/s", "images/s", "speed vs reference"]
    if peak:
        header.append("peak GiB (path alone)")
    speedup = med["reference"] / med["toolkit"]
    saved = med["reference"] - med["toolkit"]
    breakeven = f"the time the reference loses in {cache_seconds / saved:.0f} steps" if saved > 0 else \
        "not recovered in this run (the toolkit step was not faster)"
    body = [f"Model `{model}` ({resolution}px), LCD, batch {bs}, LoRA rank {args.rank} on the 14 LCM-LoRA target types, "
            f"mixed precision `{args.mixed_precision}`, {args.repeats} interleaved blocks of {args.steps_per_block} "
            f"steps per path after 1 warm-up block.", ""]
    body += markdown_table(header, rows)
    body += ["", f"- **toolkit / reference training throughput: {speedup:.2f}x** (ratio of median step times, same run)",
             f"- one-time cache build for {args.examples} examples (VAE + text encoder once): {cache_seconds:.2f} s "
             f"= {breakeven}",
             "- UNet calls per step: toolkit 3 (student B, teacher 2B batched with the adapter disabled, target B); "
             "reference 4 (student B, teacher B cond, teacher B uncond on a separate copy, target B) + VAE encode B "
             "+ text encoder B",
             "- the ratio depends on what a VAE encode and a text-encoder pass cost next to a UNet pass, which differs "
             "between the toy model and SD 1.5 (bench_gpu.py measures the SD-1.5-sized case). Components, same run "
             "(no grad, batch %d): " % bs + "; ".join(f"{k} {spread(v)}" for k, v in times.items() if k in components)]
    body += [f"- {n}" for n in reflow_notes]
    if reflow_skip:
        body.append(f"- reflow: skipped ({reflow_skip})")
    else:
        body.append("- toolkit reflow: one student forward + backward per step on couplings (no teacher in the loop); "
                    "its 'speed vs reference' compares with the LCD reference step")
    if device.type == "cpu":
        body.append("- CPU run: only the ratios are meaningful (shared machine); absolute times are indicative")
    print("\n".join(body))
    finish("bench_training: LCD training throughput, toolkit vs reference recipe", device, body,
           append=not args.no_append)


if __name__ == "__main__":
    main()
