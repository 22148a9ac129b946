"""Tiny HunyuanVideo and HunyuanVideo-1.5 pipelines built from config, tokenizers included."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from tests.hunyuan_video15_factories import TINY_HV15_CONFIG, tiny_hunyuan_video15
from tests.hunyuan_video_factories import TINY_HUNYUAN_CONFIG, tiny_hunyuan_video
from tests.image_pipelines import CHARACTERS, tiny_clip

PAD = "<pad>"
# Qwen2.5-VL's chat format, as HunyuanVideo15Pipeline renders its system message and prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
USER_TURN = "<|im_start|>user\n"


def template_tokenizer(prefix: str, crop_start: int, chat_template: str | None = None):
    """One token per character, except that ``prefix`` (the pipeline's template text before the
    prompt) is ``crop_start`` tokens, as the real tokenizer makes it: its head is one added
    token, its last ``crop_start - 1`` characters one token each. The pipeline crops those
    tokens off, so its text embeddings start at the prompt, padded to its maximum length."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARACTERS)}
    vocab[PAD] = len(vocab)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, merges=[])),
                                        pad_token=PAD, chat_template=chat_template)
    tokenizer.add_tokens([prefix[: len(prefix) - (crop_start - 1)]])
    return tokenizer


def _llama(dim: int):
    """HunyuanVideo's Llama text encoder and tokenizer (its prompt template's 95 tokens)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import LlamaConfig, LlamaModel

    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    tokenizer = template_tokenizer(prefix, DEFAULT_PROMPT_TEMPLATE["crop_start"])
    # Two layers: the pipeline takes the hidden states of the third layer from the top.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    return LlamaModel(config).eval(), tokenizer


def tiny_hunyuan_video_pipeline():
    """A HunyuanVideoPipeline of random tiny parts (embedded guidance, as HunyuanVideo's)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
    )

    torch.manual_seed(0)
    llama, llama_tokenizer = _llama(TINY_HUNYUAN_CONFIG["text_embed_dim"])
    # The pipeline pads CLIP prompts to 77 tokens; the pooled output feeds the transformer.
    clip, clip_tokenizer = tiny_clip(TINY_HUNYUAN_CONFIG["pooled_projection_dim"], max_length=77)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=TINY_HUNYUAN_CONFIG["in_channels"], block_out_channels=(8,) * 4,
        layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False).eval()
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=llama_tokenizer,
                                transformer=tiny_hunyuan_video(), vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=clip, tokenizer_2=clip_tokenizer)


def saved_tiny_hunyuan_video_pipeline(folder: Path) -> Path:
    """:func:`tiny_hunyuan_video_pipeline` saved as a diffusers folder (what ``--model``
    takes)."""
    path = folder / "tiny-hunyuan-video"
    tiny_hunyuan_video_pipeline().save_pretrained(path)
    return path


def _qwen_text(dim: int):
    """HunyuanVideo-1.5's Qwen2.5-VL text model and tokenizer (its system turn's 108 tokens)."""
    from diffusers import HunyuanVideo15Pipeline
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    defaults = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    system = defaults["system_message"].default
    prefix = f"<|im_start|>system\n{system}<|im_end|>\n{USER_TURN}"
    tokenizer = template_tokenizer(prefix, defaults["crop_start"].default, QWEN_CHAT_TEMPLATE)
    config = Qwen2_5_VLTextConfig(vocab_size=len(tokenizer), hidden_size=dim,
                                  intermediate_size=2 * dim, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1,
                                  rope_scaling={"type": "default", "mrope_section": [1, 1, 2]},
                                  pad_token_id=tokenizer.pad_token_id)
    return Qwen2_5_VLTextModel(config).eval(), tokenizer


def _byt5(dim: int):
    """The ByT5 glyph encoder (used for quoted text in a prompt) and its file-less tokenizer."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval(), tokenizer


def tiny_hunyuan_video15_pipeline(guidance_scale: float = 6.0):
    """A HunyuanVideo15Pipeline of random tiny parts; its guider runs CFG at
    ``guidance_scale``."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
    )

    torch.manual_seed(0)
    qwen, qwen_tokenizer = _qwen_text(TINY_HV15_CONFIG["text_embed_dim"])
    byt5, byt5_tokenizer = _byt5(TINY_HV15_CONFIG["text_embed_2_dim"])
    # diffusers' own tiny HV1.5 VAE: 4x spatial, 2x temporal compression.
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=TINY_HV15_CONFIG["out_channels"], block_out_channels=(16, 16),
        layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
        downsample_match_channel=False, upsample_match_channel=False).eval()
    return HunyuanVideo15Pipeline(text_encoder=qwen, tokenizer=qwen_tokenizer,
                                  transformer=tiny_hunyuan_video15(), vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                  text_encoder_2=byt5, tokenizer_2=byt5_tokenizer,
                                  guider=ClassifierFreeGuidance(guidance_scale=guidance_scale))


def saved_tiny_hunyuan_video15_pipeline(folder: Path) -> Path:
    """:func:`tiny_hunyuan_video15_pipeline` saved as a diffusers folder (what ``--model``
    takes)."""
    path = folder / "tiny-hunyuan-video15"
    tiny_hunyuan_video15_pipeline().save_pretrained(path)
    return path
