"""The built-in reference video DiT: procedural clips, caption encoder, pipeline, training, scoring.

Modules: attributes (palette, shapes, motions, captions, held-out set), backgrounds, clips (the
generator), captions (tokenizer + CaptionEncoder), pipeline (ReferenceVideoPipeline), config
(presets: the shipped model, its long-sequence variant, a smoke one), curriculum (clip size by
training step), flow (rectified-flow math), concentration (a fine-tuning penalty on diffuse
attention), checkpoint, export, training, scoring, evaluation.
Public names below are imported lazily so that importing this package does not import diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ReferenceVideoPipeline": "pipeline",
    "CaptionEncoder": "captions",
    "CaptionTokenizer": "captions",
    "ClipSpec": "clips",
    "generate_clips": "clips",
    "render_clips": "clips",
    "MODEL_NAME": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
