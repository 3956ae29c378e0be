"""Component configs of the real SD1.5 and SDXL base models: for counting, benchmarks and the
random-weight real-size pipelines (tiny.build_random_pipeline, `random:sd15` / `random:sdxl`).

Copied from the `unet/config.json` files of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 (fields that matter for the module
layout). Instantiate on the meta device to count modules without memory:

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"])
"""

UNET_CONFIGS = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}

# The other components, from the same repositories' vae/, text_encoder/, text_encoder_2/ and
# scheduler/ config files (fields that differ from the library defaults).
VAE_CONFIGS = {
    arch: dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=size, scaling_factor=factor, force_upcast=True)
    for arch, size, factor in (("sd15", 512, 0.18215), ("sdxl", 1024, 0.13025))
}

# CLIP ViT-L/14's text tower (SD1.5's encoder and SDXL's first) and OpenCLIP ViT-bigG/14's (SDXL's second).
# bos/eos/pad are the ids of the real CLIP tokenizer (tiny.clip_tokenizer).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu")

SCHEDULER_CONFIGS = {
    "sd15": ("PNDMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                                   steps_offset=1)),
    "sdxl": ("EulerDiscreteScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                            interpolation_type="linear", use_karras_sigmas=False)),
}
