"""Component configs of the real SD1.5, SD2.x and SDXL base models (and the SD3.5 / Flux.1 transformers,
TRANSFORMER_CONFIGS, for counting): for counting, benchmarks, the
random-weight real-size pipelines (tiny.build_random_pipeline, `random:sd15` / `random:sdxl`) and
loading A1111 / Civitai single-file checkpoints offline (`pipeline_configs`, single_file.py).

Copied from the `unet/config.json` files of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1 (and -2-base) and stabilityai/stable-diffusion-xl-base-1.0
(fields that matter for the module layout). Instantiate on the meta device to count modules
without memory:

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
    # SD2.x: SD1.5's blocks with a 1024-wide OpenCLIP-H context, linear proj_in/out and 64-channel
    # heads (diffusers' create_unet_diffusers_config_from_ldm: model_channels 320 / num_head_channels
    # 64 × channel_mult (1, 2, 4, 4)). 2.1 at 768 px (v-prediction) upcasts attention to fp32, as
    # diffusers' converter sets for 2.1 (its fp16 attention overflows); 2.0-base is 512 px, epsilon.
    "sd21": dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=True, upcast_attention=True,
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
UNET_CONFIGS["sd2-base"] = dict(UNET_CONFIGS["sd21"], sample_size=64, upcast_attention=False)

# The other components, from the same repositories' vae/, text_encoder/, text_encoder_2/ and
# scheduler/ config files (fields that differ from the library defaults).
VAE_CONFIGS = {
    arch: dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=size, scaling_factor=factor, force_upcast=True)
    for arch, size, factor in (("sd15", 512, 0.18215), ("sd21", 768, 0.18215), ("sd2-base", 512, 0.18215),
                               ("sdxl", 1024, 0.13025))
}

# CLIP ViT-L/14's text tower (SD1.5's encoder and SDXL's first), OpenCLIP ViT-H/14's (SD2.x's) and
# OpenCLIP ViT-bigG/14's (SDXL's second).
# bos/eos/pad are the ids of the real CLIP tokenizer (tiny.clip_tokenizer).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu")
# SD2.x conditions on the penultimate of ViT-H's 24 layers, so diffusers keeps 23 (its converter drops
# resblocks.23: SD_2_TEXT_ENCODER_KEYS_TO_IGNORE).
CLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
              projection_dim=512, hidden_act="gelu")
TEXT_ENCODER_CONFIGS = {"sd15": (CLIP_L,), "sd21": (CLIP_H,), "sd2-base": (CLIP_H,), "sdxl": (CLIP_L, CLIP_BIGG)}

# The tokenizers' pad token: CLIP's <|endoftext|> for the OpenAI encoders; "!" (id 0) for the OpenCLIP
# ones, whose tokenizer pads with zeros (open_clip.tokenize; diffusers' converter loads SDXL's second
# tokenizer with pad_token="!").
PAD_TOKENS = {"sd15": ("<|endoftext|>",), "sd21": ("!",), "sd2-base": ("!",), "sdxl": ("<|endoftext|>", "!")}

SCHEDULER_CONFIGS = {
    "sd15": ("PNDMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                                   steps_offset=1)),
    # diffusers' single-file rule for SD2.x: v-prediction, except SD2.0-base (epsilon)
    "sd21": ("DDIMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1, prediction_type="v_prediction")),
    "sdxl": ("EulerDiscreteScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                            interpolation_type="linear", use_karras_sigmas=False)),
}
SCHEDULER_CONFIGS["sd2-base"] = (SCHEDULER_CONFIGS["sd21"][0],
                                 dict(SCHEDULER_CONFIGS["sd21"][1], prediction_type="epsilon"))

PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sd21": "StableDiffusionPipeline",
                    "sd2-base": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def pipeline_configs(arch: str) -> dict[str, dict]:
    """The configs a diffusers folder of this base holds, without weights or vocabulary: what
    single_file.write_config_folder turns into the `config=` folder of from_single_file.

    {"model_index": …, "unet": …, "vae": …, "text_encoder": …, ["text_encoder_2": …,]
     "scheduler": …, "tokenizer": {"pad_token", "model_max_length"}, ["tokenizer_2": …]}
    """
    from transformers import CLIPTextConfig

    xl = arch == "sdxl"
    encoders = [("text_encoder", "CLIPTextModel")] + ([("text_encoder_2", "CLIPTextModelWithProjection")] if xl else [])
    tokenizers = ["tokenizer"] + (["tokenizer_2"] if xl else [])
    scheduler, scheduler_config = SCHEDULER_CONFIGS[arch]
    model_index = {"_class_name": PIPELINE_CLASSES[arch], "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", scheduler],
                   **{name: ["transformers", cls] for name, cls in encoders},
                   **{name: ["transformers", "CLIPTokenizer"] for name in tokenizers},
                   "feature_extractor": [None, None]}
    model_index.update({"image_encoder": [None, None], "force_zeros_for_empty_prompt": True} if xl else
                       {"safety_checker": [None, None], "requires_safety_checker": False})
    return {
        "model_index": model_index,
        "unet": {"_class_name": "UNet2DConditionModel", **UNET_CONFIGS[arch]},
        "vae": {"_class_name": "AutoencoderKL", **VAE_CONFIGS[arch]},
        **{name: CLIPTextConfig(**config, architectures=[cls]).to_dict()
           for (name, cls), config in zip(encoders, TEXT_ENCODER_CONFIGS[arch])},
        "scheduler": {"_class_name": scheduler, **scheduler_config},
        **{name: {"pad_token": pad, "model_max_length": 77} for name, pad in zip(tokenizers, PAD_TOKENS[arch])},
    }


# -- the diffusion transformers, for counting on the meta device (no random full-size build: Flux.1-dev
# alone is 11.9 B parameters). From the transformer/config.json files of
# stabilityai/stable-diffusion-3.5-medium (MMDiT-X: a second image attention, attn2, in its first 13
# blocks), stabilityai/stable-diffusion-3.5-large and black-forest-labs/FLUX.1-dev; tests check the
# parameter counts against the published 2.24 B / 8.1 B / 11.9 B.
TRANSFORMER_CONFIGS = {
    "sd35-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "sd35-large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "flux-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
}


# google/t5-v1_1-xxl's encoder: SD3's text_encoder_3 and Flux's text_encoder_2
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
# the 16-channel VAE of SD3 and Flux (vae/config.json): SD1's block layout, 16 latent channels, no quant convs
DIT_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, use_quant_conv=False,
               use_post_quant_conv=False)
# each family's text encoders, by (class, config)
DIT_TEXT_ENCODERS = {
    "sd3": (("CLIPTextModelWithProjection", CLIP_L), ("CLIPTextModelWithProjection", CLIP_BIGG),
            ("T5EncoderModel", T5_XXL)),
    "flux": (("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)),
}


def meta_transformer(name: str):
    """A full-size SD3.5 / Flux.1 transformer on the meta device: its modules and shapes, no memory."""
    import diffusers
    import torch

    cls, config = TRANSFORMER_CONFIGS[name]
    with torch.device("meta"):
        return getattr(diffusers, cls)(**config)
