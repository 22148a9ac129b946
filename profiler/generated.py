"""The sample mode's foreground: estimated from a pipeline's own generated latents."""

from __future__ import annotations

import torch

from ditplan.profiler import foreground
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.layout import TokenLayout


def generated_foreground(pipe, call: dict) -> torch.Tensor:
    """Generate once with ``call`` (``output_type="latent"``, ``return_dict=False``) and
    estimate the foreground tokens of the result.

    The token grid is the adapter's layout of the transformer's last call: a video's latents
    ``[1, C, F, H, W]`` are patched as the transformer patches them; an image pipeline's
    packed latents ``[1, rows * cols, C]`` (FLUX.1, Qwen-Image) are one token each, in raster
    order.

    Returns:
        bool [tokens] in the transformer's token order (frame, row, col).
    """
    transformer = pipe.transformer
    adapter = get_adapter(transformer)
    layouts: list[TokenLayout] = []
    handle = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: layouts.append(adapter.token_layout(module, args, kwargs)),
        with_kwargs=True)
    try:
        latents = pipe(**call)[0]
    finally:
        handle.remove()
    layout = layouts[-1]
    if layout.video:
        return foreground.estimate_foreground(latents[0], tuple(transformer.config.patch_size))
    image = latents[0].reshape(layout.height, layout.width, -1).permute(2, 0, 1)  # [C, H, W]
    return foreground.estimate_foreground(image[:, None], (1, 1, 1))
