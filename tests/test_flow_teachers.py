"""Flow-matching teachers end to end (SD3 and FLUX.1, tiny random-weight pipelines): couplings agree with the stock
pipelines, the reflow objective reads the teacher exactly as the couplings did, `train()` puts a LoRA on the
transformer that stock `StableDiffusion3Pipeline` / `FluxPipeline.load_lora_weights` load layer by layer and that
samples exactly as the trained model, resume is exact, and unsupported combinations fail with clear errors."""
from __future__ import annotations

import contextlib
import json
import types

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.methods import reflow_couplings as RC
from stepdistill.data import couplings as couplings_io
from stepdistill.models import denoiser
from stepdistill import errors
from stepdistill.models import flux
from stepdistill.models import latents
from stepdistill import ode
from stepdistill import lora
from stepdistill.models.family import default_target_modules
from stepdistill.errors import ConfigError
from stepdistill.training.config import load_config
from stepdistill.methods.base import collate_rows
from stepdistill.methods.reflow import ReflowObjective
from stepdistill.models.denoiser import model_velocity as student_velocity
from stepdistill.training.loop import train
from tiny_models import PROMPTS, t5_tokenizer, tiny_sd3_pipe

ACCEL = types.SimpleNamespace(device=torch.device("cpu"), main_process_first=contextlib.nullcontext)
K = 2          # windows; the couplings take one Euler step per window (N = K)
RES = 16       # pixels: 8x8 latents (VAE factor 2), 4x4 FLUX tokens
RANK, ALPHA = 4, 8.0  # scale 2: a lost alpha would be a 2x error


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small kernels: see tests/conftest.py


def tiny_flux_pipe(guidance_embeds: bool = False):
    """A FLUX.1-shaped pipeline with random weights: FluxTransformer2DModel (one double and one single block,
    64 = 16 x 2x2 packed input channels), a 16-channel AutoencoderKL, a tiny CLIP and a tiny T5 encoder, and
    FLUX.1-dev's scheduler (dynamic shifting)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from stepdistill.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(0)
    tok, t5tok = build_toy_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, sample_size=RES, scaling_factor=1.0, shift_factor=0.0,
                        use_quant_conv=False, use_post_quant_conv=False)
    for m in (clip, t5, transformer, vae):
        m.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=t5tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Couplings at guidance 1 for both (FLUX-schnell-like has no CFG; SD3's CFG couplings are tested in
# test_couplings), so the teacher's velocity is what the objective's model call must reproduce.
FAMILIES = {"sd3": tiny_sd3_pipe, "flux": tiny_flux_pipe}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def flow_setup(request, tmp_path_factory):
    """A saved tiny SD3 / FLUX pipeline and K=2 couplings from it (the pipeline object, its dir, the couplings dir)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    pipe = FAMILIES[family]()
    pipe.vae.register_to_config(shift_factor=0.0)  # SD3/FLUX pipelines decode with it (tiny_sd3_pipe leaves None)
    pipe.save_pretrained(root / "model")
    RC.generate_couplings(pipe, PROMPTS[:4], root / "couplings", num_steps=K, num_windows=K, guidance_scale=1.0,
                         height=RES, width=RES, model_id=str(root / "model"), progress=False)
    return family, pipe, str(root / "model"), str(root / "couplings")


def _config(model, couplings, out, **kw):
    base = dict(method="reflow", pretrained_model=model, couplings_dir=couplings, output_dir=str(out), reflow_windows=K,
                lora_rank=RANK, lora_alpha=ALPHA, train_batch_size=2, max_train_steps=3, checkpointing_steps=3,
                learning_rate=1e-2, validation_steps=0, report_to="none")
    base.update(kw)
    return load_config(None, **base)


def _packed(family, latents):
    return flux.pack_flux_latents(latents) if family == "flux" else latents


# ----------------------------------------------------------------------------------------------------
# couplings


@pytest.mark.parametrize("guidance_embeds,guidance", [(False, 1.0), (True, 3.5)])
def test_flux_couplings_equal_the_stock_pipeline(tmp_path, guidance_embeds, guidance):
    """FLUX couplings (unpacked latents) == FluxPipeline from the same (packed) noise on the same sigmas, at the end
    and at the window boundary; the embedded guidance reaches the model; packing/ids are the pipeline's own."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = tiny_flux_pipe(guidance_embeds)
    RC.generate_couplings(pipe, PROMPTS[:3], tmp_path, num_steps=4, num_windows=K, guidance_scale=guidance,
                         height=RES, width=RES, progress=False)
    cs = couplings_io.load_couplings(tmp_path)
    m = cs.manifest
    assert m["teacher"] == "flow" and m["flow_family"] == "flux" and m["latent_shape"] == [16, 8, 8]
    assert cs.flow_family == "flux" and m["guidance_embeds"] is guidance_embeds
    noise, data, st = cs.tensor("noise"), cs.tensor("data"), cs.boundary_states(torch.arange(3))
    assert torch.equal(st[:, 0], noise) and torch.equal(st[:, -1], data)
    assert torch.equal(flux.pack_flux_latents(noise), FluxPipeline._pack_latents(noise, 3, 16, 8, 8))
    assert torch.equal(flux.unpack_flux_latents(flux.pack_flux_latents(noise), 8, 8), noise)
    assert torch.equal(flux.flux_image_ids(8, 8), FluxPipeline._prepare_latent_image_ids(3, 4, 4, "cpu", torch.float32))
    assert ("guidance" in cs.conditioning(torch.tensor([0]))) is guidance_embeds

    seen = {}

    def cb(p, i, t, kwargs):
        seen[i + 1] = kwargs["latents"].clone()
        return kwargs

    stock = FluxPipeline(**pipe.components)
    stock.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                                  shift=1.0)
    with torch.no_grad():
        out = stock(PROMPTS[:3], latents=flux.pack_flux_latents(noise), sigmas=m["step_sigmas"][:-1], height=RES,
                    width=RES, guidance_scale=guidance, output_type="latent", callback_on_step_end=cb).images
    torch.testing.assert_close(flux.pack_flux_latents(data), out, atol=1e-5, rtol=0)
    torch.testing.assert_close(flux.pack_flux_latents(st[:, 1]), seen[m["boundary_grid_indices"][1]], atol=1e-5, rtol=0)
    with torch.no_grad():
        e, p, _ = pipe.encode_prompt(m["prompts"] + [""], None)
    torch.testing.assert_close(cs.prompt_embeds, e)
    torch.testing.assert_close(cs.pooled, p)


def test_flux_dynamic_shift_spacing_and_guidance_errors(tmp_path):
    """spacing='teacher' places FLUX's steps where its own dynamically shifted scheduler does (mu from the image
    token count); guidance without a guidance embedding (true CFG) is refused with the fix in the message."""
    pipe = tiny_flux_pipe()
    teacher = denoiser.TeacherFlow(pipe, RES, RES)
    grid, idx = ode.coupling_grid(4, 1, 1.0, "teacher", teacher.clock)
    sched = pipe.scheduler
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)  # calculate_shift(16 image tokens)
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    torch.testing.assert_close(grid.float(), sched.sigmas.float(), atol=1e-6, rtol=0)
    assert teacher.shift() == pytest.approx(float(torch.tensor(mu).double().exp()))
    with pytest.raises(errors.CouplingError, match="guidance_scale=1"):
        RC.generate_couplings(pipe, PROMPTS[:1], tmp_path, num_steps=2, guidance_scale=3.5, height=RES, width=RES)
    with pytest.raises(errors.ModelError, match="divisible by 4"):
        denoiser.TeacherFlow(pipe, 18, 18)


def _assert_objective_reads_the_teacher(obj, model):
    idx = torch.arange(4)
    st, b, cond = obj.couplings.boundary_states(idx), obj.boundaries, collate_rows(obj.dataset, idx)["cond"]
    for k in range(K):
        target = (st[:, k] - st[:, k + 1]) / float(b[k] - b[k + 1])
        with torch.no_grad():
            got = student_velocity(model, st[:, k], b[k].expand(4), cond, prediction_type="flow",
                                   flow_family=obj.flow_family)
        torch.testing.assert_close(got, target, atol=1e-4, rtol=0, msg=f"window {k}")


def test_objective_reads_the_teacher_as_the_couplings_do(flow_setup):
    """With one Euler step per window, window k's straight target is the teacher's own velocity at its start state:
    the objective's student_velocity of the LoRA-free teacher must reproduce it (conventions, packing, timestep
    scale and conditioning all agree between coupling generation and training)."""
    family, pipe, model, couplings = flow_setup
    obj = ReflowObjective(_config(model, couplings, "unused"), pipe, ACCEL)
    assert obj.flow_family == family and obj.prediction_type == "flow" and obj.resolution == RES
    _assert_objective_reads_the_teacher(obj, pipe.transformer)


def test_flux_dev_embedded_guidance_is_the_students(tmp_path):
    """Guidance-distilled FLUX (guidance_embeds): the couplings' guidance is fed to the student in training and is
    its recommended sampling guidance; a model without the embedding refuses those couplings."""
    pipe = tiny_flux_pipe(guidance_embeds=True)
    RC.generate_couplings(pipe, PROMPTS[:4], tmp_path, num_steps=K, num_windows=K, guidance_scale=3.5, height=RES,
                         width=RES, progress=False)
    obj = ReflowObjective(_config("tiny-flux-dev", str(tmp_path), "unused"), pipe, ACCEL)
    assert obj.student_guidance == 3.5 and obj.card(obj.config)["recommended_guidance"] == 3.5
    assert collate_rows(obj.dataset, range(2))["cond"]["guidance"].tolist() == [3.5, 3.5]
    _assert_objective_reads_the_teacher(obj, pipe.transformer)
    with pytest.raises(ConfigError, match="guidance embedding"):
        ReflowObjective(_config("tiny-flux", str(tmp_path), "unused"), tiny_flux_pipe(), ACCEL)


def test_mismatched_family_and_lcd_are_refused(flow_setup, tmp_path):
    family, pipe, model, couplings = flow_setup
    other = tiny_flux_pipe() if family == "sd3" else tiny_sd3_pipe()
    with pytest.raises(ConfigError, match=f"come from a {family} teacher"):
        ReflowObjective(_config(model, couplings, "unused"), other, ACCEL)
    with pytest.raises(ConfigError, match="epsilon / v-prediction UNet.*method='reflow'"):
        train(load_config(None, method="lcd", pretrained_model=model, output_dir=str(tmp_path / "lcd"),
                          report_to="none"))


# ----------------------------------------------------------------------------------------------------
# training and the LoRA in stock diffusers


def _student_pipe(family, model_dir, card):
    """The stock pipeline of the family from ``model_dir`` with the card's student scheduler."""
    import importlib

    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(model_dir)  # float32
    pipe.set_progress_bar_config(disable=True)
    sched = getattr(importlib.import_module(card["scheduler_module"]), card["scheduler"])
    pipe.scheduler = sched.from_config(pipe.scheduler.config, **card["scheduler_kwargs"])
    return pipe


def _sample(family, pipe, noise, steps):
    with torch.no_grad():
        return pipe(PROMPTS[:2], latents=_packed(family, noise), num_inference_steps=steps, guidance_scale=1.0,
                    height=RES, width=RES, output_type="latent").images


def test_reflow_lora_on_the_transformer_loads_in_stock_diffusers(flow_setup, tmp_path):
    """train() -> pytorch_lora_weights.safetensors (transformer.* keys, reflow metadata) -> stock
    load_lora_weights: every trained layer arrives with its delta; 2-step samples of the loaded pipeline equal the
    trained model's (LoRA state from the final checkpoint, fp32) and differ from the base model's."""
    from peft.utils import set_peft_model_state_dict

    family, _, model, couplings = flow_setup
    out = train(_config(model, couplings, tmp_path / "run", validation_prompts=["a red circle"],
                        validation_step_counts=[2]))
    assert (out / "validation" / "step-000003.png").exists()  # the student sampler in the stock pipeline
    sd, md, fmt = lora.read_lora(out)
    assert fmt == "diffusers" and all(k.startswith("transformer.") for k in sd)
    assert md["stepdistill.method"] == "reflow" and md["stepdistill.num_windows"] == str(K)
    assert md["ss_base_model_version"] == {"sd3": "sd3", "flux": "flux1"}[family]
    assert md["stepdistill.folded_alpha"] == str(ALPHA)
    card = json.loads((out / "stepdistill_card.json").read_text())
    want_sched = "FlowMatchEulerDiscreteScheduler" if family == "flux" else "PiecewiseRectifiedFlowScheduler"
    assert card["scheduler"] == want_sched and card["recommended_steps"] == K and card["recommended_guidance"] == 1.0

    state = load_file(str(out / "checkpoint-3" / "lora_state.safetensors"))
    trained = {p: (d, u, ALPHA) for p, (d, u, _) in
               lora.pairs_to_layers(state, ".lora_A.weight", ".lora_B.weight", "checkpoint").items()}
    base = _student_pipe(family, model, card)
    targets = default_target_modules(base.transformer)
    expected = {n for n, mod in base.transformer.named_modules()
                if isinstance(mod, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)}
    assert set(trained) == expected and len(expected) >= (14 if family == "flux" else 9)  # SD3: 1 pre-only block
    untrained = {p for p, (_, u, _) in trained.items() if not u.abs().max() > 0}
    # SD3's last block is context_pre_only: its text queries feed only discarded text outputs (no gradient)
    assert untrained == ({"transformer_blocks.0.attn.add_q_proj"} if family == "sd3" else set())

    noise = latents.seeded_noise(range(2), 123, (16, 8, 8))
    base_out = _sample(family, base, noise, K)
    lora.add_lora_to_unet(base.transformer, RANK, ALPHA, targets)  # the trained model: same adapter, fp32 state
    set_peft_model_state_dict(base.transformer, state)
    trained_out = _sample(family, base, noise, K)

    stock = _student_pipe(family, model, card)
    stock.load_lora_weights(str(out), adapter_name="reflow")
    report = lora.verify_lora_loaded(stock, trained, "reflow")
    assert report.ok and report.loaded == len(trained)
    report = lora.verify_lora_loaded(stock, out, "reflow")  # the file itself, read back
    assert report.ok and report.loaded == len(trained)
    loaded_out = _sample(family, stock, noise, K)
    err = (loaded_out - trained_out).abs().max().item()
    effect = (trained_out - base_out).abs().max().item()
    assert err < 2e-3 * effect, (err, effect)  # fp16 storage of the LoRA only


@pytest.mark.parametrize("flow_setup", ["flux"], indirect=True)  # the loop is family-independent
def test_flow_resume_is_exact(flow_setup, tmp_path):
    from resume_check import check_resume_is_exact

    _, _, model, couplings = flow_setup
    full, resumed = check_resume_is_exact(lambda out, **kw: _config(model, couplings, out, **kw), tmp_path)
    key = "transformer.proj_out.lora_A.weight"
    assert torch.equal(load_file(str(full / "pytorch_lora_weights.safetensors"))[key],
                       load_file(str(resumed / "pytorch_lora_weights.safetensors"))[key])
