"""HunyuanVideo adapter (HunyuanVideoTransformer3DModel): joint text-video attention, text last."""

from __future__ import annotations

import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
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

# Both block kinds take the video and text streams and return (video, text) in 0.42.1: a
# single-stream block concatenates them itself and splits its output again.
HUNYUAN_STREAMS = StreamIO(video="hidden_states", text="encoder_hidden_states",
                           outputs=("video", "text"))


# the forward inputs token_layout reads
LAYOUT_INPUTS = ("hidden_states", "encoder_hidden_states")


def hunyuan_qkv(attn: nn.Module, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor, image_rotary_emb):
    """q/k/v per stream projected, normalized and rotated exactly as
    HunyuanVideoAttnProcessor2_0 does (single-stream blocks, without ``add_q_proj``, project
    the concatenation [video | text]; the rotary table turns the video rows only).

    Args:
        hidden_states: [B, S_vid, C]; encoder_hidden_states: [B, S_txt, C].
        image_rotary_emb: (cos, sin) [S_vid, D] each, or None.

    Returns:
        (q, k, v) of the video and of the text, [B, S, H, D] each.
    """
    text_len = encoder_hidden_states.shape[1]
    single = attn.add_q_proj is None
    joint = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states
    main = stream_qkv(attn, joint, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
    if single:
        video = [x[:, :-text_len] for x in main]
        text = [x[:, -text_len:] for x in main]
    else:
        video = main
        text = stream_qkv(attn, encoder_hidden_states,
                          (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                          (attn.norm_added_q, attn.norm_added_k))
    if image_rotary_emb is not None:
        video[:2] = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in video[:2])
    return tuple(video), tuple(text)


def key_valid_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """int [B] valid keys of [video | text] from HunyuanVideo's bool key mask [B, 1, 1, N].

    The model builds that mask as ``position < S_vid + encoder_attention_mask.sum(1)``
    (transformer_hunyuan_video.py:1054-1062): suffix form by construction, whatever the order
    of the zeros in ``encoder_attention_mask``, so its count is the whole mask.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.ndim != 4 or (
            attention_mask.shape[1:3] != (1, 1)):
        raise ValueError("ditplan's HunyuanVideo adapter takes the model's own bool key mask "
                         f"[B, 1, 1, N]; got {attention_mask.dtype} "
                         f"{tuple(attention_mask.shape)}")
    return attention_mask.flatten(1).sum(1)  # [B], no host sync


@register_adapter(HunyuanVideoTransformer3DModel)
class HunyuanVideoAdapter(JointAdapter):
    """HunyuanVideoTransformer3DModel: dual blocks ``transformer_blocks.{i}`` then single
    blocks ``single_transformer_blocks.{i}``, joint attention ``<block>.attn``; text last."""

    family = "hunyuan_video"
    processor_class = JointSparseAttnProcessor

    def block_lists(self, transformer) -> list[BlockList]:
        return [BlockList("transformer_blocks", "dual", HUNYUAN_STREAMS),
                BlockList("single_transformer_blocks", "single", HUNYUAN_STREAMS)]

    def attention_layers(self, transformer):
        """The joint attention layers; refuses the variant and processors ditplan cannot
        serve."""
        if transformer.config.image_condition_type == "token_replace":
            raise ValueError("ditplan does not support HunyuanVideo I2V's token_replace yet (its "
                             "blocks modulate the first frame's tokens by position)")
        return joint_attention_layers(
            self.blocks(transformer), HunyuanVideoAttnProcessor2_0, "ditplan's HunyuanVideo "
            "adapter stands in for HunyuanVideoAttnProcessor2_0 only")

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        """The layout of a forward called with ``(args, kwargs)``: latents [B, C, F, H, W]
        patched by (patch_size_t, patch_size, patch_size), the text length from
        ``encoder_hidden_states`` [B, S_txt, C] (256 in HunyuanVideoPipeline, padded)."""
        inputs = forward_inputs(transformer, LAYOUT_INPUTS, args, kwargs)
        latents, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
        if latents is None or latents.ndim != 5 or text is None:
            raise ValueError("HunyuanVideo expects latents [B, C, F, H, W] and "
                             "encoder_hidden_states [B, S_txt, C]; got latents "
                             f"{None if latents is None else tuple(latents.shape)}")
        _, _, frames, height, width = latents.shape
        config = transformer.config
        return TokenLayout(frames // config.patch_size_t, height // config.patch_size,
                           width // config.patch_size, text_len=int(text.shape[1]))

    def permute_points(self, transformer) -> list[PermutePoint]:
        """Video tokens at the first block's input, the rotary tables' rows; text untouched."""
        first = self.blocks(transformer)[0][0]
        return [
            PermutePoint("rope", "module_output", 0, 0),  # cos [S_vid, D]
            PermutePoint("rope", "module_output", 1, 0),  # sin [S_vid, D]
            PermutePoint(first, "module_input", "hidden_states", 1),  # [B, S_vid, C]
            PermutePoint("proj_out", "unpermute_output", None, 1),  # [B, S_vid, C_out * p]
        ]

    def attention_call(
        self, attn, layout, hidden_states, encoder_hidden_states=None, attention_mask=None,
        image_rotary_emb=None,
    ) -> AttnCall:
        """Video [B, S_vid, C] and text [B, S_txt, C] streams (both block kinds); the model's
        key mask [B, 1, 1, N] becomes ``key_valid`` (int [B]: video + valid text)."""
        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideo's joint attention got no text stream "
                             "(encoder_hidden_states); call the transformer, not its blocks")
        video, text = hunyuan_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        return AttnCall(*video, *text, key_valid=key_valid_from_mask(attention_mask))

    def attention_return(self, attn, call: AttnCall, out_video, out_text):
        """(video, text) as the original returns them: through the output projections in
        dual blocks, as they are in single blocks (the block projects them)."""
        out_video = out_video.flatten(2, 3).to(call.q_v.dtype)  # [B, S_vid, H*D]
        out_text = out_text.flatten(2, 3).to(call.q_v.dtype)  # [B, S_txt, H*D]
        if getattr(attn, "to_out", None) is not None:
            out_video = attn.to_out[1](attn.to_out[0](out_video))
        if getattr(attn, "to_add_out", None) is not None:
            out_text = attn.to_add_out(out_text)
        return out_video, out_text

    def model_config(self, transformer, text_len: int) -> dict:
        """The transformer facts a cost model needs (profiler.schema.ModelConfig's fields).

        ``text_len`` joins the video tokens in every block's attention. Single blocks are
        counted like dual ones: per token both have q/k/v/output projections of the width and
        an MLP of ``mlp_ratio`` times it.
        """
        config = transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        return joint_model_config(
            transformer, [name for name, _ in self.blocks(transformer)], text_len,
            ffn_dim=int(config.mlp_ratio * width),
            patch_size=(config.patch_size_t, config.patch_size, config.patch_size))

    def cp_plan(self, transformer) -> dict | None:
        """None: context parallelism is refused (design D9): diffusers 0.42.1 ships no
        ``_cp_plan`` for HunyuanVideo, and the model builds its [B, 1, 1, N] key mask over
        the whole sequence before any split."""
        return None
