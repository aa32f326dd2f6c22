"""`stepdistill sample` as the README's quick start uses it: no --prompt on the toy world, prompts written beside
the grid, one labelled row per prompt."""
import json

from PIL import Image

from stepdistill.cli import main
from stepdistill.toy.world import evaluation_prompts


def test_sample_without_prompt_uses_toy_prompts_and_records_them(tmp_path, capsys):
    out = tmp_path / "grid.png"
    main(["sample", "--model", "toy", "--steps", "1", "--num-images", "2", "--scale", "1", "--device", "cpu",
          "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompts"] == evaluation_prompts(4) and record["images_per_prompt"] == 2
    assert "prompts in grid.json" in capsys.readouterr().out
    with Image.open(out) as im:
        w, h = im.size
    assert h == 4 * (64 + 2)  # one row per prompt
    assert w > 2 * (64 + 2) + 7 * len(max(record["prompts"], key=len)) - 1  # the whole prompt labels its row


def test_sample_without_prompt_on_another_model_names_the_fix(tmp_path, capsys):
    code = main(["sample", "--model", str(tmp_path / "missing"), "--steps", "1", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--prompt" in err
