"""Train the toy world's scene classifier (the judge behind prompt accuracy, toy-FID and precision/recall).

    python train/train_toy_classifier.py --out stepdistill/toy/weights/classifier.safetensors

Half of its real examples go through the world's VAE round trip (``--vae``: a pipeline directory, by
default the committed toy teacher), so the judge does not hold the autoencoder's softness against a model.
"""
import argparse

import torch
from diffusers import AutoencoderKL

from stepdistill.toy.classifier import (blends, label_tensor, save_classifier, to_unit_tensor, train_classifier)
from stepdistill.toy.scenes import ATTRIBUTES, sample_scenes
from stepdistill.toy.world import TOY_TEACHER_DIR


def held_out_report(model, vae=None, n: int = 2000) -> dict:
    images, scenes = sample_scenes(n, seed=12345)
    labels = label_tensor(scenes)
    x = to_unit_tensor(images)
    report = {}
    with torch.no_grad():
        logits = model(x)
        for k in ATTRIBUTES:
            keep = labels[k] >= 0
            report[f"acc_{k}"] = float((logits[k].argmax(1) == labels[k])[keep].float().mean())
        report["real_on_renders"] = float(logits["real"].softmax(1)[:, 1].mean())
        report["real_on_blends"] = float(model(to_unit_tensor(blends(500, seed=54321)))["real"].softmax(1)[:, 1].mean())
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--vae", default=str(TOY_TEACHER_DIR), help="pipeline directory whose vae/ the judge accepts")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--pool-size", type=int, default=40000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the scene pool")
    args = p.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae").to(args.device).eval() if args.vae else None
    model = train_classifier(steps=args.steps, batch=args.batch, pool_size=args.pool_size, seed=args.seed,
                             device=args.device, vae=vae, workers=args.workers)
    for k, v in held_out_report(model).items():
        print(f"held-out {k}: {v:.4f}")
    save_classifier(model, args.out)


if __name__ == "__main__":
    main()
