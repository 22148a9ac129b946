"""FLUX.1 adapter (FluxTransformer2DModel): joint text-image attention, dual + single blocks."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from ditplan.runtime.adapters.base import BlockList, register_adapter
from ditplan.runtime.adapters.joint import (
    JointAdapter,
    JointSparseAttnProcessor,
    forward_inputs,
    joint_attention_layers,
    joint_model_config,
)
from ditplan.runtime.layout import AttnCall, PermutePoint, StreamIO, TokenLayout
from ditplan.runtime.parallel import model_cp_plan

# Both block kinds take the image and text streams and return (text, image) in 0.42.1
# (transformer_flux.py: FluxTransformerBlock / FluxSingleTransformerBlock.forward).
FLUX_STREAMS = StreamIO(video="hidden_states", text="encoder_hidden_states",
                        outputs=("text", "video"))
UNSUPPORTED_INPUTS = ("controlnet_block_samples", "controlnet_single_block_samples")


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))  # [B, S, H*D] -> [B, S, H, D]


def flux_qkv(attn: nn.Module, hidden_states: torch.Tensor,
             encoder_hidden_states: torch.Tensor | None):
    """Project and normalize q/k/v per stream exactly as FluxAttnProcessor does (no rotary).

    Args:
        hidden_states: [B, S, C], the image stream (dual blocks) or the joint sequence
            [text | image] (single blocks).
        encoder_hidden_states: [B, S_txt, C] (dual blocks) or None.

    Returns:
        (q, k, v) of ``hidden_states`` and (q, k, v) of the text or None, [B, S, H, D] each.
    """
    if attn.fused_projections:
        qkv = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        qkv = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
    q, k, v = (_heads(attn, x) for x in qkv)
    main = (attn.norm_q(q), attn.norm_k(k), v)
    if encoder_hidden_states is None:
        return main, None
    if attn.fused_projections:
        added = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        added = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                 attn.add_v_proj(encoder_hidden_states))
    q_t, k_t, v_t = (_heads(attn, x) for x in added)
    return main, (attn.norm_added_q(q_t), attn.norm_added_k(k_t), v_t)


def _text_tokens(layout: TokenLayout, joint_tokens: int) -> int:
    """The text tokens among a single block's ``joint_tokens`` [text | image]: all of the
    layout's on one process; under context parallelism diffusers splits text and image
    evenly over the W ranks, so a rank holds ``layout.text_len / W`` of them."""
    shards, rest = divmod(layout.seq_len, joint_tokens)
    if rest or layout.text_len % shards:
        raise ValueError(f"a single block got {joint_tokens} tokens, which are not an even "
                         f"share of the forward's {layout.seq_len} ({layout.text_len} text)")
    return layout.text_len // shards


def _rotate(x: torch.Tensor, table, rows: slice) -> torch.Tensor:
    """``x`` [B, S, H, D] rotated with rows ``rows`` of FLUX's joint (cos, sin) table
    [S_txt + S_img, D]; per token the same arithmetic as rotating the joint sequence."""
    if table is None:
        return x
    cos, sin = table
    return apply_rotary_emb(x, (cos[rows], sin[rows]), sequence_dim=1)


def _shape(x: torch.Tensor | None) -> tuple | None:
    return None if x is None else tuple(x.shape)


# the forward inputs token_layout reads
LAYOUT_INPUTS = ("hidden_states", "encoder_hidden_states", "img_ids", "txt_ids",
                 *UNSUPPORTED_INPUTS)


@register_adapter(FluxTransformer2DModel)
class FluxAdapter(JointAdapter):
    """FluxTransformer2DModel: dual blocks ``transformer_blocks.{i}`` then single blocks
    ``single_transformer_blocks.{i}``, joint attention ``<block>.attn``; text first natively."""

    family = "flux"
    processor_class = JointSparseAttnProcessor

    def block_lists(self, transformer) -> list[BlockList]:
        return [BlockList("transformer_blocks", "dual", FLUX_STREAMS),
                BlockList("single_transformer_blocks", "single", FLUX_STREAMS)]

    def attention_layers(self, transformer):
        """The joint attention layers; refuses processors ditplan cannot stand in for."""
        return joint_attention_layers(
            self.blocks(transformer), FluxAttnProcessor, "ditplan's FLUX adapter stands in for "
            "FluxAttnProcessor only (IP-Adapter processors are not supported)")

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        """The layout of a forward called with ``(args, kwargs)``: the image grid from
        ``img_ids`` [S_img, 3] = (0, row, col) in raster order, the text length from
        ``encoder_hidden_states`` [B, S_txt, C]."""
        inputs = forward_inputs(transformer, LAYOUT_INPUTS, args, kwargs)
        for name in UNSUPPORTED_INPUTS:
            if inputs[name] is not None:
                raise ValueError(f"ditplan does not support FLUX's {name} (ControlNet "
                                 "residuals) yet; remove ditplan's plan for ControlNet runs")
        hidden, ids = inputs["hidden_states"], inputs["img_ids"]  # [B, S_img, C], [S_img, 3]
        text, text_ids = inputs["encoder_hidden_states"], inputs["txt_ids"]  # [B, S_txt, C]
        if any(x is None or x.ndim != 2 for x in (ids, text_ids)) or text is None:
            raise ValueError("FLUX needs img_ids [S_img, 3] and txt_ids [S_txt, 3] (the 2-D "
                             "forms: diffusers deprecated the batched ones, and its context "
                             "parallelism splits only these) and encoder_hidden_states "
                             f"[B, S_txt, C]; got img_ids {_shape(ids)}, txt_ids "
                             f"{_shape(text_ids)}")
        tokens = hidden.shape[1]
        rows, cols = (int(n) + 1 for n in ids[:, 1:].amax(0).tolist())  # one host sync
        raster = ids[:, 1].long() * cols + ids[:, 2].long()
        if (ids.shape[0] != tokens or rows * cols != tokens
                or not torch.equal(raster, torch.arange(tokens, device=ids.device))):
            raise ValueError(f"img_ids {tuple(ids.shape)} do not give a {tokens}-token image "
                             "grid in raster order (row-major (0, row, col), as FluxPipeline "
                             "builds them); ditplan tiles that grid")
        return TokenLayout(1, rows, cols, text_len=int(text.shape[1]), text_first=True,
                           video=False)

    def permute_points(self, transformer) -> list[PermutePoint]:
        """Image tokens at the model input; the rotary table is built from the permuted
        ``img_ids`` (``txt_ids`` rows untouched), so it needs no hook."""
        return [
            PermutePoint("", "model_input", "hidden_states", 1),  # [B, S_img, C_in]
            PermutePoint("", "model_input", "img_ids", 0),  # [S_img, 3]
            PermutePoint("proj_out", "unpermute_output", None, 1),  # [B, S_img, C_out]
        ]

    def attention_call(
        self, attn, layout, hidden_states, encoder_hidden_states=None, attention_mask=None,
        image_rotary_emb=None,
    ) -> AttnCall:
        """Dual blocks: image [B, S_img, C] and text [B, S_txt, C] streams; single blocks:
        the joint sequence [text | image] [B, S_txt + S_img, C], split with ``layout``.
        Under context parallelism each is the rank's share, and so is the rotary table
        [S_txt + S_img, D] (diffusers splits ``txt_ids`` and ``img_ids``)."""
        if attention_mask is not None:
            raise ValueError("sparse attention does not take FLUX's attention_mask (FLUX "
                             "pipelines pass none); remove it from joint_attention_kwargs")
        main, added = flux_qkv(attn, hidden_states, encoder_hidden_states)  # [B, S, H, D]
        if added is None:  # single block: main holds [text | image]
            text_len = _text_tokens(layout, hidden_states.shape[1])
            added = tuple(x[:, :text_len] for x in main)
            main = tuple(x[:, text_len:] for x in main)
        else:
            text_len = encoder_hidden_states.shape[1]
        image_rows, text_rows = slice(text_len, None), slice(0, text_len)
        q_v, k_v = (_rotate(x, image_rotary_emb, image_rows) for x in main[:2])
        q_t, k_t = (_rotate(x, image_rotary_emb, text_rows) for x in added[:2])
        return AttnCall(q_v, k_v, main[2], q_t, k_t, added[2])

    def attention_return(self, attn, call: AttnCall, out_video, out_text):
        """Dual blocks: (image, text) through the output projections; single blocks: the
        joint [text | image] output [B, S, H*D] (the block projects it)."""
        out_video = out_video.flatten(2, 3).type_as(call.q_v)  # [B, S_img, H*D]
        out_text = out_text.flatten(2, 3).type_as(call.q_v)  # [B, S_txt, H*D]
        if attn.pre_only:
            return torch.cat([out_text, out_video], dim=1)
        return attn.to_out[1](attn.to_out[0](out_video)), attn.to_add_out(out_text)

    def model_config(self, transformer, text_len: int) -> dict:
        """The transformer facts a cost model needs (profiler.schema.ModelConfig's fields).

        ``text_len`` joins the image tokens in every block's attention. Single blocks are
        counted like dual ones: per token both have q/k/v/output projections of the width and
        a 4x MLP.
        """
        config = transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        return joint_model_config(
            transformer, [name for name, _ in self.blocks(transformer)], text_len,
            ffn_dim=4 * width,  # FeedForward's default mult and the single blocks' mlp_ratio
            patch_size=(1, config.patch_size, config.patch_size))  # over the packed latents

    def cp_plan(self, transformer) -> dict | None:
        """diffusers' own plan: split ``hidden_states``, ``encoder_hidden_states``,
        ``img_ids`` and ``txt_ids`` at the model input (after ditplan permutes the image
        tokens and ids), gather at ``proj_out``."""
        return model_cp_plan(transformer)
