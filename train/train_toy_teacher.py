"""Train the embedded toy teacher from scratch and save it as a StableDiffusionPipeline directory.

    python train/train_toy_teacher.py --out stepdistill/toy/weights/teacher

reproduces the committed weights (same seed, same torch version, CPU). See stepdistill/toy/teacher.py.
"""
import argparse
import dataclasses

from stepdistill.toy.teacher import TeacherRecipe, train_teacher


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output pipeline directory")
    parser.add_argument("--log_dir", default=None, help="TensorBoard log directory")
    for field in dataclasses.fields(TeacherRecipe):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    recipe = TeacherRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherRecipe)})
    train_teacher(args.out, recipe, log_dir=args.log_dir)


if __name__ == "__main__":
    main()
