"""Published transformer configs of the model families and their full-size benchmark shapes."""

from __future__ import annotations

from dataclasses import dataclass

# Wan2.2-TI2V-5B: Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer/config.json (as diffusers'
# scripts/convert_wan_to_diffusers.py writes it for "Wan2.2-TI2V-5B").
WAN22_TI2V_5B = dict(
    patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
    out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
    added_kv_proj_dim=None, rope_max_seq_len=1024,
)
# HunyuanVideo (13B): hunyuanvideo-community/HunyuanVideo transformer/config.json.
HUNYUAN_VIDEO = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
    num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
    patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
    pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)
# Qwen-Image (20B): Qwen/Qwen-Image transformer/config.json.
QWEN_IMAGE = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
# FLUX.1-dev (12B): black-forest-labs/FLUX.1-dev transformer/config.json.
FLUX1_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


@dataclass(frozen=True)
class FamilyShape:
    """A transformer config and the token grid one forward sees: ``grid`` (frames, rows,
    cols) of tokens after patching (frames 1 for an image) and ``text`` tokens."""

    config: dict
    grid: tuple[int, int, int]
    text: int

    @property
    def tokens(self) -> int:
        frames, rows, cols = self.grid
        return frames * rows * cols


# Full-size shapes (issue 17, "Speed"). Wan2.2-TI2V-5B at 704 x 1280 x 121 frames: VAE 16x
# spatial, 4x temporal, patch (1, 2, 2) -> 31 x 22 x 40 = 27,280 tokens, 512 UMT5 tokens.
# HunyuanVideo at 720 x 1280 x 129: VAE 8x / 4x, patch 2 -> 33 x 45 x 80 = 118,800 tokens and
# its prompt padded to 256 Llama tokens. Qwen-Image at 1328 x 1328: 83 x 83 = 6,889 packed
# tokens; its text is the prompt's own length (128 tokens here). FLUX.1-dev at 2048 x 2048:
# 128 x 128 = 16,384 packed tokens, 512 T5 tokens. HunyuanVideo comes last (the longest by far):
# a run cut short still has the others' rows, which benchmarks/families.py writes as it goes.
FULL = {
    "wan22_ti2v_5b": FamilyShape(WAN22_TI2V_5B, (31, 22, 40), 512),
    "qwen_image": FamilyShape(QWEN_IMAGE, (1, 83, 83), 128),
    "flux1_dev": FamilyShape(FLUX1_DEV, (1, 128, 128), 512),
    "hunyuan_video": FamilyShape(HUNYUAN_VIDEO, (33, 45, 80), 256),
}
# --quick: each family's architecture at 2 heads of 32, one or two blocks of a kind, about 1,200
# tokens (about 19 attention blocks of 64, so density 0.2 drops pairs; 12 frames, so the first
# frame's forced sink rows and columns leave pairs to drop) in grids whose rows or columns are
# no multiple of the 8 x 8 tile (as 22, 45 and 83 above), 8 text tokens (a CPU smoke run).
QUICK = {
    "wan22_ti2v_5b": FamilyShape(dict(WAN22_TI2V_5B, num_attention_heads=2,
                                      attention_head_dim=32, ffn_dim=128, num_layers=2,
                                      text_dim=64), (12, 10, 10), 8),
    "qwen_image": FamilyShape(dict(QWEN_IMAGE, num_layers=2, attention_head_dim=32,
                                   num_attention_heads=2, joint_attention_dim=64,
                                   axes_dims_rope=(8, 12, 12)), (1, 35, 33), 8),
    "flux1_dev": FamilyShape(dict(FLUX1_DEV, num_layers=1, num_single_layers=1,
                                  attention_head_dim=32, num_attention_heads=2,
                                  joint_attention_dim=64, pooled_projection_dim=32,
                                  axes_dims_rope=(8, 12, 12)), (1, 30, 40), 8),
    "hunyuan_video": FamilyShape(dict(HUNYUAN_VIDEO, num_attention_heads=2,
                                      attention_head_dim=32, num_layers=1, num_single_layers=1,
                                      num_refiner_layers=1, text_embed_dim=64,
                                      pooled_projection_dim=32, rope_axes_dim=(8, 12, 12)),
                                 (12, 10, 10), 8),
}
