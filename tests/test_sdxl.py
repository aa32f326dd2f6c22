"""SDXL mechanics of LCD: two text encoders, pooled embeddings and add_time_ids come from the cache, and the
LoRA loads in a stock StableDiffusionXLPipeline. A tiny SDXL-shaped pipeline with random weights."""
import pytest
import torch


@pytest.fixture
def tiny_sdxl_dir(tmp_path):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stepdistill.toy.models import SD_SCHEDULER_CONFIG
    from stepdistill.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(0)
    tok = build_toy_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    te_cfg = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  vocab_size=len(tok), projection_dim=32, max_position_embeddings=77)
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**te_cfg)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg)), tokenizer_2=tok)
    path = tmp_path / "tiny-sdxl"
    pipe.save_pretrained(path)
    return str(path)


def test_lcd_on_sdxl_caches_pooled_and_time_ids_and_loads_in_stock_sdxl(tiny_sdxl_dir, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from stepdistill import lora
    from stepdistill.training.config import load_config
    from stepdistill.data.cache import load_cache
    from stepdistill.training.loop import train

    out = train(load_config(None, pretrained_model=tiny_sdxl_dir, output_dir=str(tmp_path / "out"),
                            train_data="toy:16", resolution=16, lora_rank=4, train_batch_size=2, max_train_steps=2,
                            checkpointing_steps=0, validation_steps=0, report_to="none", w_min=1.0, w_max=2.0))
    cache = load_cache(out / "cache")
    row = cache.row(0)
    assert row["text_embeds"].shape == (32,) and cache.uncond["text_embeds"].shape == (32,)
    assert row["encoder_hidden_states"].shape[-1] == 64  # both encoders' hidden states, concatenated
    assert len(cache) == 16 and row["time_ids"].tolist() == [16, 16, 0, 0, 16, 16]

    file = out / "pytorch_lora_weights.safetensors"
    _, metadata, fmt = lora.read_lora(file)
    assert fmt == "kohya" and metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    stock.load_lora_weights(str(out), adapter_name="lcm")
    report = lora.verify_lora_loaded(stock, file, "lcm")
    assert report.loaded == report.expected > 10
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    image = stock("a small red circle", num_inference_steps=2, guidance_scale=1.0, height=16, width=16,
                  output_type="np").images
    assert image.shape == (1, 16, 16, 3)
