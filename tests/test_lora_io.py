"""LoRA file I/O against STOCK diffusers: what is saved is what a fresh pipeline loads, layer by layer."""
from __future__ import annotations

import datetime
import os

import pytest
import torch

from stepdistill.lora import (
    LORA_WEIGHT_NAME,
    LoraFormatError,
    LoraLoadError,
    add_lora_to_unet,
    from_kohya,
    lora_delta,
    read_lora,
    read_lora_layers,
    save_lora,
    to_kohya,
    unet_lora_state_dict,
    verify_lora_loaded,
)
from stepdistill.models.family import LCM_LORA_TARGET_MODULES
from tiny_models import perturb_lora

RANK, ALPHA = 4, 8.0  # alpha != rank on purpose: a lost alpha shows up as a 2x delta error


@pytest.fixture(scope="module")
def tokenizer():
    from stepdistill.toy.tokenizer import build_toy_tokenizer

    return build_toy_tokenizer()


@pytest.fixture(scope="module")
def make_pipe(tokenizer):
    from diffusers import StableDiffusionPipeline

    from stepdistill.toy.models import build_scheduler, build_text_encoder, build_unet, build_vae

    def make(seed: int = 0, unet=None):
        torch.manual_seed(seed)  # same seed -> same base weights, so a fresh pipeline is the same base model
        tok = tokenizer
        te = build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        return StableDiffusionPipeline(
            vae=build_vae(), text_encoder=te, tokenizer=tok, unet=unet if unet is not None else build_unet(),
            scheduler=build_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    return make


def unet_out(unet):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 250]), ctx).sample


@pytest.fixture(scope="module")
def trained(make_pipe):
    """A pipeline whose UNet carries a 'default' LCM-target LoRA with random non-zero weights."""
    pipe = make_pipe()
    base_out = unet_out(pipe.unet)
    add_lora_to_unet(pipe.unet, RANK, alpha=ALPHA)
    perturb_lora(pipe.unet, "default", seed=1)
    layers = unet_lora_state_dict(pipe.unet)
    return pipe, layers, base_out, unet_out(pipe.unet)


def test_add_lora_targets_every_lcm_module_type(trained):
    pipe, layers, base_out, lora_out = trained
    for target in LCM_LORA_TARGET_MODULES:
        assert any(p == target or p.endswith("." + target) for p in layers), target
    assert len(layers) == 115
    assert all(not p.startswith(("base_model", "unet.")) and "default" not in p for p in layers)
    down, up, alpha = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert down.shape == (RANK, 48) and up.shape == (48, RANK) and alpha == ALPHA
    down, up, _ = layers["down_blocks.0.resnets.0.conv1"]  # conv: down (r, in, kh, kw), up (out, r, 1, 1)
    assert down.shape == (RANK, 48, 3, 3) and up.shape == (48, RANK, 1, 1)
    # only the adapter trains, and it changes the output
    assert all(("lora_" in n) == p.requires_grad for n, p in pipe.unet.named_parameters())
    assert (lora_out - base_out).abs().max() > 0.1


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_saved_lora_arrives_intact_in_stock_diffusers(trained, make_pipe, tmp_path, fmt):
    pipe, layers, base_out, lora_out = trained
    path = save_lora(
        tmp_path, pipe.unet, format=fmt,
        metadata={"stepdistill.method": "lcm", "stepdistill.recommended_steps": 4, "stepdistill.guidance": [1, 2]},
    )
    assert path == tmp_path / LORA_WEIGHT_NAME and path.is_file()
    assert os.listdir(tmp_path) == [LORA_WEIGHT_NAME]  # atomic write left no temp file behind

    sd, md, detected = read_lora(tmp_path)
    assert detected == fmt
    assert all(v.dtype == torch.float16 for v in sd.values())
    if fmt == "kohya":
        assert len(sd) == 3 * len(layers)
        assert all(k.startswith("lora_unet_") for k in sd)
        alpha = sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]
        assert alpha.ndim == 0 and alpha.item() == ALPHA
        assert md["ss_network_alpha"] == "8.0"
    else:
        assert len(sd) == 2 * len(layers)
        assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
        assert md["ss_network_alpha"] == str(float(RANK))  # alpha/r folded into lora_B
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == str(RANK)
    assert md["ss_base_model_version"] == "sd_v1"
    assert md["modelspec.sai_model_spec"] == "1.0.0"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.implementation"] and md["modelspec.title"]
    assert datetime.datetime.fromisoformat(md["modelspec.date"]).tzinfo is not None
    assert md["stepdistill.method"] == "lcm" and md["stepdistill.recommended_steps"] == "4"
    assert md["stepdistill.guidance"] == "[1, 2]"

    fresh = make_pipe()
    assert torch.equal(unet_out(fresh.unet), base_out)  # same base model
    fresh.load_lora_weights(str(tmp_path), adapter_name="lcm")
    report = verify_lora_loaded(fresh, layers, "lcm")
    assert report.ok and report.loaded == report.expected == len(layers)
    assert report.max_rel_err < 5e-3  # fp16 storage

    # independent layer-by-layer check of the effective deltas (not through verify_lora_loaded)
    for path_, (down, up, alpha) in layers.items():
        m = fresh.unet.get_submodule(path_)
        got = m.scaling["lcm"] * (m.lora_B["lcm"].weight.flatten(1) @ m.lora_A["lcm"].weight.flatten(1))
        want = lora_delta(down, up, alpha)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * want.abs().max().item())

    out = unet_out(fresh.unet)
    assert (out - lora_out).abs().max() < 1e-2 * lora_out.abs().max()
    assert (out - base_out).abs().max() > 50 * (out - lora_out).abs().max()  # the comparison is meaningful

    # the file also reads back into the same layers (diffusers: alpha folded, so compare deltas)
    back = read_lora_layers(path, fresh.unet)
    assert set(back) == set(layers)
    for p_, (d, u, a) in back.items():
        want = lora_delta(*layers[p_])
        assert (lora_delta(d, u, a) - want).abs().max() <= 2e-3 * want.abs().max()


def test_kohya_from_to_roundtrip_is_identical(trained, tmp_path):
    pipe, layers, _, _ = trained
    sd, _, _ = read_lora(save_lora(tmp_path / "a.safetensors", pipe.unet))
    for unet in (pipe.unet, None):  # matched against the model's module names, or the name heuristic
        back = from_kohya(sd, unet)
        assert set(back) == set(layers)
        again = to_kohya(back)
        assert again.keys() == sd.keys()
        for k in sd:
            assert again[k].dtype == sd[k].dtype and again[k].shape == sd[k].shape and torch.equal(again[k], sd[k]), k
    with pytest.raises(LoraFormatError, match="pass unet="):
        from_kohya({k.replace("attentions", "attentionz"): v for k, v in sd.items()})


def test_from_kohya_rejects_lora_of_another_base(trained):
    from diffusers import UNet2DConditionModel

    pipe, layers, _, _ = trained
    sd = to_kohya(layers)
    wider = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=16,
    )
    with pytest.raises(LoraFormatError, match="do not match the base model") as e:
        from_kohya(sd, wider)
    assert "different base" in str(e.value) and "wrong shape" in str(e.value)
    assert "down_blocks.0.attentions.0.proj_in" in str(e.value)

    extra = dict(sd)
    name = "lora_unet_down_blocks_7_attentions_0_proj_in"
    extra[name + ".lora_down.weight"] = torch.zeros(RANK, 32, 1, 1, dtype=torch.float16)
    extra[name + ".lora_up.weight"] = torch.zeros(32, RANK, 1, 1, dtype=torch.float16)
    extra[name + ".alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    with pytest.raises(LoraFormatError, match="do not match the base model") as e:
        from_kohya(extra, pipe.unet)
    assert name in str(e.value) and "different base" in str(e.value)
    assert "1 of 116 layers" in str(e.value)


def test_read_lora_rejects_malformed_files(trained, tmp_path):
    from safetensors.torch import save_file

    pipe, layers, _, _ = trained
    not_lora = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in list(pipe.unet.state_dict().items())[:5]}, str(not_lora))
    with pytest.raises(LoraFormatError, match="holds no LoRA keys"):
        read_lora(not_lora)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(LoraFormatError, match="not a readable safetensors file"):
        read_lora(junk)

    sd = to_kohya(layers)
    key = "lora_unet_mid_block_resnets_0_conv1"
    no_alpha = {k: v for k, v in sd.items() if k != key + ".alpha"}
    save_file(no_alpha, str(tmp_path / "no_alpha.safetensors"))
    with pytest.raises(LoraFormatError, match=rf"{key}: missing alpha"):
        read_lora(tmp_path / "no_alpha.safetensors")

    bad_rank = dict(sd)
    bad_rank[key + ".lora_up.weight"] = torch.zeros(64, RANK + 1, 1, 1, dtype=torch.float16)
    save_file(bad_rank, str(tmp_path / "bad_rank.safetensors"))
    with pytest.raises(LoraFormatError, match="mismatched ranks"):
        read_lora(tmp_path / "bad_rank.safetensors")

    with pytest.raises(FileNotFoundError):
        read_lora(tmp_path / "missing")


def test_two_adapters_with_set_adapters(trained, make_pipe, tmp_path):
    pipe, layers, _, _ = trained
    save_lora(tmp_path / "lcm", pipe.unet, metadata={"stepdistill.method": "lcm"})

    style_src = make_pipe()  # a "style" LoRA: other rank, other targets, other weights
    add_lora_to_unet(style_src.unet, 2, target_modules=["to_k", "to_v", "ff.net.2"], adapter_name="style")
    perturb_lora(style_src.unet, "style", seed=2, std=0.2)
    save_lora(tmp_path / "style", style_src.unet, adapter_name="style")

    p = make_pipe()
    p.load_lora_weights(str(tmp_path / "lcm"), adapter_name="a")
    p.load_lora_weights(str(tmp_path / "style"), adapter_name="b")
    p.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    p.set_progress_bar_config(disable=True)
    both = unet_out(p.unet)
    images = p("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()

    # verification uses the intrinsic scale: set_adapters weights do not make a good file look broken
    assert verify_lora_loaded(p, layers, "a").ok
    assert verify_lora_loaded(p, tmp_path / "style", "b").ok

    p.set_adapters(["a", "b"], adapter_weights=[1.0, 0.0])
    a_only = unet_out(p.unet)
    p.set_adapters(["a"])
    torch.testing.assert_close(unet_out(p.unet), a_only)
    assert (both - a_only).abs().max() > 1e-3


def test_state_dict_survives_adapter_names_that_break_peft(make_pipe):
    # peft's get_peft_model_state_dict(adapter_name="default") drops keys containing ".0." when another adapter
    # is named "0"; unet_lora_state_dict must still return every layer, with the right weights.
    p = make_pipe()
    add_lora_to_unet(p.unet, 2, target_modules=["to_q", "proj_in", "conv1"], adapter_name="default")
    add_lora_to_unet(p.unet, 3, alpha=6, target_modules=["to_q", "proj_in", "conv1"], adapter_name="0")
    perturb_lora(p.unet, "default", seed=3)
    for name, rank, alpha in (("default", 2, 2.0), ("0", 3, 6.0)):
        layers = unet_lora_state_dict(p.unet, name)
        assert len(layers) == 29
        for path, (down, up, a) in layers.items():
            m = p.unet.get_submodule(path)
            assert down.shape[0] == rank and a == alpha
            assert torch.equal(down, m.lora_A[name].weight) and torch.equal(up, m.lora_B[name].weight)


def test_verify_reports_dropped_and_corrupted_layers(trained, make_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    pipe, layers, _, _ = trained
    save_lora(tmp_path / "good", pipe.unet)
    p = make_pipe()
    p.load_lora_weights(str(tmp_path / "good"), adapter_name="x")
    victim = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"
    with torch.no_grad():
        p.unet.get_submodule(victim).lora_B["x"].weight.mul_(1.1)
    with pytest.raises(LoraLoadError, match="1 MISMATCHED") as e:
        verify_lora_loaded(p, layers, "x")
    assert [m for m, _ in e.value.report.mismatched] == [victim] and not e.value.report.dropped

    # peft's own key layout (PeftModel.save_pretrained): read_lora understands it, stock diffusers loads nothing.
    from safetensors.torch import save_file

    (tmp_path / "peft").mkdir()
    peft_sd = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    save_file(peft_sd, str(tmp_path / "peft" / LORA_WEIGHT_NAME))
    assert read_lora(tmp_path / "peft")[2] == "peft"
    assert set(read_lora_layers(tmp_path / "peft", pipe.unet)) == set(layers)
    q = make_pipe()
    q.load_lora_weights(str(tmp_path / "peft"), adapter_name="z")
    report = verify_lora_loaded(q, layers, "z", raise_on_error=False)
    assert report.ok or len(report.dropped) == len(layers)  # all-or-nothing; nothing in diffusers 0.42.1

    # A real dangerous save path: convert_state_dict_to_diffusers keys lose the attention layers on load.
    legacy = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "legacy"), unet_lora_layers=legacy)
    assert read_lora(tmp_path / "legacy")[2] == "diffusers_legacy"
    q = make_pipe()
    q.load_lora_weights(str(tmp_path / "legacy"), adapter_name="y")
    report = verify_lora_loaded(q, layers, "y", raise_on_error=False)
    if report.ok:
        pytest.skip("this diffusers version loads convert_state_dict_to_diffusers files intact")
    assert any(".attn1.to_q" in d for d in report.dropped)
    with pytest.raises(LoraLoadError, match="DROPPED"):
        verify_lora_loaded(q, layers, "y")
