"""Qwen-Image adapter (QwenImageTransformer2DModel): joint text-image attention, text first."""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenEmbedRope,
    apply_rotary_emb_qwen,
)
from torch import nn

from ditplan.runtime.adapters.base import BlockList, register_adapter
from ditplan.runtime.adapters.joint import (
    JointAdapter,
    forward_inputs,
    joint_attention_layers,
    joint_model_config,
    stream_qkv,
)
from ditplan.runtime.layout import AttnCall, PermutePoint, StreamIO, TokenLayout
from ditplan.runtime.parallel import model_cp_plan
from ditplan.runtime.sparse import SparseProcessorBase

# QwenImageTransformerBlock.forward takes the image and text streams and returns (text, image).
QWEN_STREAMS = StreamIO(video="hidden_states", text="encoder_hidden_states",
                        outputs=("text", "video"))


# the forward inputs token_layout reads
LAYOUT_INPUTS = ("hidden_states", "encoder_hidden_states", "img_shapes",
                 "controlnet_block_samples")


def _check_supported(transformer: nn.Module) -> None:
    """Refuse the Qwen-Image variants ditplan cannot tile (design §4.3)."""
    config = transformer.config
    if config.zero_cond_t:
        raise ValueError("ditplan does not support Qwen-Image-Edit's zero_cond_t (a per-token "
                         "modulate_index) yet")
    if not isinstance(transformer.pos_embed, QwenEmbedRope):
        raise ValueError(f"ditplan supports Qwen-Image's QwenEmbedRope, this model has "
                         f"{type(transformer.pos_embed).__name__} (use_layer3d_rope)")


def qwen_qkv(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
             image_rotary_emb):
    """q/k/v per stream projected, normalized and rotated exactly as
    QwenDoubleStreamAttnProcessor2_0 does.

    Args:
        hidden_states: [B, S_img, C]; encoder_hidden_states: [B, S_txt, C].
        image_rotary_emb: (img_freqs [S_img, D/2], txt_freqs [S_txt, D/2]) complex, or None.

    Returns:
        (q, k, v) of the image and of the text, [B, S, H, D] each.
    """
    img = stream_qkv(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v),
                     (attn.norm_q, attn.norm_k))
    txt = stream_qkv(attn, encoder_hidden_states,
                     (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                     (attn.norm_added_q, attn.norm_added_k))
    if image_rotary_emb is not None:
        for stream, freqs in zip((img, txt), image_rotary_emb, strict=True):
            stream[0], stream[1] = (apply_rotary_emb_qwen(x, freqs, use_real=False)
                                    for x in stream[:2])
    return tuple(img), tuple(txt)


class QwenImageSparseAttnProcessor(SparseProcessorBase):
    """QwenDoubleStreamAttnProcessor2_0's parameters; every call is joint self-attention and
    goes to the sparse runner (dense steps run the original processor)."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        return self.run(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                        attention_mask, image_rotary_emb)


@register_adapter(QwenImageTransformer2DModel)
class QwenImageAdapter(JointAdapter):
    """QwenImageTransformer2DModel: dual blocks ``transformer_blocks.{i}``, joint attention
    ``transformer_blocks.{i}.attn``; text first natively, its length per prompt."""

    family = "qwenimage"
    processor_class = QwenImageSparseAttnProcessor

    def block_lists(self, transformer) -> list[BlockList]:
        return [BlockList("transformer_blocks", "dual", QWEN_STREAMS)]

    def attention_layers(self, transformer):
        """The joint attention layers; refuses variants and processors ditplan cannot serve."""
        _check_supported(transformer)
        return joint_attention_layers(
            self.blocks(transformer), QwenDoubleStreamAttnProcessor2_0, "ditplan's Qwen-Image "
            "adapter stands in for QwenDoubleStreamAttnProcessor2_0 only")

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        """The layout of a forward called with ``(args, kwargs)``: the image grid from
        ``img_shapes`` (one (1, rows, cols) image, as QwenImagePipeline passes it), the text
        length from ``encoder_hidden_states`` [B, S_txt, C] (per prompt and CFG branch)."""
        inputs = forward_inputs(transformer, LAYOUT_INPUTS, args, kwargs)
        if inputs["controlnet_block_samples"] is not None:
            raise ValueError("ditplan does not support Qwen-Image's controlnet_block_samples "
                             "(ControlNet residuals) yet; remove ditplan's plan for ControlNet "
                             "runs")
        shapes = inputs["img_shapes"]
        first = shapes[0] if isinstance(shapes, list) and shapes else shapes
        images = first if isinstance(first, list) else [first]
        tokens = inputs["hidden_states"].shape[1]  # [B, S_img, C]
        if len(images) != 1 or len(images[0]) != 3 or images[0][0] != 1 or (
                images[0][1] * images[0][2] != tokens):
            raise ValueError(f"img_shapes {shapes} do not give one (1, rows, cols) image of "
                             f"{tokens} tokens; ditplan tiles one generated image (edit models' "
                             "several images are not supported)")
        _, rows, cols = images[0]
        text = inputs["encoder_hidden_states"]  # [B, S_txt, C]
        return TokenLayout(1, int(rows), int(cols), text_len=int(text.shape[1]),
                           text_first=True, video=False)

    def permute_points(self, transformer) -> list[PermutePoint]:
        """Image tokens at the model input and the image rotary rows; ``txt_freqs`` untouched."""
        return [
            PermutePoint("", "model_input", "hidden_states", 1),  # [B, S_img, C_in]
            PermutePoint("pos_embed", "module_output", 0, 0),  # img_freqs [S_img, D/2]
            PermutePoint("proj_out", "unpermute_output", None, 1),  # [B, S_img, C_out]
        ]

    def attention_call(
        self, attn, layout, hidden_states, encoder_hidden_states=None,
        encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None,
    ) -> AttnCall:
        """Image [B, S_img, C] and text [B, S_txt, C] streams. With a text mask (bool
        [B, S_txt], suffix padding as QwenImagePipeline pads) ``key_valid`` counts the valid
        keys of [image | text]."""
        if attention_mask is not None:
            raise ValueError("Qwen-Image takes no attention_mask (its processor refuses one); "
                             "pass encoder_hidden_states_mask")
        image, text = qwen_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        key_valid = None
        if encoder_hidden_states_mask is not None:  # int [B]: image tokens + valid text
            key_valid = hidden_states.shape[1] + encoder_hidden_states_mask.bool().sum(1)
        return AttnCall(*image, *text, key_valid=key_valid)

    def attention_return(self, attn, call: AttnCall, out_video, out_text):
        """(image, text) through the output projections, as the original returns them."""
        image = attn.to_out[0](out_video.flatten(2, 3).type_as(call.q_v))  # [B, S_img, C]
        if len(attn.to_out) > 1:
            image = attn.to_out[1](image)  # dropout
        return image, attn.to_add_out(out_text.flatten(2, 3).type_as(call.q_v))

    def model_config(self, transformer, text_len: int) -> dict:
        """The transformer facts a cost model needs (profiler.schema.ModelConfig's fields);
        ``text_len`` joins the image tokens in every block's attention."""
        config = transformer.config
        return joint_model_config(
            transformer, [name for name, _ in self.blocks(transformer)], text_len,
            ffn_dim=4 * config.num_attention_heads * config.attention_head_dim,  # FeedForward
            patch_size=(1, config.patch_size, config.patch_size))  # the pipeline's packing

    def cp_plan(self, transformer) -> dict | None:
        """diffusers' own plan: split ``transformer_blocks.0``'s streams and ``pos_embed``'s
        tables (after ditplan permutes the image tokens and ``img_freqs``), gather at
        ``proj_out``."""
        return model_cp_plan(transformer)
