"""Tiny models built from configs with the real transformers classes, saved with
``save_pretrained`` so tests load them through the same path as a user's model directory."""

from pathlib import Path

from transformers import CLIPTextConfig, CLIPTextModel

from dreamportrait.world.tokenizer import write_clip_tokenizer as write_words_tokenizer

WORDS = ["a", "portrait", "of", "bald", "man", "woman", "with", "red", "blond", "black", "hair", "glasses", "hat",
         "beard", "and", "smiling", "front", "side", "back", "view"]  # the last four: guidance's view suffixes


def write_clip_tokenizer(directory: Path):
    """A CLIP BPE tokenizer whose small vocabulary spells WORDS as single tokens."""
    return write_words_tokenizer(directory, WORDS)


def write_tiny_clip(directory: Path, hidden_size: int = 32, layout: str = "flat", **config) -> Path:
    """A tiny CLIP text model + tokenizer in ``directory`` (``layout="flat"``) or in its
    ``tokenizer/`` and ``text_encoder/`` subfolders, as in a Stable Diffusion checkpoint;
    ``config``: further ``CLIPTextConfig`` entries (e.g. ``text_encoding``)."""
    tokenizer_dir = directory if layout == "flat" else directory / "tokenizer"
    model_dir = directory if layout == "flat" else directory / "text_encoder"
    tokenizer = write_clip_tokenizer(tokenizer_dir)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **config)
    CLIPTextModel(config).save_pretrained(model_dir)
    return directory


def write_tiny_stable_diffusion(directory: Path, latent: bool = True, prediction_type: str = "epsilon",
                                **clip_config) -> Path:
    """A Stable Diffusion-layout directory (unet/, scheduler/, tokenizer/, text_encoder/, and vae/
    when ``latent``) of tiny models: 32² images, 16² x 4 latents (or 32² x 3 pixels);
    ``clip_config``: further ``CLIPTextConfig`` entries of its text encoder (:func:`write_tiny_clip`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    write_tiny_clip(directory, layout="stable-diffusion", **clip_config)
    channels = 4 if latent else 3
    UNet2DConditionModel(
        sample_size=16 if latent else 32, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8,
    ).save_pretrained(directory / "unet")
    if latent:
        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32,
        ).save_pretrained(directory / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type=prediction_type).save_pretrained(directory / "scheduler")
    return directory
