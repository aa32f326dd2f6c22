"""SD-1.5-sized GPU benchmark (CUDA only): LCD training throughput, peak memory and model FLOPs utilization of the
toolkit's training step vs. the reference recipe, and few-step sampling latency, all at 512 px (64x64 latents)
in bf16, on an SD-1.5-shaped pipeline with random weights (nothing is downloaded):

* UNet: ``UNet2DConditionModel`` with SD 1.5's published config (block_out_channels 320/640/1280/1280,
  layers_per_block 2, cross_attention_dim 768, attention_head_dim 8, sample_size 64; ~860M parameters);
  VAE: SD's ``AutoencoderKL`` config (128/256/512/512, scaling 0.18215); text encoder: CLIP ViT-L/14's text tower
  config (12 layers, width 768); the toy CLIP-BPE tokenizer stands in for CLIP's (same algorithm, smaller vocab).
* Training: LoRA rank 64 on the 14 LCM-LoRA target types (``stepdistill.lora.add_lora_to_unet``), batch
  ``--batch-size``. (a) toolkit: the objects ``stepdistill.training.loop.train`` builds (cache of VAE latents and
  text embeddings built once, ``LCDObjective.loss``, one UNet with the adapter toggled, cond + uncond batched),
  bf16 weights with fp32 LoRA parameters; (b) reference: ``bench.common.ReferenceLCDStep`` (diffusers'
  ``train_lcm_distill_lora_sd_wds.py`` restated: VAE + text encoder every step, separate teacher copy cast to bf16,
  two teacher passes, fp32 student under bf16 autocast). Each path is built, timed and measured alone.
* MFU: UNet forward FLOPs at batch B counted with ``torch.utils.flop_counter.FlopCounterMode``; model FLOPs of a
  training step = student forward + backward (counted on a real forward+backward of the LoRA UNet) + teacher
  2 x forward + target forward. Peak = ``--peak-tflops`` (default 989: H100 SXM dense bf16; H100 PCIe: 756).
* Sampling: 4-step LCM (guidance 1, LoRA fused and unfused) vs. 50-step DDIM with CFG 7.5, batch 1 and 8.

    python bench/bench_gpu.py                     # on a CUDA machine; appends to bench/RESULTS.md
    python bench/bench_gpu.py --cpu-smoke         # code-path check on the toy-sized model, appends nothing
"""
from __future__ import annotations

import argparse
import atexit
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, interleaved, markdown_table, median, spread  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# SD 1.5's scheduler_config.json (PNDMScheduler)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      trained_betas=None, timestep_spacing="leading")
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, vocab_size=49408)


def build_pipeline(device: torch.device, smoke: bool, seed: int = 0):
    """An SD-1.5-shaped StableDiffusionPipeline with random fp32 weights on ``device`` (toy-sized when ``smoke``)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stepdistill.toy import models
    from stepdistill.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(seed)
    tok = build_toy_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        if smoke:
            unet, vae = models.build_unet(), models.build_vae()
            text = models.build_text_encoder(len(tok), **ids)
        else:
            unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
            text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **ids))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def fmt_flops(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP" if x >= 1e11 else f"{x / 1e9:.2f} GFLOP"


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def time_steps(step, n: int, device) -> list[float]:
    out = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def training_phase(args, device, path: str) -> dict:
    """Build one path alone, warm up, time ``args.steps`` steps, record peak memory; toolkit also counts FLOPs."""
    from bench_training import _config_kwargs, reference_trainer, toolkit_trainer

    from stepdistill.training.config import load_config

    free(device)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    kw = _config_kwargs(args, "random-sd15" if not args.cpu_smoke else "random-toy", work / "lcd")
    kw.update(resolution=args.resolution, gradient_checkpointing=args.gradient_checkpointing)
    config = load_config(None, **kw)
    pipe = build_pipeline(device, args.cpu_smoke)
    info = {}
    if path == "toolkit":
        step, cache_s, pipe = toolkit_trainer(config, device, pipe=pipe)
        info["cache_seconds"] = cache_s
        unet = pipe.unet
    else:
        step, ref = reference_trainer(config.pretrained_model, config, device, args.examples, args.resolution, base=pipe)
        del pipe
        unet = ref.unet
    free(device)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    info["times"] = time_steps(step, args.steps, device)
    info["peak_gib"] = peak_gib(device)
    info["params_trainable"] = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if path == "toolkit":
        info.update(unet_flops(args, device, unet))
        info["step_flops_counted"] = count_flops(step)
    del step, unet
    free(device)
    return info


def unet_flops(args, device, unet) -> dict:
    """FLOPs of one UNet forward at batch B (no grad) and of a student forward + backward (LoRA grads only),
    in the training dtype/autocast of the toolkit path."""
    B, lat = args.batch_size, args.resolution // 8 if not args.cpu_smoke else args.resolution // 4
    ctx_dim = unet.config.cross_attention_dim
    x = torch.randn(B, 4, lat, lat, device=device)
    t = torch.randint(0, 1000, (B,), device=device)
    ctx = torch.randn(B, 77, ctx_dim, device=device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def fwd():
        with torch.no_grad(), cast:
            unet(x, t, encoder_hidden_states=ctx).sample

    def fwd_bwd():
        with cast:
            out = unet(x, t, encoder_hidden_states=ctx).sample
        out.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    f = count_flops(fwd)
    fb = count_flops(fwd_bwd)
    return {"fwd_flops": f, "student_fwd_bwd_flops": fb, "model_step_flops": fb + 3 * f}


def sampling_phase(args, device) -> list[list]:
    from bench_sampling import untrained_lora

    from stepdistill.sampling import apply_sampler
    from stepdistill.sampling import generate, load_loras_into_pipeline

    free(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_pipeline(device, args.cpu_smoke)
    lora = untrained_lora(argparse.Namespace(rank=args.rank), base)
    teacher = base.to(dtype=dtype)
    students = {}
    for fuse in (False, True):
        pipe = build_pipeline(device, args.cpu_smoke)
        load_loras_into_pipeline(pipe, [(lora, 1.0)], fuse=fuse)
        students[fuse] = pipe.to(dtype=dtype)
    size = args.resolution
    fns = {}
    for bs in args.sample_batches:
        prompts = ["a large red circle in the center on a white background"] * bs
        fns[("teacher DDIM 50, CFG 7.5", bs)] = (teacher, "ddim", 50, 7.5, prompts)
        for fuse, pipe in students.items():
            fns[(f"LCD 4-step LCM{' fused' if fuse else ''}", bs)] = (pipe, "lcm", 4, 1.0, prompts)

    def runner(pipe, sampler, steps, guidance, prompts):
        def run():
            apply_sampler(pipe, sampler, steps)
            generate(pipe, prompts, steps=steps, guidance=guidance, seed=0, batch_size=len(prompts),
                     height=size, width=size)
        return run

    times = interleaved({k: runner(*v) for k, v in fns.items()}, args.sample_repeats, device, warmup=1)
    rows = []
    for (label, bs), ts in times.items():
        t_teacher = median(times[("teacher DDIM 50, CFG 7.5", bs)])
        rows.append([label, bs, spread(ts), f"{bs / median(ts):.2f}", f"{t_teacher / median(ts):.1f}x"])
    del base, teacher, students
    free(device)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--examples", type=int, default=256, help="toy examples (upscaled to 512 px) in the cache / pool")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per path")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-recipe path")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--sample-batches", default="1,8")
    p.add_argument("--sample-repeats", type=int, default=5)
    p.add_argument("--cpu-smoke", action="store_true", help="run the code paths on CPU with the toy-sized model; "
                   "prints, appends nothing")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    args.sample_batches = [int(b) for b in args.sample_batches.split(",") if b]
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.resolution, args.mixed_precision, args.no_append = 32, "no", True
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
                             "use bench_sampling.py / bench_training.py on CPU, or --cpu-smoke to check the code paths")
        device = torch.device("cuda")
        args.resolution, args.mixed_precision = 512, "bf16"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    B = args.batch_size
    results = {"toolkit": training_phase(args, device, "toolkit")}
    if not args.no_reference:
        results["reference"] = training_phase(args, device, "reference")
    tk = results["toolkit"]
    model_flops = tk["model_step_flops"]
    rows = []
    for name, r in results.items():
        m = median(r["times"])
        mfu = model_flops / m / (args.peak_tflops * 1e12)
        rows.append([name, spread(r["times"]), f"{1 / m:.2f}", f"{B / m:.1f}",
                     f"{median(results['reference']['times']) / m:.2f}x" if "reference" in results else "-",
                     f"{r['peak_gib']:.1f}" if device.type == "cuda" else "n/a",
                     f"{100 * mfu:.1f}%" if device.type == "cuda" else "n/a"])
    body = [f"SD-1.5-shaped pipeline, random weights, {args.resolution} px, "
            f"{'bf16' if args.mixed_precision == 'bf16' else 'fp32'}, LCD batch {B}, LoRA rank {args.rank} on the 14 "
            f"LCM-LoRA target types ({tk['params_trainable'] / 1e6:.1f}M trainable parameters), "
            f"{args.warmup} warm-up + {args.steps} timed steps per path, each path built and measured alone"
            + (", gradient checkpointing" if args.gradient_checkpointing else "") + ".", ""]
    body += markdown_table(["path", "step time, median (min-max)", "steps/s", "images/s", "speed vs reference",
                            "peak GiB", f"MFU (model FLOPs / {args.peak_tflops:g} TFLOP/s)"], rows)
    body += ["",
             f"- UNet forward at batch {B}: {fmt_flops(tk['fwd_flops'])} (FlopCounterMode); student forward + "
             f"backward: {fmt_flops(tk['student_fwd_bwd_flops'])} (backward computes input gradients through the "
             "frozen base and LoRA weight gradients only)",
             f"- model FLOPs per LCD step = student fwd+bwd + teacher 2x fwd + target fwd = "
             f"{fmt_flops(model_flops)}; counted on the toolkit's whole step: "
             f"{fmt_flops(tk['step_flops_counted'])}. The reference does the same model FLOPs (its 2 teacher "
             "passes of B = one of 2B) plus a VAE encode and a text-encoder pass per step, which the MFU column "
             "does not credit",
             f"- peak bf16 assumed: {args.peak_tflops:g} TFLOP/s dense (H100 SXM); MFU = model FLOPs x steps/s / peak",
             f"- toolkit one-time cache build ({args.examples} images at {args.resolution} px + captions): "
             f"{tk['cache_seconds']:.1f} s"]
    if not args.no_sampling:
        srows = sampling_phase(args, device)
        body += ["", f"Sampling at {args.resolution} px ({'bf16' if device.type == 'cuda' else 'fp32'}; VAE decode and "
                 "text encoder included; untrained rank-%d LoRA, same cost as a trained one):" % args.rank, ""]
        body += markdown_table(["configuration", "batch", "latency, median (min-max)", "images/s",
                                "speed-up vs teacher"], srows)
    print("\n".join(body))
    finish("bench_gpu: SD-1.5-sized LCD training and sampling", device, body, append=not args.no_append)


if __name__ == "__main__":
    main()
