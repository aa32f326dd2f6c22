"""Train the toy world's scene classifier (the judge behind prompt accuracy and toy-FID).

    python train/train_toy_classifier.py --out stepdistill/toy/weights/classifier.safetensors
"""
import argparse

import torch

from stepdistill.toy.classifier import save_classifier, train_classifier, to_unit_tensor, label_tensor
from stepdistill.toy.scenes import ATTRIBUTES, sample_scenes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = train_classifier(steps=args.steps, batch=args.batch, seed=args.seed)
    images, scenes = sample_scenes(2000, seed=12345)  # held-out scenes
    with torch.no_grad():
        logits = model(to_unit_tensor(images))
    labels = label_tensor(scenes)
    for k in ATTRIBUTES:
        print(f"held-out {k} accuracy: {(logits[k].argmax(1) == labels[k]).float().mean():.4f}")
    save_classifier(model, args.out)


if __name__ == "__main__":
    main()
