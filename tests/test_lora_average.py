"""``stepdistill average`` / :mod:`stepdistill.lora.average`: the weighted mean of adapters' updates, refactored by
SVD, written in kohya's layout with the first adapter's header, and loaded by stock diffusers layer by layer."""
from __future__ import annotations

import pytest
import torch

from stepdistill import lora
from stepdistill.cli import main
from stepdistill.lora.average import average_layers, refactor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_adapter(unet, rank: int, seed: int, header: dict | None = None, path=None):
    """A rank-``rank`` LoRA on ``unet``'s LCM-LoRA targets with random (non-zero) up factors, saved to ``path``."""
    torch.manual_seed(seed)
    lora.add_lora_to_unet(unet, rank=rank, alpha=rank, adapter_name=f"a{seed}")
    layers = lora.unet_lora_state_dict(unet, f"a{seed}")
    g = torch.Generator().manual_seed(seed)
    layers = {p: (d, torch.randn(u.shape, generator=g) * 0.1, a) for p, (d, u, a) in layers.items()}
    unet.delete_adapters(f"a{seed}")
    if path is not None:
        lora.save_lora(path, layers, metadata=header or {}, dtype=torch.float32)
    return layers


def test_refactor_is_exact_within_rank_and_best_beyond():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(6, 3, generator=g) @ torch.randn(3, 8 * 9, generator=g)  # rank 3, a 3x3 conv's update
    down, up, err = refactor(low, 4, (4, 8, 3, 3), (6, 4, 1, 1))
    assert down.shape == (4, 8, 3, 3) and up.shape == (6, 4, 1, 1) and err < 1e-6
    torch.testing.assert_close(lora.lora_delta(down, up, 4.0), low, atol=1e-4, rtol=1e-4)
    full = torch.randn(6, 10, generator=g)
    down, up, err = refactor(full, 2, (2, 10), (6, 2))
    S = torch.linalg.svdvals(full.double())
    assert err == pytest.approx(float((S[2:].pow(2).sum() / S.pow(2).sum()).sqrt()), rel=1e-6)  # Eckart-Young
    assert float((lora.lora_delta(down, up, 2.0) - full).norm() / full.norm()) == pytest.approx(err, rel=1e-4)


def test_average_is_the_mean_update(tiny_random_pipe):
    unet = tiny_random_pipe.unet
    a, b = _random_adapter(unet, 2, 1), _random_adapter(unet, 2, 2)
    mean, errors = average_layers([a, b], weights=[1, 3], rank=4)  # two rank-2 updates: rank 4 holds the mean
    assert set(mean) == set(a) and max(errors.values()) < 1e-5
    for p in a:
        expect = 0.25 * lora.lora_delta(*a[p]) + 0.75 * lora.lora_delta(*b[p])
        torch.testing.assert_close(lora.lora_delta(*mean[p]), expect, atol=1e-5, rtol=1e-4)
        assert mean[p][0].shape[1:] == a[p][0].shape[1:] and mean[p][2] == 4.0
    one, _ = average_layers([a])  # one adapter: itself, refactored
    for p in a:
        torch.testing.assert_close(lora.lora_delta(*one[p]), lora.lora_delta(*a[p]), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one weight per adapter"):
        average_layers([a, b], weights=[1])
    with pytest.raises(lora.LoraFormatError, match="other layers than adapter 1"):
        average_layers([a, {k: v for k, v in list(b.items())[1:]}])


def test_cli_average_loads_in_stock_diffusers_layer_by_layer(tiny_random_pipe, tiny_model_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    header = {"stepdistill.method": "reflow", "stepdistill.recommended_steps": "1"}
    unet = tiny_random_pipe.unet
    a = _random_adapter(unet, 4, 1, header, tmp_path / "a")
    b = _random_adapter(unet, 4, 2, header, tmp_path / "b")
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "avg")]) == 0
    said = capsys.readouterr().out
    assert "the mean of 2 adapters" in said and "truncation error" in said  # two rank-4 updates at rank 4
    file = tmp_path / "avg" / "pytorch_lora_weights.safetensors"
    sd, metadata, fmt = lora.read_lora(file)
    assert fmt == "kohya" and metadata["ss_network_dim"] == "4" and metadata["stepdistill.method"] == "reflow"
    assert metadata["stepdistill.average_weights"] == "1,1" and "a" in metadata["stepdistill.averaged_from"]
    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    stock.load_lora_weights(str(tmp_path / "avg"), adapter_name="avg")
    report = lora.verify_lora_loaded(stock, file, "avg")
    assert report.loaded == report.expected == len(a) > 50
    # at rank 8 the mean is exact
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "avg8"),
                 "--rank", "8"]) == 0
    assert "exact at this rank" in capsys.readouterr().out
    exact = lora.read_lora_layers(tmp_path / "avg8" / "pytorch_lora_weights.safetensors")
    for p in a:
        torch.testing.assert_close(lora.lora_delta(*exact[p]), (lora.lora_delta(*a[p]) + lora.lora_delta(*b[p])) / 2,
                                   atol=1e-5, rtol=1e-4)
    # bad input: one line, exit code 2
    _random_adapter(unet, 4, 3, {"stepdistill.method": "lcd"}, tmp_path / "c")
    with pytest.raises(SystemExit) as exit:
        main(["average", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "bad")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different methods" in err
    with pytest.raises(SystemExit) as exit:
        main(["average", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "bad"), "--weights", "1,x"])
    assert exit.value.code == 2
    assert "--weights must be comma-separated numbers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
