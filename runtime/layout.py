"""Token-order facts shared by the runtime: token layout, block streams, permute points, q/k/v."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one self-attention sequence come from.

    ``frames``, ``height`` and ``width`` are the video token grid (after patching); ``text_len``
    text tokens join the sequence (0 for cross-attention models such as Wan). ``text_first``
    records the model's native order only: the sparse op always sees [video tiles | text]
    (design D4). ``video`` is False for image models: one frame, 2-D tiles, no first-frame sink.
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_first: bool = False
    video: bool = True

    def __post_init__(self):
        if min(self.frames, self.height, self.width) < 1 or self.text_len < 0:
            raise ValueError(f"token layout must have a non-empty video grid, got {self}")
        if not self.video and self.frames != 1:
            raise ValueError(f"an image token layout has one frame, got {self}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_len


@dataclass(frozen=True)
class ForwardArgument:
    """Where a module's forward receives one named parameter: by keyword, else at a position.

    Resolved once against the forward's signature, so a positional call (Wan's blocks) and a
    keyword call (FLUX's) are read and rewritten alike.
    """

    name: str
    position: int | None  # None: keyword-only

    @classmethod
    def of(cls, forward, name: str) -> ForwardArgument:
        """``name``'s slot in ``forward``'s signature (a bound method, hooks unwrapped)."""
        parameters = list(inspect.signature(forward).parameters.values())
        for position, parameter in enumerate(parameters):
            if parameter.name == name:
                positional = parameter.kind in (parameter.POSITIONAL_ONLY,
                                                parameter.POSITIONAL_OR_KEYWORD)
                return cls(name, position if positional else None)
        raise ValueError(f"{getattr(forward, '__qualname__', forward)} has no parameter {name!r}; "
                         f"its parameters are {[p.name for p in parameters]}")

    def get(self, args: tuple, kwargs: dict):
        """The argument's value in this call, or None when the call leaves it at its default."""
        if self.name in kwargs:
            return kwargs[self.name]
        if self.position is not None and self.position < len(args):
            return args[self.position]
        return None

    def replace(self, args: tuple, kwargs: dict, value) -> tuple[tuple, dict]:
        """The call with this argument set to ``value`` (by keyword when the call left it out)."""
        position = self.position
        if self.name in kwargs or position is None or position >= len(args):
            return args, {**kwargs, self.name: value}
        return (*args[:position], value, *args[position + 1:]), kwargs


@dataclass(frozen=True)
class StreamIO:
    """How a block carries hidden states: the parameters of its streams and its output order.

    ``video`` and ``text`` name the block forward's parameters holding the video (or image) and
    text streams, [B, S, C] each; ``text`` is None for blocks of one stream. ``outputs`` is the
    order of the returned streams: ("video",) for a block returning the video tensor alone,
    ("text", "video") for FLUX's blocks, which return the tuple (text, image).
    """

    video: str
    text: str | None = None
    outputs: tuple[str, ...] = ("video",)

    def __post_init__(self):
        if sorted(self.outputs) != sorted(self.streams):
            raise ValueError(f"a block's outputs {self.outputs} must be its streams "
                             f"{self.streams} in some order")

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams in ditplan's order: ("video",) or ("video", "text")."""
        return ("video",) if self.text is None else ("video", "text")

    def bind(self, forward) -> BlockStreams:
        """This IO resolved against one block's forward (its signature is read once here)."""
        return BlockStreams(self, tuple(ForwardArgument.of(forward, getattr(self, stream))
                                        for stream in self.streams))


@dataclass(frozen=True)
class BlockStreams:
    """A :class:`StreamIO` resolved against one block: reads and rewrites its streams.

    Streams travel as tuples in :attr:`StreamIO.streams` order, (video,) or (video, text),
    [B, S, C] each.
    """

    io: StreamIO
    arguments: tuple[ForwardArgument, ...]  # one per stream, in io.streams order

    @property
    def keys(self) -> frozenset:
        """The stream arguments' positions and names (how a call may pass them)."""
        return frozenset({a.name for a in self.arguments}
                         | {a.position for a in self.arguments if a.position is not None})

    def inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The streams this call passes."""
        return tuple(argument.get(args, kwargs) for argument in self.arguments)

    def with_inputs(self, args: tuple, kwargs: dict, values: tuple[torch.Tensor, ...]):
        """The call with its streams replaced by ``values``."""
        for argument, value in zip(self.arguments, values, strict=True):
            args, kwargs = argument.replace(args, kwargs, value)
        return args, kwargs

    def outputs(self, output) -> tuple[torch.Tensor, ...]:
        """The streams of the block's return value."""
        if len(self.io.outputs) == 1:
            return (output,)
        return tuple(output[self.io.outputs.index(stream)] for stream in self.io.streams)

    def native(self, streams: tuple[torch.Tensor, ...]):
        """The block's return value carrying ``streams`` (the tensor itself, or a tuple in
        the block's output order)."""
        if len(self.io.outputs) == 1:
            return streams[0]
        return tuple(streams[self.io.streams.index(stream)] for stream in self.io.outputs)

    def video_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The video stream this call passes, [B, S, C]."""
        return self.arguments[0].get(args, kwargs)

    def video_output(self, output) -> torch.Tensor:
        """The video stream of the block's return value, [B, S, C]."""
        return self.outputs(output)[0]


@dataclass(frozen=True)
class PermutePoint:
    """Where a token-ordered tensor enters or leaves the transformer, and how it is permuted.

    ``module`` is a submodule path ("" for the transformer); ``kind`` one of
    ``model_input`` (a transformer forward argument, before any diffusers hook),
    ``module_input`` (a submodule forward argument), ``module_output`` (a submodule's return
    value, through a diffusers hook) or ``unpermute_output`` (a submodule's return value, put
    back in the native token order). ``index`` names the argument of an input point, and for
    an output point indexes a tuple return value (None: the value itself). ``dim`` is the
    token dimension; an input without it (Wan's [B] timestep, unlike TI2V's [B, S]) is left
    alone. ``channels`` (start, step), for a ``module_output`` point, keeps only the last
    dimension's channels ``start::step``, copied compact with the permuted tokens: Wan's rotary
    tables hold every value twice and its attention reads one of each pair (cos at even, sin
    at odd channels), so the permuted tables take half the memory of diffusers' own.
    """

    module: str
    kind: str
    index: str | int | None
    dim: int
    channels: tuple[int, int] | None = None

    KINDS = ("model_input", "module_input", "module_output", "unpermute_output")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"permute point kind must be one of {self.KINDS}, got {self.kind!r}")
        if self.channels is not None and self.kind != "module_output":
            raise ValueError(f"only module_output points keep a channel subset, not {self.kind}")


@dataclass(frozen=True)
class AttnCall:
    """One self- or joint-attention call's q, k, v per stream, [B, S, H, D] each.

    Projected, normed and rotated with the family's own arithmetic; the text stream is None for
    video-only self-attention (Wan). ``key_valid`` (int [B]: valid keys of the sequence
    [video | text]) is None when every key is valid.
    """

    q_v: torch.Tensor
    k_v: torch.Tensor
    v_v: torch.Tensor
    q_t: torch.Tensor | None = None
    k_t: torch.Tensor | None = None
    v_t: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None

    def joint(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of the sequence [video | text], [B, S_vid + S_txt, H, D] each."""
        if self.q_t is None:
            return self.q_v, self.k_v, self.v_v
        return tuple(torch.cat(pair, dim=1) for pair in
                     ((self.q_v, self.q_t), (self.k_v, self.k_t), (self.v_v, self.v_t)))

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An output [B, S_vid + S_txt, H, D] of the joint sequence -> (video, text or None)."""
        if self.q_t is None:
            return out, None
        video_tokens = self.q_v.shape[1]
        return out[:, :video_tokens], out[:, video_tokens:]
