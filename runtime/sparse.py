"""Per-layer block-mean sparse self-attention: settings, the core op, processors, apply/remove."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ditplan.policy.plan import AttentionSpec
from ditplan.runtime.context import StepState, StepTracker
from ditplan.runtime.kernels import select_and_attend
from ditplan.runtime.parallel import is_ulysses, ulysses_attention
from ditplan.runtime.permutation import TokenPermuter, install_permute_points

logger = logging.getLogger(__name__)

DENSE = AttentionSpec(density=1.0)


@dataclass
class LayerRuntime:
    """One sparse self-attention layer's settings and the shared per-forward state it reads."""

    name: str
    spec: AttentionSpec
    tracker: StepTracker
    permuter: TokenPermuter
    backend: str = "auto"
    ulysses_chunks: int = 1  # head chunks of the pipelined Ulysses all-to-all (1: diffusers')
    # Statistics are tensors once counted: a Python int that changes every call would be a
    # torch.compile guard and recompile the model each step (seen on torch 2.11, H100).
    kept_sum: torch.Tensor | float = 0.0  # sum over sparse calls of the kept block share
    sparse_calls: torch.Tensor | int = 0
    dense_calls: torch.Tensor | int = 0
    # This call's choice, set by the step tracker's listener before the forward: the layer reads
    # a bool, not the step (under torch.compile a block compiled as its own frame, as under
    # context parallelism, would otherwise specialize on every step's value and recompile).
    dense_now: bool = field(init=False)

    def __post_init__(self) -> None:
        self.follow(self.tracker.state)

    def follow(self, state: StepState) -> None:
        """Take the tracker's new state: dense or sparse attention for this call."""
        self.dense_now = self.spec.dense_at(state.step)

    def sparse_now(self) -> bool:
        return not self.dense_now

    def record_dense(self, device: torch.device) -> None:
        """Count one call that ran dense attention."""
        self.dense_calls = self.dense_calls + torch.ones((), device=device)

    def record_sparse(self, kept: torch.Tensor) -> None:
        """Count one sparse call; `kept`'s mean is the share of block pairs it computed."""
        self.kept_sum = self.kept_sum + kept.float().mean().detach()
        self.sparse_calls = self.sparse_calls + torch.ones((), device=kept.device)

    def reset_stats(self) -> None:
        self.kept_sum, self.sparse_calls, self.dense_calls = 0.0, 0, 0

    def achieved_density(self) -> float | None:
        """Share of block pairs computed over all recorded calls (dense calls count as 1)."""
        calls = float(self.sparse_calls + self.dense_calls)
        return None if calls == 0 else (float(self.kept_sum) + float(self.dense_calls)) / calls


def sparse_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerRuntime,
                          heads: slice = slice(None), key_valid: torch.Tensor | None = None):
    """Block-mean selection then block-sparse attention, with the layer's settings.

    Args:
        q, k, v: [B, H, S, D], tokens in the permuter's current order.
        layer: the layer's runtime settings.
        heads: which of the layer's heads q, k, v hold (a rank's share under Ulysses), for
            per-head densities.
        key_valid: int [B] valid keys of [video tiles | text] (padded text is its suffix,
            inside the forced text blocks), or None.

    Returns:
        [B, H, S, D] attention output.
    """
    spec, layout = layer.spec, layer.permuter.layout
    if layout is None or q.shape[2] != layout.seq_len:
        expected = (
            "no forward has set a token layout" if layout is None else f"{layout.seq_len} tokens"
        )
        raise ValueError(
            f"{layer.name}: self-attention got {q.shape[2]} tokens but the transformer's "
            f"inputs give {expected}; call the transformer, not its attention modules"
        )
    forced = layer.permuter.forced(spec.block_size, spec.sink)
    out, kept = select_and_attend(  # [B, H, S, D]; kept: its mean is the computed share
        q,
        k,
        v,
        block_size=spec.block_size,
        density=spec.head_densities[heads] if spec.head_densities else spec.density,
        mass_threshold=spec.mass_threshold,
        forced=forced,
        backend=layer.backend,
        key_valid=key_valid,
        estimate_dropped=spec.estimate_heads[heads] if spec.estimates() else False,
    )
    layer.record_sparse(kept)
    return out


class SparseProcessorBase:
    """An attention processor running block-mean sparse attention on ``layer``'s sparse steps.

    Each family subclasses it with an explicit ``__call__`` copying the original processor's
    parameter list (diffusers drops keywords a processor does not declare) that hands its
    self-attention calls, arguments unchanged, to :meth:`run`.

    Under diffusers' context parallelism ``enable_parallelism`` sets :attr:`_parallel_config`;
    the original processor gets it too (its dense steps then run diffusers' Ulysses attention)
    and the sparse steps run the sparse op inside the same all-to-all.
    """

    def __init__(self, original, layer: LayerRuntime, adapter):
        self.original = original
        self.layer = layer
        self.adapter = adapter
        self._config = None

    @property
    def _parallel_config(self):
        """diffusers' ParallelConfig of the model, or None (one process)."""
        return self._config

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self._config = config
        if hasattr(self.original, "_parallel_config"):
            self.original._parallel_config = config

    def run(self, attn: nn.Module, hidden_states: torch.Tensor, *args):
        """Dense steps: the original processor; sparse steps: the adapter's q/k/v, the sparse
        op on [video | text], the adapter's output projection."""
        if not self.layer.sparse_now():
            self.layer.record_dense(hidden_states.device)
            return self.original(attn, hidden_states, *self.original_args(attn, args))
        call = self.adapter.attention_call(attn, self.layer.permuter.layout, hidden_states, *args)
        q, k, v = call.joint()  # [B, S, H, D]; S: this rank's tokens under Ulysses
        if is_ulysses(self._config):
            if call.key_valid is not None:
                raise NotImplementedError(f"{self.layer.name}: a text mask (key padding) under "
                                          "context parallelism is not supported yet: call with "
                                          "one prompt per call (no text mask)")
            segments = tuple(x.shape[1] for x in (call.q_v, call.q_t) if x is not None)
            out = ulysses_attention(q, k, v, self._config, self._attend, segments,
                                    self.layer.ulysses_chunks)  # [B, S, H, D]
        else:
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D]
            out = self._attend(q, k, v, key_valid=call.key_valid).transpose(1, 2)
        return self.adapter.attention_return(attn, call, *call.split(out))

    def original_args(self, attn: nn.Module, args: tuple) -> tuple:
        """The arguments after ``hidden_states`` as the original processor takes them (a
        family whose permute points change a tensor's form converts it back here)."""
        return args

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                heads: slice = slice(None), key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """The sparse op on [B, h, S, D] for the layer's heads ``heads``."""
        return sparse_self_attention(q, k, v, self.layer, heads, key_valid)


def resolve_layer_specs(
    names: list[str], settings: AttentionSpec | Mapping[str, AttentionSpec]
) -> dict[str, AttentionSpec]:
    """One spec per attention layer: a single spec applies to all, a mapping names layers."""
    if isinstance(settings, AttentionSpec):
        return dict.fromkeys(names, settings)
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(
            f"settings name attention layers this model does not have: {unknown}; "
            f"its self-attention layers are {names[0]} ... {names[-1]} ({len(names)} layers)"
        )
    return {name: settings.get(name, DENSE) for name in names}


def shared_tile(specs: Mapping[str, AttentionSpec]) -> tuple[int, int, int]:
    """The permutation tile of the sparse layers, which must agree (tokens permute once)."""
    tiles = {spec.tile for spec in specs.values() if not spec.is_dense}
    if len(tiles) > 1:
        raise ValueError(
            f"sparse layers use different tile shapes {sorted(tiles)}; tokens are permuted once "
            "per forward, so give every sparse layer the same tile"
        )
    return tiles.pop() if tiles else (1, 1, 1)


def check_head_counts(transformer: nn.Module, adapter,
                      specs: Mapping[str, AttentionSpec]) -> None:
    """ValueError unless every sparse layer's per-head settings give one value per head (call
    before installing anything: nothing is changed when it raises)."""
    for name, attn in adapter.attention_layers(transformer):
        spec = specs[name]
        for setting, values in (("head_densities", spec.head_densities),
                                ("estimate_heads", spec.estimate_heads)):
            if not spec.is_dense and values is not None and len(values) != attn.heads:
                raise ValueError(f"{name}: {setting} gives {len(values)} values but the layer "
                                 f"has {attn.heads} heads; compile the plan for this model")


def install_sparse_layers(
    transformer: nn.Module,
    adapter,
    specs: Mapping[str, AttentionSpec],
    tracker: StepTracker,
    permuter: TokenPermuter,
    backend: str,
    ulysses_chunks: int = 1,
) -> tuple[dict[nn.Module, object], list[LayerRuntime], list]:
    """Swap in the adapter's sparse processor for every non-dense layer and install the
    permute points (a static permutation, see :class:`TokenPermuter`), compact where every
    layer runs the sparse processor (a dense layer's own processor reads the full tensors).

    Returns:
        (original processors by module, the layers' runtimes, removable hook handles).
    """
    originals, runtimes = {}, []
    layers = adapter.attention_layers(transformer)
    for name, attn in layers:
        spec = specs[name]
        if spec.is_dense:
            continue
        runtime = LayerRuntime(name, spec, tracker, permuter, backend, ulysses_chunks)
        runtimes.append(runtime)
        density = min(spec.head_densities) if spec.head_densities else spec.density
        permuter.build_forced_at_begin(spec.block_size, spec.sink, layer=name, density=density)
        originals[attn] = attn.processor
        attn.set_processor(adapter.processor_class(attn.processor, runtime, adapter))
        logger.debug("%s: sparse attention %s", name, runtime.spec)
    for runtime in runtimes:
        tracker.listeners.append(runtime.follow)
    every_layer = len(runtimes) == len(layers)
    return originals, runtimes, install_permute_points(transformer, adapter, permuter,
                                                       compact=every_layer)


def restore_processors(originals: Mapping[nn.Module, object]) -> None:
    for attn, processor in originals.items():
        attn.set_processor(processor)
