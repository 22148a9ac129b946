"""Where a self-attention sequence's tokens come from: the video grid and the text beside it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one self-attention sequence come from.

    ``frames``, ``height`` and ``width`` are the video token grid (after patching); ``text_len``
    text tokens sit before the video when ``text_first`` else after it (0 for cross-attention
    models such as Wan).
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_first: bool = False

    def __post_init__(self):
        if min(self.frames, self.height, self.width) < 1 or self.text_len < 0:
            raise ValueError(f"token layout must have a non-empty video grid, got {self}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_len
