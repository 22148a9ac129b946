"""ReferenceExpertsPipeline: the reference pipeline with Wan2.2 A14B's two experts and boundary."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from ditplan.reference.captions import CaptionEncoder
from ditplan.reference.pipeline import ReferenceVideoPipeline


class ReferenceExpertsPipeline(ReferenceVideoPipeline):
    """Two transformers switched as diffusers' WanPipeline switches them: ``transformer`` (the
    high-noise expert) while ``t >= boundary_ratio * num_train_timesteps``, then
    ``transformer_2``. A CPU stand-in for Wan2.2 A14B (whose WanPipeline needs ``transformers``
    and a T5 text encoder).

    Args:
        transformer, transformer_2: WanTransformer3DModels of one config (in = out = 3 channels).
        text_encoder, scheduler: as :class:`ReferenceVideoPipeline`'s.
        boundary_ratio: where the experts switch, in (0, 1); None: ``transformer`` alone
            (as WanPipeline's defaults, which a saved folder's loading needs).
    """

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2"
    _optional_components = ["transformer_2"]

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        text_encoder: CaptionEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = None,
    ):
        super().__init__(transformer, text_encoder, scheduler)
        self.register_modules(transformer_2=transformer_2)
        self.register_to_config(boundary_ratio=boundary_ratio)

    def _model_at(self, t: torch.Tensor):
        ratio = self.config.boundary_ratio
        if ratio is None or t >= ratio * self.scheduler.config.num_train_timesteps:
            return self.transformer
        return self.transformer_2
