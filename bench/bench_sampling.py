"""Sampling throughput: the teacher (50 DDIM steps with classifier-free guidance) vs. few-step LoRA students
(LCD with ``LCMScheduler``, unfused and fused; reflow with ``PiecewiseRectifiedFlowScheduler`` when a reflow LoRA
is given) at 1/2/4/8 steps, as latency of one batch (median of interleaved repeats), images/s and speed-up
over the teacher. On CUDA also per-configuration peak memory, fp16 and bf16, and with/without
``torch.compile`` of the UNet (compiled variants use fused LoRAs).

    OMP_NUM_THREADS=1 python bench/bench_sampling.py --model toy --lcd-lora out/demo/lora --batch-size 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_model, device_of, finish, interleaved, markdown_table, median, spread  # noqa: E402


def untrained_lora(args, pipe) -> str:
    """A random rank-``args.rank`` LCD adapter written to a temp file (samples exactly as fast as a trained one)."""
    import atexit
    import copy
    import shutil
    import tempfile

    from stepdistill import lora

    if getattr(args, "_untrained", None) is None:
        unet = copy.deepcopy(pipe.unet).float().cpu()
        lora.add_lora_to_unet(unet, rank=args.rank)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        tmp = tempfile.mkdtemp(prefix="bench-lora-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        args._untrained = str(lora.save_lora(Path(tmp), unet, metadata={"stepdistill.method": "lcd"}))
    return args._untrained


def build_pipes(args, device, dtype, compiled: bool) -> dict:
    """{label: (pipe, sampler, guidance, step counts, notes)} for one precision/compile variant."""
    from stepdistill.sampling import apply_sampler, lora_metadata
    from stepdistill.models.pipeline import load_pipeline
    from stepdistill.sampling import load_loras_into_pipeline
    from stepdistill.toy.world import TOY_GUIDANCE

    def load():
        return load_pipeline(args.model, device=str(device), dtype=dtype)

    guidance = args.guidance if args.guidance is not None else TOY_GUIDANCE
    pipes = {}
    teacher = load()
    apply_sampler(teacher, "ddim", args.teacher_steps)
    pipes[f"teacher DDIM CFG {guidance:g}"] = (teacher, "ddim", guidance, [args.teacher_steps], None)

    def student(lora, fuse):
        pipe = load()
        load_loras_into_pipeline(pipe, [(lora or untrained_lora(args, teacher), 1.0)], fuse=fuse)
        return pipe

    fuse_options = (True,) if compiled else (False, True)
    for fuse in fuse_options:
        pipes[f"LCD (LCMScheduler){' fused' if fuse else ''}"] = (student(args.lcd_lora, fuse), "lcm", 1.0,
                                                                  args.steps, None)
    if args.reflow_lora:
        meta = lora_metadata([(args.reflow_lora, 1.0)])[0]
        k = int(meta.get("stepdistill.num_windows", 4))
        for fuse in fuse_options:
            pipes[f"reflow (PeRFlow K={k}){' fused' if fuse else ''}"] = (student(args.reflow_lora, fuse), "perflow", 1.0,
                                                                         args.steps, k)
    if compiled:
        for pipe, *_ in pipes.values():
            pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)
    return pipes


def run_variant(args, device, dtype, compiled: bool) -> tuple[list[list], dict]:
    import warnings

    from stepdistill.sampling import apply_sampler
    from stepdistill.sampling import generate
    from stepdistill.toy.world import evaluation_prompts

    prompts = evaluation_prompts(args.batch_size, seed=0)
    pipes = build_pipes(args, device, dtype, compiled)
    fns, meta = {}, {}
    for label, (pipe, sampler, guidance, steps_list, k) in pipes.items():
        for steps in steps_list:
            def fn(pipe=pipe, sampler=sampler, guidance=guidance, steps=steps, k=k):
                apply_sampler(pipe, sampler, steps, k)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PeRFlow with fewer steps than windows warns
                    generate(pipe, prompts, steps=steps, guidance=guidance, seed=0, batch_size=len(prompts))
            fns[(label, steps)] = fn
            meta[(label, steps)] = pipe
    times = interleaved(fns, args.repeats, device, warmup=2 if compiled else 1)
    peak = {}
    if device.type == "cuda":
        for key, fn in fns.items():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            peak[key] = torch.cuda.max_memory_allocated(device) / 2**30
    teacher_key = next(iter(fns))
    t_teacher = median(times[teacher_key])
    rows = []
    for key, ts in times.items():
        label, steps = key
        m = median(ts)
        row = [label, steps, spread(ts), f"{args.batch_size / m:.2f}", f"{t_teacher / m:.1f}x"]
        if peak:
            row.append(f"{peak[key]:.2f}")
        rows.append(row)
    del pipes, fns, meta
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, {"teacher_median_s": t_teacher}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="'toy' (default, once committed), a pipeline dir or a hub id")
    p.add_argument("--lcd-lora", default=None, help="LCD LoRA dir/file (default: an untrained adapter; speed only)")
    p.add_argument("--reflow-lora", default=None, help="reflow LoRA dir/file (adds PeRFlow rows)")
    p.add_argument("--rank", type=int, default=64, help="rank of the untrained adapter when no --lcd-lora is given")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--steps", default="1,2,4,8", help="student step counts")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: 2, the toy teacher's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default=None, help="CUDA only: comma list of fp16,bf16 (default both); CPU: fp32")
    p.add_argument("--no-compile", action="store_true", help="CUDA only: skip the torch.compile variants")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    p.add_argument("--device", default=None)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",") if s]
    device = device_of(args.device)
    args.model = args.model or default_model()

    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if device.type == "cuda":
        dtypes = (args.dtypes or "fp16,bf16").split(",")
        compile_opts = (False,) if args.no_compile else (False, True)
    else:
        dtypes, compile_opts = ["fp32"], (False,)

    header = ["configuration", "steps", "latency per batch, median (min-max)", "images/s", "speed-up vs teacher"]
    if device.type == "cuda":
        header.append("peak GiB")
    body = [f"Model `{args.model}`, batch {args.batch_size} images per call, {args.repeats} interleaved repeats after "
            f"warm-up; LCD LoRA: `{args.lcd_lora or f'untrained rank-{args.rank} adapter'}`"
            + (f"; reflow LoRA: `{args.reflow_lora}`" if args.reflow_lora else "") + "."]
    for dt in dtypes:
        for compiled in compile_opts:
            rows, info = run_variant(args, device, names[dt], compiled)
            title = f"{dt}{', torch.compile (' + args.compile_mode + ')' if compiled else ''}"
            body += ["", f"**{title}**", ""] + markdown_table(header, rows)
            print("\n".join(body[-len(rows) - 4:]), flush=True)
    if device.type == "cpu":
        body += ["", "CPU run on a shared machine: the speed-ups (same run, interleaved) are the figures; latencies are "
                 "indicative only."]
    finish("bench_sampling: teacher vs few-step students", device, body, append=not args.no_append)


if __name__ == "__main__":
    main()
