"""Sprite attributes of reference clips: palette, shapes, motions, captions, the held-out set."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Every colour has a channel >= 0.9, so it differs by >= 0.18 in that channel from any background
# (backgrounds stay inside [0.15, 0.72]); this is what makes the pixel scorer's segmentation honest.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.12, 0.10),
    "orange": (0.98, 0.55, 0.05),
    "yellow": (0.95, 0.92, 0.10),
    "green": (0.10, 0.90, 0.20),
    "cyan": (0.10, 0.90, 0.95),
    "blue": (0.12, 0.30, 0.95),
    "purple": (0.65, 0.15, 0.95),
    "white": (0.97, 0.97, 0.97),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Direction name -> caption words and unit step per axis in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[str, tuple[int, int]]] = {
    "left": ("left", (-1, 0)),
    "right": ("right", (1, 0)),
    "up": ("up", (0, -1)),
    "down": ("down", (0, 1)),
    "upper_left": ("toward the upper left", (-1, -1)),
    "upper_right": ("toward the upper right", (1, -1)),
    "lower_left": ("toward the lower left", (-1, 1)),
    "lower_right": ("toward the lower right", (1, 1)),
}
SPEEDS: tuple[str, ...] = ("slowly", "quickly")

COLOUR_NAMES = tuple(COLOURS)
DIRECTION_NAMES = tuple(DIRECTIONS)
NUM_HELDOUT = 64


@dataclass
class SpriteAttributes:
    """Categorical attributes of up to N sprite slots per clip; slot 0 is drawn first (at the back).

    All fields are LongTensor [B, N] indices into COLOURS / SHAPES / DIRECTIONS / SPEEDS, except
    `active` (bool [B, N]); active slots are a prefix of the N slots.
    """

    colour: torch.Tensor
    shape: torch.Tensor
    direction: torch.Tensor
    speed: torch.Tensor
    active: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SpriteAttributes:
        """A copy on `device` (pinned CPU tensors + non_blocking=True avoid a sync)."""
        fields = {k: v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()}
        return SpriteAttributes(**fields)

    def pin_memory(self) -> SpriteAttributes:
        """Returns a copy in pinned host memory (only meaningful when CUDA is present)."""
        return SpriteAttributes(**{k: v.pin_memory() for k, v in vars(self).items()})

    @property
    def batch_size(self) -> int:
        return self.colour.shape[0]

    @property
    def num_slots(self) -> int:
        return self.colour.shape[1]


@functools.lru_cache(maxsize=16)
def colour_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The palette as float [num_colours, 3] RGB in [0, 1], in COLOURS order.

    Cached per device (a host-to-device copy would stall the GPU queue every step); read only.
    """
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=16)
def direction_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-axis unit steps float [num_directions, 2] (x, y), in DIRECTIONS order; cached, read
    only."""
    return torch.tensor([v for _, v in DIRECTIONS.values()], dtype=torch.float32, device=device)


def heldout_combinations() -> frozenset[tuple[int, int, int, int]]:
    """The 64 (colour, shape, direction, speed) index tuples never drawn in training.

    Balanced: each colour 8 times, each shape 16, each direction 8, each speed 32 times. Each
    colour-shape pair stays seen in training with 14 of its 16 direction-speed variants, so the
    held-out captions test composition, not unseen words.
    """
    combos = []
    for i in range(NUM_HELDOUT):
        colour, shape, speed = i % 8, (i // 8) % 4, i // 32
        direction = (i + 3 * (i // 8) + speed) % 8
        combos.append((colour, shape, direction, speed))
    return frozenset(combos)


def heldout_attributes() -> SpriteAttributes:
    """Returns the 64 held-out single-sprite attribute sets, [64, 1] each, in a fixed order."""
    combos = sorted(heldout_combinations(), key=lambda c: (c[3], c[1], c[0], c[2]))
    cols = list(zip(*combos, strict=True))
    as_long = [torch.tensor(c, dtype=torch.long).unsqueeze(1) for c in cols]
    return SpriteAttributes(*as_long, active=torch.ones(len(combos), 1, dtype=torch.bool))


def _heldout_lookup() -> torch.Tensor:
    table = torch.zeros(len(COLOURS), len(SHAPES), len(DIRECTIONS), len(SPEEDS), dtype=torch.bool)
    for combo in heldout_combinations():
        table[combo] = True
    return table


def sample_attributes(
    batch_size: int,
    generator: torch.Generator,
    *,
    max_sprites: int = 3,
    min_sprites: int = 1,
    exclude_heldout: bool = True,
) -> SpriteAttributes:
    """Draws sprite attributes uniformly on the generator's device (CPU recommended).

    Args:
        batch_size: number of clips B.
        generator: a torch.Generator; the only source of randomness.
        max_sprites: number of slots N (1..3 in the reference data).
        min_sprites: fewest active sprites per clip.
        exclude_heldout: redraw the direction of any sprite whose combination is held out.

    Returns:
        SpriteAttributes with [B, N] tensors on the generator's device.
    """
    if not 1 <= min_sprites <= max_sprites:
        raise ValueError(f"need 1 <= min_sprites <= max_sprites, got {min_sprites}, {max_sprites}")
    dev = generator.device
    shape = (batch_size, max_sprites)

    def draw(n: int) -> torch.Tensor:
        return torch.randint(0, n, shape, generator=generator, device=dev)

    colour, kind, direction, speed = draw(len(COLOURS)), draw(len(SHAPES)), draw(8), draw(2)
    count = torch.randint(min_sprites, max_sprites + 1, (batch_size, 1), generator=generator,
                          device=dev)
    active = torch.arange(max_sprites, device=dev).unsqueeze(0) < count
    if exclude_heldout:
        direction = _redraw_heldout(colour, kind, direction, speed, generator)
    return SpriteAttributes(colour, kind, direction, speed, active)


def _redraw_heldout(colour, kind, direction, speed, generator) -> torch.Tensor:
    # Shifting the direction by 1..7 always leaves the held-out set: each (colour, shape, speed)
    # triple holds out at most one direction (checked in tests), so one redraw suffices.
    table = _heldout_lookup().to(colour.device)
    banned = table[colour, kind, direction, speed]
    shift = torch.randint(1, 8, direction.shape, generator=generator, device=direction.device)
    return torch.where(banned, (direction + shift) % 8, direction)


def clause(colour: int, shape: int, direction: int, speed: int) -> str:
    """One sprite's clause, e.g. 'an orange circle quickly moves toward the upper left'."""
    name = COLOUR_NAMES[colour]
    article = "an" if name[0] in "aeiou" else "a"
    words = DIRECTIONS[DIRECTION_NAMES[direction]][0]
    return f"{article} {name} {SHAPES[shape]} {SPEEDS[speed]} moves {words}"


def captions_for(attributes: SpriteAttributes) -> list[str]:
    """Captions, one per clip: 'a red circle slowly moves left and a blue square quickly moves up'.

    Args:
        attributes: SpriteAttributes with [B, N] tensors (any device; read on the host).

    Returns:
        B strings; sprites are listed in drawing order (back to front).
    """
    fields = [attributes.colour, attributes.shape, attributes.direction, attributes.speed]
    rows = zip(*(f.tolist() for f in fields), attributes.active.tolist(), strict=True)
    captions = []
    for colours, shapes, directions, speeds, active in rows:
        sprites = zip(colours, shapes, directions, speeds, strict=True)
        parts = [clause(*c) for c, on in zip(sprites, active, strict=True) if on]
        captions.append(_join(parts))
    return captions


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain (without the padding token), in a stable order."""
    words = ["a", "an", "and", ",", "moves", *COLOUR_NAMES, *SHAPES, *SPEEDS]
    for text, _ in DIRECTIONS.values():
        words.extend(w for w in text.split() if w not in words)
    return words

