"""The sample mode's foreground: estimated from a pipeline's own generated latents."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditplan.profiler import foreground
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.layout import TokenLayout
from ditplan.runtime.pipeline_calls import PipelineCall


def generated_foreground(pipe, call: dict, on_step_end: Callable | None = None) -> torch.Tensor:
    """Generate once with ``call`` (PipelineCall.arguments plus ``output_type="latent"``,
    ``return_dict=False``), ``on_step_end`` after each step, and estimate the foreground
    tokens of the result.

    The token grid is the adapter's layout of the transformer's last call: a video's latents
    ``[1, C, F, H, W]`` are patched as the transformer patches them (the patch is the latent
    size over the token grid, whichever way a family configures it); an image pipeline's
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
        latents = PipelineCall.of(pipe).invoke(pipe, call, on_step_end)[0]
    finally:
        handle.remove()
    layout = layouts[-1]
    if layout.video:  # latents [1, C, F, H, W]: a patch of each token grid cell
        patch = tuple(n // t for n, t in zip(latents.shape[-3:], layout.grid, strict=True))
        return foreground.estimate_foreground(latents[0], patch)
    image = latents[0].reshape(layout.height, layout.width, -1).permute(2, 0, 1)  # [C, H, W]
    return foreground.estimate_foreground(image[:, None], (1, 1, 1))
