"""HunyuanVideo-1.5 adapter (HunyuanVideo15Transformer3DModel): joint attention, text last."""

from __future__ import annotations

import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15AttnProcessor2_0,
)
from torch import nn

from ditplan.runtime.adapters.base import BlockList, register_adapter
from ditplan.runtime.adapters.joint import (
    JointAdapter,
    JointSparseAttnProcessor,
    forward_inputs,
    joint_attention_layers,
    joint_model_config,
    stream_qkv,
)
from ditplan.runtime.layout import AttnCall, PermutePoint, StreamIO, TokenLayout

# HunyuanVideo15TransformerBlock.forward takes the video and text streams, returns (video, text).
HV15_STREAMS = StreamIO(video="hidden_states", text="encoder_hidden_states",
                        outputs=("video", "text"))
# The forward inputs that join the text stream, in the model's own order: Qwen2.5-VL tokens,
# ByT5 tokens, SigLIP image tokens (zeroed and masked for T2V).
TEXT_INPUTS = ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")


# the forward inputs token_layout reads
LAYOUT_INPUTS = ("hidden_states", *TEXT_INPUTS)


def hv15_qkv(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
             image_rotary_emb):
    """q/k/v per stream projected, normalized and rotated exactly as
    HunyuanVideo15AttnProcessor2_0 does (the rotary table turns the video rows only).

    Args:
        hidden_states: [B, S_vid, C]; encoder_hidden_states: [B, S_txt, C].
        image_rotary_emb: (cos, sin) [S_vid, D] each, or None.

    Returns:
        (q, k, v) of the video and of the text, [B, S, H, D] each.
    """
    video = stream_qkv(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v),
                       (attn.norm_q, attn.norm_k))
    if image_rotary_emb is not None:
        video[:2] = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in video[:2])
    text = stream_qkv(attn, encoder_hidden_states,
                      (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                      (attn.norm_added_q, attn.norm_added_k))
    return tuple(video), tuple(text)


def key_valid_from_text_mask(video_tokens: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """int [B] valid keys of [video | text] from the text mask the blocks receive (bool
    [B, S_txt]), which the processor would widen to a dense [B, 1, N, N] mask.

    The model reorders every text input valid tokens first (transformer_hunyuan_video15.py,
    "combine valid tokens first, then padding"), so the mask is suffix padding by
    construction and its count is the whole mask.
    """
    if attention_mask.ndim != 2:
        raise ValueError("ditplan's HunyuanVideo-1.5 adapter takes the model's own text mask "
                         f"[B, S_txt]; got shape {tuple(attention_mask.shape)}")
    return video_tokens + attention_mask.bool().sum(1)  # [B], no host sync


@register_adapter(HunyuanVideo15Transformer3DModel)
class HunyuanVideo15Adapter(JointAdapter):
    """HunyuanVideo15Transformer3DModel: dual blocks ``transformer_blocks.{i}``, joint
    attention ``transformer_blocks.{i}.attn``; text (three inputs) last."""

    family = "hunyuan_video15"
    processor_class = JointSparseAttnProcessor  # dense steps: the original and its mask

    def block_lists(self, transformer) -> list[BlockList]:
        return [BlockList("transformer_blocks", "dual", HV15_STREAMS)]

    def attention_layers(self, transformer):
        """The joint attention layers; refuses processors ditplan cannot stand in for."""
        return joint_attention_layers(
            self.blocks(transformer), HunyuanVideo15AttnProcessor2_0, "ditplan's "
            "HunyuanVideo-1.5 adapter stands in for HunyuanVideo15AttnProcessor2_0 only")

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        """The layout of a forward called with ``(args, kwargs)``: latents [B, C, F, H, W]
        patched by (patch_size_t, patch_size, patch_size); the text is every conditioning
        token the blocks see: ``encoder_hidden_states``, ``encoder_hidden_states_2`` and
        ``image_embeds`` [B, S_i, C_i] together."""
        inputs = forward_inputs(transformer, LAYOUT_INPUTS, args, kwargs)
        latents = inputs["hidden_states"]
        if latents is None or latents.ndim != 5:
            raise ValueError("HunyuanVideo-1.5 expects latents [B, C, F, H, W]; got "
                             f"{None if latents is None else tuple(latents.shape)}")
        text_len = sum(int(inputs[name].shape[1]) for name in TEXT_INPUTS
                       if inputs[name] is not None)
        _, _, frames, height, width = latents.shape
        config = transformer.config
        return TokenLayout(frames // config.patch_size_t, height // config.patch_size,
                           width // config.patch_size, text_len=text_len)

    def permute_points(self, transformer) -> list[PermutePoint]:
        """Video tokens at the first block's input, the rotary tables' rows; text untouched."""
        return [
            PermutePoint("rope", "module_output", 0, 0),  # cos [S_vid, D]
            PermutePoint("rope", "module_output", 1, 0),  # sin [S_vid, D]
            PermutePoint("transformer_blocks.0", "module_input", "hidden_states", 1),
            PermutePoint("proj_out", "unpermute_output", None, 1),  # [B, S_vid, C_out * p]
        ]

    def attention_call(
        self, attn, layout, hidden_states, encoder_hidden_states=None, attention_mask=None,
        image_rotary_emb=None,
    ) -> AttnCall:
        """Video [B, S_vid, C] and text [B, S_txt, C] streams; the text mask [B, S_txt]
        becomes ``key_valid`` (the dense [B, 1, N, N] mask is never built)."""
        if encoder_hidden_states is None or attention_mask is None:
            raise ValueError("HunyuanVideo-1.5's joint attention needs the text stream and its "
                             "mask; call the transformer, not its blocks")
        video, text = hv15_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        key_valid = key_valid_from_text_mask(hidden_states.shape[1], attention_mask)
        return AttnCall(*video, *text, key_valid=key_valid)

    def attention_return(self, attn, call: AttnCall, out_video, out_text):
        """(video, text) through the output projections, as the original returns them.

        The original also masks padding queries (its rows of the dense mask): their outputs
        differ here, and no valid token reads them (they are padding keys in every block)."""
        out_video = out_video.flatten(2, 3).to(call.q_v.dtype)  # [B, S_vid, H*D]
        out_text = out_text.flatten(2, 3).to(call.q_v.dtype)  # [B, S_txt, H*D]
        return attn.to_out[1](attn.to_out[0](out_video)), attn.to_add_out(out_text)

    def model_config(self, transformer, text_len: int) -> dict:
        """The transformer facts a cost model needs (profiler.schema.ModelConfig's fields);
        ``text_len`` (every conditioning token) joins the video tokens in every block."""
        config = transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        return joint_model_config(
            transformer, [name for name, _ in self.blocks(transformer)], text_len,
            ffn_dim=int(config.mlp_ratio * width),
            patch_size=(config.patch_size_t, config.patch_size, config.patch_size))

    def cp_plan(self, transformer) -> dict | None:
        """None: context parallelism is refused (design D9): diffusers 0.42.1 ships no
        ``_cp_plan`` for HunyuanVideo-1.5, whose processor builds a whole-sequence mask."""
        return None
