"""Transformer forward per model family at its full-size shape: dense vs sparse attention at d=0.2.

Usage: python -m benchmarks.families [--families NAME ...] [--backend flex|fa4|auto] [--repeats 3]
       [--estimate-too] [--json PATH] [--quick]

Per family (benchmarks/family_configs.py: Wan2.2-TI2V-5B at 704 x 1280 x 121 frames, 27,280
tokens; Qwen-Image at 1328 x 1328, 6,889 tokens; FLUX.1-dev at 2048 x 2048, 16,384 tokens;
HunyuanVideo at 720p x 129 frames, 118,800 + 256 text tokens, 13B), one after another in one
process on one GPU:

1. build the transformer from its published config with random weights, in bf16 directly on
   the GPU (constructed under ``torch.device("cuda")`` with bf16 as the default dtype: no fp32
   copy, no CPU initialisation), and random inputs of the pipeline's shapes;
2. time one no-grad forward dense: one warm-up, then ``--repeats`` timed calls (median, CUDA
   events) and the peak allocated memory over them;
3. install ``apply_sparse_attention`` at density 0.2 in every self-attention layer (``--backend``,
   default flex; fa4 refuses key padding, which a text mask makes: ``auto`` runs flex there; the
   warm-up compiles the kernels), time it the same way, compare its
   output with dense's (relative L2 difference: nonzero when sparse attention ran) and remove it;
   with ``--estimate-too`` the same again with every head estimating its dropped key blocks from
   block means (``AttentionSpec.estimate_heads``; the joint-attention families' padded text
   goes through the estimate's key-padding path);
4. free the model (del, ``torch.cuda.empty_cache()``) before the next family.

Prints a table (family, tokens, dense ms, sparse ms, speedup, achieved density, peak GiB of
each) and writes the rows with ``--json`` after every family. All four at ``--repeats 3`` should
take about 5-6 minutes on one H200 (an estimate from FLOPs, not yet measured): HunyuanVideo's
eight forwards at 119k tokens (dense about 30-40 s each) are most of it, the others about 40 s
each with the flex compilation; ``--families`` runs a subset, ``--repeats 2`` saves a forward
of each kind. ``--quick``: tiny configs of the same classes on the CPU (torch kernels, blocks of
64), for the CPU smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
from functools import partial

import diffusers
import torch

from benchmarks.common import banner, time_ms_and_peak
from benchmarks.family_configs import FULL, QUICK, FamilyShape
from ditplan.policy.plan import AttentionSpec
from ditplan.runtime.apply import apply_sparse_attention

DENSITY = 0.2
CLASSES = {
    "wan22_ti2v_5b": "WanTransformer3DModel",
    "hunyuan_video": "HunyuanVideoTransformer3DModel",
    "qwen_image": "QwenImageTransformer2DModel",
    "flux1_dev": "FluxTransformer2DModel",
}


def _wan_inputs(shape: FamilyShape) -> dict:
    cfg, (frames, rows, cols) = shape.config, shape.grid
    pt, ph, pw = cfg["patch_size"]
    return dict(  # latents [B, C, F, H, W], UMT5 text [B, L, D]
        hidden_states=torch.randn(1, cfg["in_channels"], frames * pt, rows * ph, cols * pw),
        timestep=torch.full((1, shape.tokens), 500.0),  # [B, S]: TI2V-5B's per-token timestep
        encoder_hidden_states=torch.randn(1, shape.text, cfg["text_dim"]),
    )


def _hunyuan_inputs(shape: FamilyShape) -> dict:
    cfg, (frames, rows, cols) = shape.config, shape.grid
    p, pt = cfg["patch_size"], cfg["patch_size_t"]
    return dict(  # latents [B, C, F, H, W], Llama text [B, L, D], CLIP pooled [B, D]
        hidden_states=torch.randn(1, cfg["in_channels"], frames * pt, rows * p, cols * p),
        timestep=torch.full((1,), 500.0),
        encoder_hidden_states=torch.randn(1, shape.text, cfg["text_embed_dim"]),
        encoder_attention_mask=torch.ones(1, shape.text, dtype=torch.long),  # [B, L] all valid
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"]),
        guidance=torch.full((1,), 6.0 * 1000),
    )


def _qwen_image_inputs(shape: FamilyShape) -> dict:
    cfg, (_, rows, cols) = shape.config, shape.grid
    return dict(
        hidden_states=torch.randn(1, shape.tokens, cfg["in_channels"]),  # packed 2 x 2 latents
        encoder_hidden_states=torch.randn(1, shape.text, cfg["joint_attention_dim"]),
        timestep=torch.full((1,), 0.5),
        img_shapes=[[(1, rows, cols)]],
    )


def _flux_inputs(shape: FamilyShape) -> dict:
    cfg, (_, rows, cols) = shape.config, shape.grid
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"))
    return dict(
        hidden_states=torch.randn(1, shape.tokens, cfg["in_channels"]),  # packed 2 x 2 latents
        encoder_hidden_states=torch.randn(1, shape.text, cfg["joint_attention_dim"]),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"]),
        timestep=torch.full((1,), 0.5),
        img_ids=torch.cat([torch.zeros(1, rows, cols), grid]).flatten(1).T,  # [S, 3]: 0, row, col
        txt_ids=torch.zeros(shape.text, 3),
        guidance=torch.full((1,), 3.5),
    )


INPUTS = {"wan22_ti2v_5b": _wan_inputs, "hunyuan_video": _hunyuan_inputs,
          "qwen_image": _qwen_image_inputs, "flux1_dev": _flux_inputs}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(family: str, shape: FamilyShape, device: str, dtype: torch.dtype):
    """The family's transformer (random weights, made in ``dtype`` on ``device``, eval) and its
    forward inputs."""
    with torch.device(device), default_dtype(dtype):
        model = getattr(diffusers, CLASSES[family])(**shape.config).eval()
        inputs = INPUTS[family](shape)
    return model, inputs


def measure(family: str, shape: FamilyShape, device: str, dtype: torch.dtype, backend: str,
            spec: AttentionSpec, repeats: int, estimate: bool = False) -> dict:
    """One family's row: dense and sparse (``spec`` in every self-attention layer) forward
    times, peaks, the density the sparse calls reached and the output difference; with
    ``estimate`` also the sparse forward with every head estimating its dropped blocks."""
    model, inputs = build(family, shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    outputs: dict[str, torch.Tensor] = {}
    dense_ms, dense_peak = time_ms_and_peak(partial(_forward, model, inputs, outputs, "dense"),
                                            warmup=1, repeats=repeats)
    handle = apply_sparse_attention(model, spec, backend=backend)
    sparse_ms, sparse_peak = time_ms_and_peak(
        partial(_forward, model, inputs, outputs, "sparse"), warmup=1, repeats=repeats)
    densities = [layer.achieved_density() for layer in handle.layers]
    handle.remove()
    dense = outputs["dense"].float()
    row = dict(family=family, model=CLASSES[family], params_b=params / 1e9, tokens=shape.tokens,
               grid=list(shape.grid), text_tokens=shape.text, dense_ms=dense_ms,
               sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms, dense_peak_gib=dense_peak,
               sparse_peak_gib=sparse_peak, density=sum(densities) / len(densities),
               sparse_rel_diff=_rel_diff(outputs["sparse"], dense))
    if estimate:
        heads = (True,) * model.config.num_attention_heads
        handle = apply_sparse_attention(model, dataclasses.replace(spec, estimate_heads=heads),
                                        backend=backend)
        row["estimated_ms"], row["estimated_peak_gib"] = time_ms_and_peak(
            partial(_forward, model, inputs, outputs, "estimated"), warmup=1, repeats=repeats)
        handle.remove()
        row["estimated_speedup"] = dense_ms / row["estimated_ms"]
        row["estimated_rel_diff"] = _rel_diff(outputs["estimated"], dense)
    del model, inputs, outputs, dense, handle
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _rel_diff(out: torch.Tensor, dense: torch.Tensor) -> float:
    """||out - dense|| / ||dense|| (dense in float32)."""
    return float((out.float() - dense).norm() / dense.norm())


def _forward(model, inputs: dict, outputs: dict, kind: str) -> None:
    """One no-grad forward; its output (the transformer's sample) kept as ``outputs[kind]``."""
    with torch.no_grad():
        outputs[kind] = model(**inputs, return_dict=False)[0]


def report(rows: list[dict]) -> None:
    print(f"\n{'family':<15} {'tokens':>8} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8} "
          f"{'density':>8} {'dense GiB':>10} {'sparse GiB':>10}")
    for r in rows:
        print(f"{r['family']:<15} {r['tokens']:>8} {r['dense_ms']:10.1f} {r['sparse_ms']:10.1f} "
              f"{r['speedup']:7.2f}x {r['density']:8.3f} {r['dense_peak_gib']:10.2f} "
              f"{r['sparse_peak_gib']:10.2f}")
    for r in rows:
        if "estimated_ms" in r:
            print(f"{r['family']:<15} estimated: {r['estimated_ms']:.1f} ms "
                  f"({r['estimated_speedup']:.2f}x), relative difference to dense "
                  f"{r['sparse_rel_diff']:.4f} sparse -> {r['estimated_rel_diff']:.4f} estimated")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FULL), default=list(FULL),
                        help="in this order by default (HunyuanVideo, the longest, last)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per variant")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--backend", default="flex", choices=["flex", "fa4", "auto"],
                        help="sparse kernel backend on the GPU (default flex)")
    parser.add_argument("--estimate-too", action="store_true",
                        help="also time sparse with every head estimating its dropped blocks")
    parser.add_argument("--quick", action="store_true", help="tiny configs on the CPU")
    args = parser.parse_args(argv)
    if args.quick:  # 64-token blocks: the tiny grids' ~1,200 tokens make ~19 blocks
        device, backend, shapes, block = "cpu", "torch", QUICK, 64
    elif torch.cuda.is_available():
        device, backend, shapes, block = "cuda", args.backend, FULL, 128
    else:
        parser.error("the full-size shapes need a CUDA GPU; --quick runs tiny ones on the CPU")
    spec = AttentionSpec(density=DENSITY, block_size=block)
    print(f"{banner()} | {backend} kernels, density {DENSITY}, blocks of {block}, "
          f"{args.repeats} timed forwards", flush=True)
    result = dict(banner=banner(), backend=backend, density=DENSITY, block_size=block,
                  repeats=args.repeats, rows=[])
    for family in args.families:
        row = measure(family, shapes[family], device, torch.bfloat16, backend, spec,
                      args.repeats, estimate=args.estimate_too)
        result["rows"].append(row)
        print(f"  {family}: dense {row['dense_ms']:.1f} ms, sparse {row['sparse_ms']:.1f} ms, "
              f"{row['speedup']:.2f}x", flush=True)
        if args.json:  # after every family: a run cut short keeps the finished rows
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    report(result["rows"])
    return result


if __name__ == "__main__":
    main()
