"""Tiny diffusers models built from config, so tests never need downloaded weights."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from ditplan.reference.config import SMOKE

# The reference model's 2-layer smoke preset: 2 heads of 16, 3 channels, 16-dim text.
TINY_WAN_CONFIG = dict(SMOKE.transformer)


def tiny_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A 2-layer WanTransformer3DModel with random weights, in eval mode, fp32 on CPU."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_WAN_CONFIG, **overrides})
    return model.eval()


def tiny_wan_inputs(
    frames: int = 3,
    height: int = 8,
    width: int = 12,
    text_len: int = 5,
    batch: int = 1,
    seed: int = 1,
) -> dict:
    """Random tiny-Wan inputs; height and width are latent pixels (tokens = height/2 * width/2)."""
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_WAN_CONFIG
    return dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], frames, height, width, generator=g),
        timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, text_len, cfg["text_dim"], generator=g),
    )


def tiny_wan_plan(
    model,
    *,
    steps: int = 4,
    cfg: bool = True,
    densities: tuple[float, ...] = (0.3, 1.0),
    dense_steps: tuple[int, ...] = (0,),
    cache_compute: tuple[bool, ...] | None = None,
    tokens_grid: tuple[int, int, int] | None = None,
    block_size: int = 64,
):
    """A valid plan for ``model`` (a tiny Wan): per-block densities, block 1 cached if asked."""
    from ditplan.policy.plan import (
        AttentionSpec,
        BlockRun,
        LayerPlan,
        ModelIdentity,
        Plan,
        PlanDefaults,
        Provenance,
        RoleClassification,
        Workload,
    )
    from ditplan.runtime.fingerprint import model_fingerprint

    blocks = tuple(f"blocks.{i}" for i in range(len(model.blocks)))
    roles = ["foreground"] * len(blocks)
    groups = ()
    if cache_compute is not None:
        roles[-1] = "background"
        contexts = ("cond", "uncond") if cfg else ("cond",)
        groups = (BlockRun.from_masks(blocks[-1:], dict.fromkeys(contexts, cache_compute)),)
    specs = [
        AttentionSpec(
            density=d, block_size=block_size, tile=(1, 2, 2), sink=False, dense_steps=dense_steps
        )
        for d in densities
    ]
    return Plan(
        identity=ModelIdentity(**model_fingerprint(model)),
        workload=Workload(
            steps=steps,
            height=16,
            width=24,
            frames=3,
            guidance_scale=5.0,
            cfg=cfg,
            tokens_grid=tokens_grid,
        ),
        provenance=Provenance(
            trace_hash="0" * 64,
            compiler_version="test",
            compiler_settings={},
            roles=RoleClassification("fixed", ("r_attn",), None, dict.fromkeys(blocks, 1.0)),
            predicted_speedup=1.5,
            predicted_error=0.0,
        ),
        defaults=PlanDefaults(AttentionSpec()),
        block_order=blocks,
        layers={
            b: LayerPlan(r, f"{b}.attn1", s) for b, r, s in zip(blocks, roles, specs, strict=True)
        },
        runs=groups,
    )


def tiny_reference_pipeline():
    """The reference pipeline at the 2-layer SMOKE preset, random weights, fp32 on CPU."""
    from ditplan.reference.config import (
        build_caption_encoder,
        build_scheduler,
        build_transformer,
    )
    from ditplan.reference.pipeline import ReferenceVideoPipeline

    torch.manual_seed(0)
    return ReferenceVideoPipeline(
        build_transformer(SMOKE).eval(), build_caption_encoder(SMOKE).eval(), build_scheduler(SMOKE)
    )


TINY_PROMPTS = ("a red circle slowly moves right", "a blue square quickly moves up")


def tiny_reference_latents(pipe, steps: int) -> torch.Tensor:
    """The final latents [B, 3, F, H, W] of :data:`TINY_PROMPTS` (seeds 0, 1) at 3 x 16 x 16,
    guidance 4."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(TINY_PROMPTS))]
    return pipe(list(TINY_PROMPTS), num_inference_steps=steps, guidance_scale=4.0, num_frames=3,
                height=16, width=16, generator=generators, output_type="latent").frames


def tiny_plan_with_run(pipe, run, steps: int):
    """A dense :func:`tiny_wan_plan` for ``pipe``'s transformer whose only block run is ``run``."""
    from dataclasses import replace

    plan = tiny_wan_plan(pipe.transformer, steps=steps, densities=(1.0, 1.0), dense_steps=())
    return replace(plan, runs=(run,))


def saved_tiny_reference_pipeline(folder):
    """:func:`tiny_reference_pipeline` saved as a diffusers folder (what ``--model`` takes)."""
    path = folder / "tiny-ref"
    tiny_reference_pipeline().save_pretrained(path)
    return path


def run_cfg_steps(model, inputs: dict, steps: int) -> list:
    """Call ``model`` for ``steps`` steps x ("cond", "uncond") as a CFG pipeline does; outputs."""
    outs = []
    with torch.no_grad():
        for step in range(steps):
            for context in ("cond", "uncond"):
                with model.cache_context(context, step_index=step):
                    outs.append(model(**inputs).sample)
    return outs


def run_steps(model, inputs: dict, steps: int = 1, context: str | None = None) -> list:
    """``steps`` forwards of ``model`` on ``inputs`` without grad, in cache context ``context``
    (step_index = the step) if given; their ``.sample`` outputs."""
    outs = []
    with torch.no_grad():
        for step in range(steps):
            if context is None:
                outs.append(model(**inputs).sample)
            else:
                with model.cache_context(context, step_index=step):
                    outs.append(model(**inputs).sample)
    return outs
