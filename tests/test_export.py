"""`stepdistill export` / `inspect`: lossless round trips between layouts, stock diffusers loading of every
written layout (UNet and SD3/FLUX transformers), and clear rejection of malformed files."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from stepdistill import lora
from stepdistill.cli.lora import add_lora_commands
from stepdistill.lora import LoraFormatError, add_lora_to_unet, lora_delta, unet_lora_state_dict, verify_lora_loaded
from stepdistill.models.family import FLUX_LORA_TARGET_MODULES
from tiny_models import perturb_lora

FLOW_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm1.linear", "norm.linear", "x_embedder", "context_embedder"]
CARD = {"stepdistill.method": "lcd", "stepdistill.scheduler": "LCMScheduler", "stepdistill.recommended_steps": "4",
        "stepdistill.recommended_guidance": "1.0"}


def _make_pipe(seed: int = 0):
    from stepdistill.toy.teacher import build_random_pipeline

    pipe = build_random_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_layers(rank: int, alpha: float, seed: int = 1):
    pipe = _make_pipe()
    add_lora_to_unet(pipe.unet, rank, alpha=alpha)
    perturb_lora(pipe.unet, "default", seed)
    return unet_lora_state_dict(pipe.unet)


@pytest.fixture(scope="module")
def unet_lora(tmp_path_factory):
    """A toy-UNet LoRA (rank 4, alpha 8: scale 2, so a lost alpha is a 2x error) saved as training saves it."""
    layers = _unet_layers(4, 8.0)
    path = lora.save_lora(tmp_path_factory.mktemp("lora") / "accel", layers, metadata=CARD, title="toy accel")
    return path, layers


def _flux(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def _sd3(seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=64, out_channels=4)


def _flow_layers(make, rank=4, alpha=8.0):
    model = make()
    add_lora_to_unet(model, rank, alpha=alpha, target_modules=FLOW_TARGETS)
    perturb_lora(model, "default", 3)
    return unet_lora_state_dict(model)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="stepdistill")
    sub = parser.add_subparsers(dest="command", required=True)
    add_lora_commands(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except SystemExit as e:
        return e.code
    return 0


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------- round trips


def test_kohya_diffusers_kohya_round_trip_is_bit_exact(unet_lora, tmp_path):
    path, layers = unet_lora
    d = tmp_path / "d.safetensors"
    assert _cli(["export", str(path), str(d), "--format", "diffusers"]) == 0
    sd_d, md_d, fmt_d = lora.read_lora(d)
    assert fmt_d == "diffusers" and all(k.startswith("unet.") for k in sd_d)
    assert md_d[lora.FOLDED_ALPHA_KEY] == "8.0"
    k = tmp_path / "k.safetensors"
    assert _cli(["export", str(d), str(k), "--format", "kohya"]) == 0
    orig, md_o, _ = lora.read_lora(path)
    back, md_k, fmt_k = lora.read_lora(k)
    assert fmt_k == "kohya"
    _assert_same_tensors(orig, back)
    for key in CARD:  # the stepdistill card survives both hops
        assert md_d[key] == md_k[key] == CARD[key]
    assert md_k["modelspec.title"] == "toy accel" and md_k["ss_network_alpha"] == "8.0"
    assert md_k["stepdistill.export_source_format"] == "diffusers"
    # and the diffusers file's alpha really is folded: lora_B = up * alpha / r
    key = "down_blocks.0.attentions.0.proj_in"
    torch.testing.assert_close(sd_d[f"unet.{key}.lora_B.weight"].float(),
                               orig[f"lora_unet_{key.replace('.', '_')}.lora_up.weight"].float() * 2.0)


def test_round_trip_with_non_power_of_two_scale_keeps_the_update(tmp_path):
    layers = _unet_layers(4, 3.0)  # scale 0.75: folding rounds in fp16
    src = lora.save_lora(tmp_path / "src.safetensors", layers)
    lora.export_lora(src, tmp_path / "d.safetensors", "diffusers")
    lora.export_lora(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    a = lora.read_lora_layers(src)
    b = lora.read_lora_layers(tmp_path / "k.safetensors")
    assert a.keys() == b.keys()
    for p in a:
        assert b[p][2] == 3.0 and torch.equal(a[p][0], b[p][0])  # alpha restored, lora_down untouched
        want = lora_delta(*a[p])
        assert (lora_delta(*b[p]) - want).abs().max() <= 2e-3 * want.abs().max(), p


def test_dtype_conversion_and_kohya_to_kohya_identity(unet_lora, tmp_path):
    path, _ = unet_lora
    lora.export_lora(path, tmp_path / "same.safetensors", "kohya")
    _assert_same_tensors(lora.read_lora(path)[0], lora.read_lora(tmp_path / "same.safetensors")[0])
    lora.export_lora(path, tmp_path / "f32.safetensors", "kohya", dtype=torch.float32)
    sd32 = lora.read_lora(tmp_path / "f32.safetensors")[0]
    assert all(v.dtype == torch.float32 for v in sd32.values())
    lora.export_lora(tmp_path / "f32.safetensors", tmp_path / "f16.safetensors", "kohya", dtype=torch.float16)
    _assert_same_tensors(lora.read_lora(path)[0], lora.read_lora(tmp_path / "f16.safetensors")[0])


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_every_unet_format_loads_in_stock_diffusers(unet_lora, tmp_path, fmt):
    path, layers = unet_lora
    out = tmp_path / fmt
    lora.export_lora(path, out, fmt, base=_make_pipe().unet)
    pipe = _make_pipe()
    pipe.load_lora_weights(str(out), adapter_name="x")
    report = verify_lora_loaded(pipe, layers, "x")
    assert report.ok and report.loaded == report.expected == len(layers) == 115


@pytest.mark.parametrize("make,family", [(_flux, "flux1"), (_sd3, "sd3")])
def test_comfy_flow_loads_in_stock_diffusers_and_round_trips(tmp_path, make, family):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    layers = _flow_layers(make)
    guessed = lora.infer_family(layers, "transformer")[0]
    assert guessed == ("flux1" if make is _flux else "sd3 or flux1")  # SD3 q/k/v/ff names are FLUX's too
    out = lora.write_adapter(layers, tmp_path / "flow.safetensors", "comfy-flow", component="transformer",
                               metadata=CARD, family=family)
    sd, md = lora.open_safetensors(out)[1:]
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert len(sd) == 2 * len(layers)
    assert md["ss_base_model_version"] == family and md["modelspec.architecture"].endswith("/lora")
    assert lora.comfy_unmapped(layers, family) == []

    back = lora.read_adapter(out)
    assert back.component == "transformer" and back.format == "comfy-flow" and set(back.layers) == set(layers)
    for p, (d, u, a) in layers.items():  # dtype kept (fp32), scale 2: folding and unfolding are exact
        bd, bu, ba = back.layers[p]
        assert ba == a and torch.equal(bd, d) and torch.equal(bu, u), p

    fresh = make()
    if make is _flux:
        state, alphas = FluxPipeline.lora_state_dict(str(out), return_alphas=True)
        FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=fresh, adapter_name="x")
    else:
        StableDiffusion3Pipeline.load_lora_into_transformer(StableDiffusion3Pipeline.lora_state_dict(str(out)),
                                                            transformer=fresh, adapter_name="x")
    report = verify_lora_loaded(fresh, layers, "x")
    assert report.ok and report.loaded == len(layers) > 15

    info = lora.inspect_lora(out)
    assert info["format"] == "comfy-flow" and info["component"] == "transformer"
    assert info["base_family"] == family and info["modules"] == len(layers)
    assert info["stepdistill"]["method"] == "lcd"


def test_onetrainer_flow_keys_round_trip_with_and_without_the_model(tmp_path):
    model = _flux()
    layers = _flow_layers(_flux)
    out = lora.write_adapter(layers, tmp_path / "ot.safetensors", "comfy-flow", component="transformer",
                               flow_keys="onetrainer", dtype=torch.float32)
    sd = lora.open_safetensors(out)[1]
    assert len(sd) == 3 * len(layers) and all(k.startswith("lora_transformer_") for k in sd)
    for base in (None, model):
        back = lora.read_adapter(out, base)
        assert back.format == "onetrainer" and set(back.layers) == set(layers)
        for p, (d, u, a) in layers.items():
            assert back.layers[p][2] == a and torch.equal(back.layers[p][0], d) and torch.equal(back.layers[p][1], u)


def test_wrong_format_for_the_component_is_refused(unet_lora, tmp_path):
    path, _ = unet_lora
    with pytest.raises(ValueError, match="transformer"):
        lora.export_lora(path, tmp_path / "x.safetensors", "comfy-flow")
    flow = _flow_layers(_sd3)
    with pytest.raises(ValueError, match="comfy-flow"):
        lora.write_adapter(flow, tmp_path / "y.safetensors", "kohya", component="transformer")
    # a module ComfyUI's SD3 table does not list (dual-attention attn2 of SD3.5) is refused unless allowed
    d, u, a = flow["transformer_blocks.0.attn.to_q"]
    odd = {**flow, "transformer_blocks.0.attn2.to_q": (d, u, a)}
    with pytest.raises(LoraFormatError, match="attn2.to_q"):
        lora.write_adapter(odd, tmp_path / "z.safetensors", "comfy-flow", component="transformer", family="sd3")
    lora.write_adapter(odd, tmp_path / "z.safetensors", "comfy-flow", component="transformer", family="sd3",
                         allow_unmapped=True)
    assert "transformer_blocks.0.attn2.to_q" in lora.read_adapter(tmp_path / "z.safetensors").layers



def test_save_trained_adapter_writes_each_family_in_its_layout(tmp_path):
    pipe = _make_pipe()
    add_lora_to_unet(pipe.unet, 4, alpha=8.0)
    perturb_lora(pipe.unet, "default", 1)
    path = lora.save_trained_adapter(tmp_path / "unet", pipe.unet, "sd_v2", {"stepdistill.method": "lcd"}, "u")
    sd, md, fmt = lora.read_lora(path)
    assert path == tmp_path / "unet" / lora.LORA_WEIGHT_NAME and fmt == "kohya"
    assert md["ss_base_model_version"] == "sd_v2" and md["modelspec.title"] == "u"

    model = _flux()
    add_lora_to_unet(model, 4, alpha=8.0, target_modules=FLUX_LORA_TARGET_MODULES)
    perturb_lora(model, "default", 2)
    path = lora.save_trained_adapter(tmp_path / "flux", model, "flux1", {"stepdistill.method": "reflow"}, "f")
    sd, md = lora.open_safetensors(path)[1:]
    assert all(k.startswith("transformer.") and v.dtype == torch.float16 for k, v in sd.items())
    assert md["ss_base_model_version"] == "flux1" and md["stepdistill.method"] == "reflow"
    back = lora.read_adapter(path)
    assert back.format == "comfy-flow" and set(back.layers) == set(unet_lora_state_dict(model))


# ----------------------------------------------------------------------------------------------- inspect


def test_inspect_describes_a_good_file(unet_lora, capsys):
    path, layers = unet_lora
    assert _cli(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "format      kohya (unet LoRA)" in text
    assert "modules     115 (37 conv, 78 linear)" in text
    assert "rank        4" in text and "alpha       8.0 (scale alpha/rank: 2.0)" in text
    assert "dtype       float16" in text and "stepdistill method lcd" in text
    assert "recommended: scheduler LCMScheduler, 4 steps, guidance 1.0" in text
    assert "to_q x14" in text and "time_emb_proj x8" in text
    assert _cli(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_family"] == "sd_v1" and info["base_family_source"].startswith("metadata")
    assert info["parameters"] == sum(d.numel() + u.numel() for d, u, _ in layers.values())
    assert info["size_bytes"] == path.stat().st_size


@pytest.mark.parametrize("dim,family", [(64, "toy"), (768, "sd_v1"), (1024, "sd_v2"), (2048, "sdxl_base_v1-0")])
def test_base_family_is_inferred_from_shapes_without_metadata(dim, family):
    layers = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
              (torch.zeros(4, dim), torch.zeros(320, 4), 4.0)}
    assert lora.infer_family(layers, "unet", {})[0] == family
    assert lora.infer_family(layers, "unet", {"ss_base_model_version": "sd_v2"})[0] == "sd_v2"


def _bad_files(tmp_path, good_path):
    from safetensors.torch import save_file

    sd, md, _ = lora.read_lora(good_path)
    files = {}
    files["is not a readable safetensors file"] = tmp_path / "garbage.safetensors"
    files["is not a readable safetensors file"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    files["holds no LoRA keys"] = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(files["holds no LoRA keys"]))
    missing = {k: v for k, v in sd.items() if not k.endswith("proj_in.lora_up.weight")}
    files["missing lora_up.weight"] = tmp_path / "missing.safetensors"
    save_file(missing, str(files["missing lora_up.weight"]))
    ranks = dict(sd)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"
    ranks[key] = torch.zeros(ranks[key].shape[0], 3, *ranks[key].shape[2:], dtype=torch.float16)
    files["mismatched ranks"] = tmp_path / "ranks.safetensors"
    save_file(ranks, str(files["mismatched ranks"]))
    files["only one of"] = tmp_path / "lonely.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(4, 8)}, str(files["only one of"]))
    files["no LoRA file"] = tmp_path / "does-not-exist.safetensors"
    return files


def test_inspect_and_export_reject_malformed_files_with_exit_code_2(unet_lora, tmp_path, capsys):
    path, _ = unet_lora
    for expected, bad in _bad_files(tmp_path, path).items():
        for argv in (["inspect", str(bad)], ["export", str(bad), str(tmp_path / "o.safetensors"), "--format", "kohya"]):
            assert _cli(argv) == 2, (expected, argv)
            err = capsys.readouterr().err
            assert err.startswith("error: ") and expected in err, (expected, err)
            assert "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_inspect_with_base_rejects_a_lora_for_another_base(unet_lora, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    path, _ = unet_lora
    wider = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=16)
    wider.save_pretrained(tmp_path / "other" / "unet")
    (tmp_path / "other" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    assert _cli(["inspect", str(path), "--base", str(tmp_path / "other")]) == 2
    assert "different base" in capsys.readouterr().err


def test_format_notes_name_the_tools_that_apply_a_layout(unet_lora, tmp_path, capsys):
    """Issue 14's measured table: the kohya layout loads fully in all four tools; a diffusers-layout file gets a
    one-line note on export and an inspect report naming what each tool drops."""
    path, _ = unet_lora
    assert _cli(["inspect", str(path)]) in (0, None)
    out = capsys.readouterr().out
    assert "loads fully diffusers, ComfyUI, A1111, kohya sd-scripts" in out
    assert _cli(["export", str(path), str(tmp_path / "d"), "--format", "diffusers"]) in (0, None)
    out = capsys.readouterr().out
    assert "A1111 and kohya sd-scripts apply none" in out and "ComfyUI drops its attention projections" in out
    assert _cli(["inspect", str(tmp_path / "d")]) in (0, None)
    out = capsys.readouterr().out
    assert "loads fully diffusers\n" in out and "A1111: no layer, silently" in out and "ComfyUI: 150/278" in out
    info = lora.inspect_lora(tmp_path / "d")
    assert info["loads_fully_in"] == ["diffusers"]
