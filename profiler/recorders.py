"""Profiling hooks: attention-statistics processors, block-residual and output-change hooks.

Installed on a transformer, the recorder never changes what it computes: each self-attention
layer keeps its original processor and returns that processor's output untouched; the
statistics come from a second, side computation of q and k. Rows stay on the device until
``take_rows`` (one host copy per table per prompt).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ditplan.profiler import metrics
from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.output_error import output_errors
from ditplan.profiler.rows import TraceRows
from ditplan.runtime.adapters.base import block_io, get_adapter
from ditplan.runtime.context import (
    DEFAULT_CONTEXT,
    StepState,
    install_step_tracker,
    remove_step_tracker,
)
from ditplan.runtime.kernels.block_map import forced_blocks
from ditplan.runtime.layout import AttnCall, BlockStreams, ForwardArgument, TokenLayout
from ditplan.runtime.permutation import TokenPermuter

logger = logging.getLogger(__name__)

CONTEXT_NAMES = {"cond": "cond", "uncond": "uncond", DEFAULT_CONTEXT: "cond"}


class _RecordingRun:
    """Mixed in before a family's sparse processor class (:func:`recording_processor_class`):
    that class's ``__call__`` (the original processor's exact parameters) hands self-attention
    calls to :meth:`run`, which runs the original processor and then records statistics."""

    def __init__(self, original, block: str, recorder: ProfileRecorder):
        super().__init__(original, None, recorder.adapter)
        self.block = block
        self.recorder = recorder

    def run(self, attn, hidden_states, *args):
        out = self.original(attn, hidden_states, *self.original_args(attn, args))
        if self.recorder.call.record_attention:
            with torch.no_grad():
                call = self.adapter.attention_call(attn, self.recorder.layout, hidden_states,
                                                   *args)
                self.recorder.record_attention(self.block, call)
        return out


@functools.cache
def recording_processor_class(processor_class: type) -> type:
    """The recorder's processor for a family: ``processor_class`` with a recording ``run``."""
    return type(f"Recording{processor_class.__name__}", (_RecordingRun, processor_class), {})


class CallState:
    """Token masks of one transformer call, in the permuted (tiled) order, plus step and branch."""

    def __init__(self, step: int, cfg: str, layout: TokenLayout, permuter: TokenPermuter,
                 settings: RecorderSettings, foreground: torch.Tensor | None):
        self.step, self.cfg, self.layout = step, cfg, layout
        device = permuter.device
        self.perm = permuter.sequence_perm  # [S]: [video | text] -> the sparse op's order
        self.forced = permuter.forced(settings.block_size, settings.sink)
        sink, text = permuter.token_masks()  # [S] each, the sparse op's order
        self.video = ~text
        self.sink_blocks = forced_blocks(layout.seq_len, settings.block_size,
                                         sink_tokens=sink, diagonal=False).cols
        self.text_blocks = forced_blocks(layout.seq_len, settings.block_size,
                                         text_tokens=text, diagonal=False).cols
        self.foreground = self._foreground(foreground, device)  # [S] permuted order
        self.record_map = step in settings.map_steps
        steps = settings.attention_steps
        self.record_attention = steps is None or step in steps

    def _foreground(self, foreground: torch.Tensor | None, device) -> torch.Tensor:
        layout = self.layout
        full = torch.zeros(layout.seq_len, dtype=torch.bool, device=device)
        if foreground is None:
            return full
        if foreground.numel() != layout.video_tokens:
            raise ValueError(f"the foreground mask has {foreground.numel()} tokens but the "
                             f"transformer sees a {layout.grid} grid ({layout.video_tokens})")
        full[:layout.video_tokens] = foreground.to(device).flatten()  # [video | text]
        return full[self.perm]


class ProfileRecorder:
    """Installs profiling hooks on a transformer (``with ProfileRecorder(...) as rec:``).

    Args:
        transformer: a transformer with an adapter (get_adapter).
        settings: RecorderSettings.
        num_inference_steps: steps per generation, for pipelines that do not pass
            ``step_index`` through ``cache_context`` (then calls are counted).
    """

    def __init__(self, transformer: nn.Module, settings: RecorderSettings,
                 num_inference_steps: int | None = None):
        self.transformer = transformer
        self.settings = settings
        self.adapter = get_adapter(transformer)
        self.block_of = {attn: block for block, attn in
                         self.adapter.model_config(transformer, 0)["self_attention"].items()}
        self.num_inference_steps = num_inference_steps
        self.rows = TraceRows(settings)
        self.foreground: torch.Tensor | None = None
        self.call: CallState | None = None
        self._permuter = TokenPermuter(settings.tile)
        self.layout: TokenLayout | None = None  # of the latest call
        # Text tokens of the latest call: the joint sequence's (layout), else encoder_hidden_states'
        # length (cross-attention keys); they differ where several inputs join the text
        # (HunyuanVideo-1.5).
        self.text_len = 0
        self._previous: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}
        self._originals: dict[nn.Module, object] = {}
        self._handles: list = []

    def __enter__(self) -> ProfileRecorder:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def install(self) -> None:
        """Register the step tracker, the processors and the hooks."""
        forward = self.transformer.forward
        self._latents = ForwardArgument.of(forward, "hidden_states")
        self._text = ForwardArgument.of(forward, "encoder_hidden_states")
        tracker = install_step_tracker(self.transformer, self.num_inference_steps)
        tracker.listeners.append(self._on_step)
        self._handles.append(self.transformer.register_forward_pre_hook(
            self._on_forward_pre, with_kwargs=True))
        self._handles.append(self.transformer.register_forward_hook(
            self._on_output, with_kwargs=True))
        recording = recording_processor_class(self.adapter.processor_class)
        for name, attn in self.adapter.attention_layers(self.transformer):
            self._originals[attn] = attn.processor
            attn.set_processor(recording(attn.processor, self.block_of[name], self))
        io = block_io(self.adapter, self.transformer)
        for name, block in self.adapter.blocks(self.transformer):
            hook = self._block_hook(name, io[name].bind(block.forward))
            self._handles.append(block.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        """Restore the original processors and remove every hook."""
        for attn, processor in self._originals.items():
            attn.set_processor(processor)
        for handle in self._handles:
            handle.remove()
        remove_step_tracker(self.transformer)
        self._originals, self._handles = {}, []

    def set_foreground(self, mask: torch.Tensor | None) -> None:
        """Foreground video tokens (bool [F*H*W], diffusers' order) for the following calls."""
        self.foreground = None if mask is None else mask.flatten().bool()

    def take_rows(self) -> TraceRows:
        """The rows recorded since the last call; also forgets the previous-step tensors."""
        rows, self.rows = self.rows, TraceRows(self.settings)
        self._previous.clear()
        return rows

    def _on_forward_pre(self, module, args, kwargs) -> None:
        latents = self._latents.get(args, kwargs)  # Wan [B, C, F, H, W]; FLUX [B, S, C]
        text = self._text.get(args, kwargs)  # [B, L, C]
        self.layout = self.adapter.token_layout(module, args, kwargs)
        self.text_len = self.layout.text_len or (0 if text is None else int(text.shape[1]))
        self._permuter.begin(self.layout, latents.device)

    def _on_step(self, state: StepState) -> None:
        if state.context not in CONTEXT_NAMES:
            raise ValueError(f"the pipeline calls the transformer in cache context "
                             f"{state.context!r}; the profiler knows {sorted(CONTEXT_NAMES)}")
        self.call = CallState(state.step, CONTEXT_NAMES[state.context], self.layout,
                              self._permuter, self.settings, self.foreground)

    def record_attention(self, layer: str, attention: AttnCall) -> None:
        """Statistics of one self-attention call (called by the recording processors)."""
        call, settings = self.call, self.settings
        joint = attention.joint()  # q, k, v [B, S, H, D]
        q, k = (x.transpose(1, 2)[:, :, call.perm]  # [B, H, S, D] in tiled order, as the
                for x in joint[:2])  # runtime sees them
        summary = metrics.attention_summary(q, k, block_size=settings.block_size,
                                            tile_rows=settings.tile_rows,
                                            key_valid=attention.key_valid)  # text padding
        maps = metrics.predicted_block_maps(q, k, block_size=settings.block_size,
                                            densities=settings.densities, forced=call.forced)
        curves = metrics.recall_at_densities(q, k, summary, densities=settings.densities,
                                             forced=call.forced, predicted_maps=maps)
        errors = None if not settings.output_error else output_errors(
            q, k, joint[2].transpose(1, 2)[:, :, call.perm], block_size=settings.block_size,
            densities=settings.densities, forced=call.forced, key_valid=attention.key_valid,
            block_maps=maps)  # [B, H, D, 2]; v permuted only when measured
        fg = metrics.foreground_stats(summary.received, call.foreground, call.video,
                                      settings.attn_threshold)
        stats = torch.stack([  # [B, H, 6], columns as TraceRows.STATS
            metrics.mass_on_blocks(summary, call.sink_blocks),
            metrics.mass_on_blocks(summary, call.text_blocks),
            summary.entropy, fg.r_attn, fg.fg_bg_mass_ratio,
            fg.foreground_fraction.expand_as(fg.r_attn),
        ], dim=-1)
        recall = torch.stack([curves.predicted, curves.oracle, curves.kept_fraction], -1)
        block_map = summary.block_mass.mean(0) if call.record_map else None
        self.rows.add_attention(call.step, call.cfg, layer, stats.mean(0), recall.mean(0),
                                None if errors is None else errors.mean(0), block_map)

    def _block_hook(self, name: str, streams: BlockStreams):
        def hook(module, args, kwargs, output):
            hidden_in = streams.video_input(args, kwargs)  # [B, S, C]
            hidden_out = streams.video_output(output)
            self._record_change(name, hidden_out.detach() - hidden_in.detach())

        return hook

    def _on_output(self, module, args, kwargs, output) -> None:
        sample = output[0] if isinstance(output, tuple) else output.sample  # [B, C, F, H, W]
        self._record_change(self.rows.OUTPUT, sample.detach().clone())

    def _record_change(self, layer: str, value: torch.Tensor) -> None:
        call = self.call
        key = (call.cfg, layer)
        previous = self._previous.get(key)
        if previous is not None and previous[0] == call.step - 1:
            self.rows.add_change(call.step, call.cfg, layer,
                                 metrics.step_change(value, previous[1]))
        self._previous[key] = (call.step, value.detach())
