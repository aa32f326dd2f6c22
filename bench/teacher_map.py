"""How rough is the teacher's noise -> image map? The figure behind issue 13's reading that the one-step
regression is data-bound (docs/results.md, "How rough the teacher's map is").

A one-step student regresses the teacher's ODE map ``x0 = T(eps, prompt)`` (24 DDIM steps at CFG 2, as the
couplings are made). This measures, on the toy teacher, in clean-latent units (what the couplings store):

* the endpoint's MSE when the noise moves a little, ``eps' = sqrt(1 - r^2) eps + r d`` (``d`` a fresh draw, so
  ``eps'`` is again standard normal), for a few ``r``; ``r = 1`` is an unrelated noise;
* the flip equivariance error ``MSE(T(flip eps), flip T(eps))``, horizontal and vertical, on prompts that name no
  position off the centre (a flip keeps them true): whether flipped couplings could serve as extra data (they can
  if this is well below the student's held-out error).

    python bench/teacher_map.py --prompts 96 --out out/teacher-map.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import ROOT  # noqa: F401  (puts the checkout on sys.path)
from stepdistill.data.prompts import read_prompts
from stepdistill.models.latents import latent_shape
from stepdistill.models.pipeline import load_pipeline
from stepdistill.sampling import set_scheduler
from stepdistill.toy.scenes import parse_caption


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--radii", default="0.02,0.05,0.1,0.2,0.3,1")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default="out/teacher-map.json")
    args = ap.parse_args()

    pipe = load_pipeline("toy")
    set_scheduler(pipe, "ddim")
    shape = (args.prompts, *latent_shape(pipe))
    prompts = [p for p in read_prompts(f"toy:{4 * args.prompts}:{args.seed}")[0]
               if parse_caption(p).get("position", "center") == "center"][:args.prompts]
    if len(prompts) < args.prompts:
        raise SystemExit("too few prompts without a position off the centre; lower --prompts")
    gen = torch.Generator().manual_seed(args.seed)
    eps, d = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)

    def endpoint(noise):
        return pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    latents=noise.to(pipe.device).clone(), output_type="latent").images.float().cpu()

    def mse(a, b):
        return float(((a - b) ** 2).mean())

    base = endpoint(eps)
    result = {"prompts": len(prompts), "steps": args.steps, "guidance": args.guidance,
              "endpoint_variance": float(base.var()), "perturbation": {}}
    for r in (float(x) for x in args.radii.split(",")):
        moved = endpoint((1 - r * r) ** 0.5 * eps + r * d)
        result["perturbation"][str(r)] = mse(base, moved)
        print(f"r = {r}: endpoint MSE {result['perturbation'][str(r)]:.4f}", flush=True)
    for name, dim in (("hflip", -1), ("vflip", -2)):
        result[name] = mse(base, endpoint(eps.flip(dim)).flip(dim))
        print(f"{name} equivariance MSE {result[name]:.4f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
