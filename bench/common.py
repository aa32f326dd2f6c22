"""Shared helpers of the benchmark scripts: environment header, side-by-side timing, appending to RESULTS.md,
and a plain re-statement of the reference LCM-LoRA training step (diffusers'
``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``).

Timing rule: on CPU (shared machines, other jobs) only medians of interleaved repeats and ratios measured
side by side in one run mean anything; absolute times are reported as headline figures only on CUDA.
"""
from __future__ import annotations

import copy
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "RESULTS.md"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------- environment

def device_of(arg: str | None) -> torch.device:
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def environment(device: torch.device) -> dict:
    import diffusers
    import platform

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"
    return {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)


def default_model() -> str:
    from stepdistill.toy.world import TOY_TEACHER_DIR

    if (TOY_TEACHER_DIR / "model_index.json").exists():
        return "toy"
    raise SystemExit(f"the toy teacher is not in {TOY_TEACHER_DIR} yet; pass --model DIR (a diffusers pipeline)")


def append_results(title: str, device: torch.device, body: list[str], path: Path = RESULTS) -> Path:
    """Append a dated section (date, device, versions, exact command line, then ``body``) to RESULTS.md."""
    env = environment(device)
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"## {title} ({now})", "",
             f"- device: {env['device']}", f"- torch {env['torch']}, diffusers {env['diffusers']}, python {env['python']}",
             f"- command: `{command_line()}`", ""] + body + [""]
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by the scripts in `bench/`; newest last. On CPU only the ratios "
                    "(measured side by side in one run) are meaningful; absolute times are GPU figures.\n\n")
        f.write("\n".join(lines) + "\n")
    return path


def finish(title: str, device: torch.device, body: list[str], append: bool = True):
    """End of every bench script: print the environment line and (unless ``--no-append``) append ``body`` to
    RESULTS.md under ``title``."""
    env = environment(device)
    print(f"[{env['device']}; torch {env['torch']}; diffusers {env['diffusers']}]")
    if append:
        print(f"appended to {append_results(title, device, body)}")


# ---------------------------------------------------------------------------------------------- timing

def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int, device: torch.device, warmup: int = 1) -> dict[str, list[float]]:
    """Run each callable ``warmup`` times, then ``repeats`` rounds of all of them in turn (so slow drifts of a
    shared machine hit every candidate alike); returns the seconds of every timed call per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> str:
    """'median (min-max)' in ms."""
    return f"{1e3 * median(xs):.1f} ms ({1e3 * min(xs):.1f}-{1e3 * max(xs):.1f})"


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


# ---------------------------------------------------------------------------------------------- reference recipe

class ReferenceLCDStep:
    """One training step of diffusers' ``train_lcm_distill_lora_sd_wds.py`` (LCM-LoRA, SD 1.x/2.x), restated
    plainly with the same math as ``stepdistill.methods.lcd.LCDObjective.loss``:

    * every step encodes the batch's pixels with the VAE (``latent_dist.sample() * scaling_factor``) and the
      captions with the tokenizer + text encoder; the empty-prompt embedding is computed once before the loop;
    * the teacher is a separate frozen copy of the base UNet (``copy.deepcopy``; the script loads it twice from
      disk), cast to ``weight_dtype`` (``--cast_teacher_unet``);
    * the student is ``peft.get_peft_model(unet, LoraConfig(r, target_modules, lora_alpha))`` on its own copy;
    * the teacher runs twice, conditional then unconditional (batch B each), then the student target pass
      on ``x_prev`` (no EMA network for LCM-LoRA), all without grad;
    * LCM guidance ``cond + w (cond - uncond)`` on x0 and eps, one DDIM step on the skipping grid, c_skip/c_out
      boundary scalings, L2 or pseudo-Huber loss, backward, grad-norm clip over ``unet.parameters()``, AdamW step.

    ``autocast_dtype``: the script wraps the teacher and target passes in ``torch.autocast(device.type)`` and
    accelerate wraps the student forward in autocast under ``--mixed_precision``; pass ``None`` for full fp32
    (what the benchmarks compare at on CPU) or ``torch.bfloat16`` for bf16 mixed precision. The student base
    weights stay fp32 as the script requires.
    """

    def __init__(self, vae, text_encoder, tokenizer, base_unet, scheduler_config: dict, *, rank: int, alpha: float,
                 target_modules, learning_rate: float = 1e-4, num_ddim_timesteps: int = 50, w_min: float = 5.0,
                 w_max: float = 15.0, loss_type: str = "huber", huber_c: float = 0.001,
                 timestep_scaling: float = 10.0, batch_size: int = 16, device="cpu",
                 weight_dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None,
                 max_grad_norm: float = 1.0):
        from diffusers import DDPMScheduler
        from peft import LoraConfig, get_peft_model

        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.autocast_dtype = autocast_dtype
        self.w_min, self.w_max, self.loss_type, self.huber_c = w_min, w_max, loss_type, huber_c
        self.timestep_scaling = timestep_scaling
        self.num_ddim_timesteps = num_ddim_timesteps
        self.max_grad_norm = max_grad_norm
        # 1. noise scheduler and schedules
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        ac = self.noise_scheduler.alphas_cumprod
        self.alpha_schedule = torch.sqrt(ac).to(self.device)
        self.sigma_schedule = torch.sqrt(1 - ac).to(self.device)
        # DDIMSolver of the script
        T = self.noise_scheduler.config.num_train_timesteps
        step_ratio = T // num_ddim_timesteps
        ddim_timesteps = (np.arange(1, num_ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1
        acn = ac.numpy()
        ddim_alpha_cumprods_prev = np.asarray([acn[0]] + acn[ddim_timesteps[:-1]].tolist())
        self.ddim_timesteps = torch.from_numpy(ddim_timesteps).long().to(self.device)
        self.ddim_alpha_cumprods_prev = torch.from_numpy(ddim_alpha_cumprods_prev).to(self.device)
        self.topk = T // num_ddim_timesteps
        # 2.-6. frozen text encoder, VAE, teacher UNet
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).to(self.device, dtype=weight_dtype)
        self.vae = vae.requires_grad_(False).to(self.device)  # cast to weight_dtype on the first step, as the script
        self.teacher_unet = copy.deepcopy(base_unet).requires_grad_(False).to(self.device, dtype=weight_dtype)
        # 7.-8. student: its own copy with a LoRA
        unet = copy.deepcopy(base_unet).to(self.device, dtype=torch.float32)
        unet.train()
        self.unet = get_peft_model(unet, LoraConfig(r=rank, target_modules=list(target_modules), lora_alpha=alpha))
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=learning_rate, betas=(0.9, 0.999),
                                           weight_decay=1e-2, eps=1e-8)
        uncond_ids = tokenizer([""] * batch_size, return_tensors="pt", padding="max_length",
                               max_length=77).input_ids.to(self.device)
        with torch.no_grad():
            self.uncond_prompt_embeds = self.text_encoder(uncond_ids)[0]

    # ---- the script's helpers
    @staticmethod
    def _extract(a, t, x_shape):
        b = t.shape[0]
        return a.gather(-1, t).reshape(b, *((1,) * (len(x_shape) - 1)))

    def _x0(self, out, t, x):
        alphas, sigmas = self._extract(self.alpha_schedule, t, x.shape), self._extract(self.sigma_schedule, t, x.shape)
        return (x - sigmas * out) / alphas  # prediction_type "epsilon"

    def _eps(self, out, t, x):
        return out  # prediction_type "epsilon"

    def _scalings(self, t, sigma_data=0.5):
        scaled = t * self.timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        return c_skip, c_out

    def _ddim_step(self, pred_x0, pred_noise, index):
        alpha_cumprod_prev = self._extract(self.ddim_alpha_cumprods_prev, index, pred_x0.shape)
        dir_xt = (1.0 - alpha_cumprod_prev).sqrt() * pred_noise
        return alpha_cumprod_prev.sqrt() * pred_x0 + dir_xt

    def _autocast(self):
        from contextlib import nullcontext

        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, pixel_values: torch.Tensor, captions: list[str]) -> float:
        wd, dev = self.weight_dtype, self.device
        # 1. image and text conditioning, every step
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            prompt_embeds = self.text_encoder(ids.to(dev))[0]
            pixel_values = pixel_values.to(dev, dtype=wd)
            if self.vae.dtype != wd:
                self.vae.to(dtype=wd)
            latents = self.vae.encode(pixel_values).latent_dist.sample()
            latents = (latents * self.vae.config.scaling_factor).to(wd)
        bsz = latents.shape[0]
        # 2. timesteps on the skipping grid
        index = torch.randint(0, self.num_ddim_timesteps, (bsz,), device=dev).long()
        start_timesteps = self.ddim_timesteps[index]
        timesteps = torch.clamp(start_timesteps - self.topk, min=0)
        # 3. boundary scalings
        c_skip_start, c_out_start = [x.reshape(bsz, 1, 1, 1) for x in self._scalings(start_timesteps)]
        c_skip, c_out = [x.reshape(bsz, 1, 1, 1) for x in self._scalings(timesteps)]
        # 4. forward noising
        noise = torch.randn_like(latents)
        noisy = self.noise_scheduler.add_noise(latents, noise, start_timesteps)
        # 5. guidance scale w ~ U[w_min, w_max]
        w = ((self.w_max - self.w_min) * torch.rand((bsz,)) + self.w_min).reshape(bsz, 1, 1, 1).to(dev, latents.dtype)
        # 7. online student prediction (accelerate autocasts the prepared model under mixed precision)
        with self._autocast():
            noise_pred = self.unet(noisy, start_timesteps, timestep_cond=None,
                                   encoder_hidden_states=prompt_embeds.float()).sample
        model_pred = c_skip_start * noisy + c_out_start * self._x0(noise_pred, start_timesteps, noisy)
        # 8. teacher: conditional pass, then unconditional pass, LCM guidance, one DDIM step
        with torch.no_grad():
            with self._autocast():
                cond_out = self.teacher_unet(noisy.to(wd), start_timesteps, encoder_hidden_states=prompt_embeds.to(wd)).sample
                cond_x0 = self._x0(cond_out, start_timesteps, noisy)
                cond_eps = self._eps(cond_out, start_timesteps, noisy)
                uncond_out = self.teacher_unet(noisy.to(wd), start_timesteps,
                                               encoder_hidden_states=self.uncond_prompt_embeds[:bsz].to(wd)).sample
                uncond_x0 = self._x0(uncond_out, start_timesteps, noisy)
                uncond_eps = self._eps(uncond_out, start_timesteps, noisy)
                pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)
                pred_noise = cond_eps + w * (cond_eps - uncond_eps)
                x_prev = self._ddim_step(pred_x0, pred_noise, index)
        # 9. target prediction with the online student (no EMA network for LCM-LoRA)
        with torch.no_grad():
            with self._autocast():
                target_noise_pred = self.unet(x_prev.float(), timesteps, timestep_cond=None,
                                              encoder_hidden_states=prompt_embeds.float()).sample
            target = c_skip * x_prev + c_out * self._x0(target_noise_pred, timesteps, x_prev)
        # 10. loss
        if self.loss_type == "l2":
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        else:
            loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + self.huber_c**2) - self.huber_c)
        # 11. backward on the student, clip, step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
