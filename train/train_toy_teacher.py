"""Train the embedded toy teacher from scratch and save it as a StableDiffusionPipeline directory.

    python train/train_toy_teacher.py --out DIR [--RECIPE_FIELD VALUE ...]

Every field of ``TeacherRecipe`` is an option; the recipe actually run is saved as ``DIR/toy_recipe.json``.
The committed weights were made in two stages (GPU, then CPU): the commands are in docs/results.md.
"""
import argparse
import dataclasses
import functools

from stepdistill.toy.teacher import TeacherRecipe, train_teacher
from stepdistill.training.config import coerce_value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output pipeline directory")
    parser.add_argument("--log_dir", default=None, help="TensorBoard log directory")
    for field in dataclasses.fields(TeacherRecipe):  # typed like config overrides: `--freeze_text_encoder false` is False
        parser.add_argument(f"--{field.name}", default=field.default,
                            type=functools.partial(coerce_value, field.name, tp=type(field.default), from_text=True))
    args = parser.parse_args()
    recipe = TeacherRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherRecipe)})
    train_teacher(args.out, recipe, log_dir=args.log_dir)


if __name__ == "__main__":
    main()
