"""Tiny FLUX.1 and Qwen-Image pipelines built from config (tokenizers included), saved to disk."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from tests.flux_factories import TINY_FLUX_CONFIG, tiny_flux
from tests.qwenimage_factories import TINY_QWEN_CONFIG, tiny_qwenimage

# One token per printable character: every prompt and chat template tokenizes without a hub file.
CHARACTERS = sorted(set(string.printable) - set(string.whitespace) | {" ", "\n"})
CLIP_MAX_LENGTH = 16  # FluxPipeline pads CLIP prompts to the tokenizer's model_max_length


def tiny_clip(dim: int, max_length: int = CLIP_MAX_LENGTH):
    """A one-layer CLIP text encoder of width ``dim`` and its character tokenizer (prompts
    padded to ``max_length``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {c: i for i, c in enumerate(CHARACTERS)}
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate(CHARACTERS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=dim, intermediate_size=2 * dim,
                            num_hidden_layers=1, num_attention_heads=2, projection_dim=dim,
                            max_position_embeddings=max_length,
                            bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"])
    return CLIPTextModel(config).eval(), tokenizer


def _t5(dim: int):
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in CHARACTERS if c != " "]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    config = T5Config(vocab_size=len(pieces), d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval(), tokenizer


def tiny_flux_pipeline(guidance_embeds: bool = True):
    """A FluxPipeline of random tiny parts (FLUX.1-dev's embedded guidance by default)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    clip, clip_tokenizer = tiny_clip(TINY_FLUX_CONFIG["pooled_projection_dim"])
    t5, t5_tokenizer = _t5(TINY_FLUX_CONFIG["joint_attention_dim"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=TINY_FLUX_CONFIG["in_channels"] // 4,
                        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                        transformer=tiny_flux(guidance_embeds=guidance_embeds))


def saved_tiny_flux_pipeline(folder: Path, **kwargs) -> Path:
    """:func:`tiny_flux_pipeline` saved as a diffusers folder (what ``--model`` takes)."""
    path = folder / "tiny-flux"
    tiny_flux_pipeline(**kwargs).save_pretrained(path)
    return path


def _qwen_vl(dim: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(CHARACTERS)}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None,
                               pad_token="<|endoftext|>")
    text = dict(vocab_size=len(vocab), hidden_size=dim, intermediate_size=2 * dim,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                max_position_embeddings=1024)
    vision = dict(depth=1, hidden_size=dim, intermediate_size=dim, num_heads=2,
                  out_hidden_size=dim, fullatt_block_indexes=[0], window_size=8)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=len(vocab),
                              hidden_size=dim)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer


def tiny_qwenimage_pipeline():
    """A QwenImagePipeline of random tiny parts."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    encoder, tokenizer = _qwen_vl(TINY_QWEN_CONFIG["joint_attention_dim"])
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=TINY_QWEN_CONFIG["out_channels"],
                                 dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=encoder, tokenizer=tokenizer,
                             transformer=tiny_qwenimage())


def saved_tiny_qwenimage_pipeline(folder: Path) -> Path:
    """:func:`tiny_qwenimage_pipeline` saved as a diffusers folder (what ``--model`` takes)."""
    path = folder / "tiny-qwenimage"
    tiny_qwenimage_pipeline().save_pretrained(path)
    return path
