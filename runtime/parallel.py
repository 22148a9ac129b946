"""Context parallelism through diffusers' Ulysses: refusals, enabling it, the op across ranks."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ditplan.policy.plan import PlanError

# diffusers versions whose private Ulysses names (TemplatedUlyssesAttention.apply's argument
# list, ContextParallelConfig._ulysses_mesh/_ulysses_local_rank) this module was checked against.
DIFFUSERS_RANGE = ((0, 36), (0, 43))

# attend(q, k, v, heads) on [B, h, S, D] each: attention of the whole sequence for the heads
# ``heads`` (a slice of the model's heads) -> [B, h, S, D]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, slice], torch.Tensor]


def check_diffusers_version(version: str | None = None) -> None:
    """Refuse a diffusers outside :data:`DIFFUSERS_RANGE` (its private CP names may differ)."""
    if version is None:
        import diffusers

        version = diffusers.__version__
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    (low, high) = DIFFUSERS_RANGE
    if not low <= numbers < high:
        raise PlanError(
            f"context parallelism with ditplan needs diffusers >= {'.'.join(map(str, low))}, "
            f"< {'.'.join(map(str, high))} (it calls diffusers' Ulysses attention, a private "
            f"API); this is diffusers {version}. Install a version in that range or run on "
            "one GPU"
        )


def check_chunks(chunks, config) -> None:
    """Refuse a ``ulysses_chunks`` that is not an int >= 1, or above 1 without ``parallel=``."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise PlanError(f"ulysses_chunks takes an int >= 1 (1: one all-to-all per tensor), got "
                        f"{chunks!r}")
    if chunks > 1 and config is None:
        raise PlanError(f"ulysses_chunks={chunks} pipelines diffusers' Ulysses all-to-alls: it "
                        "needs parallel=ContextParallelConfig(ulysses_degree=N)")


def check_parallel_config(config, transformer: nn.Module, adapter, chunks: int = 1) -> dict:
    """Refuse what ditplan cannot run under context parallelism; the adapter's CP plan.

    Checked before anything is installed, so a refusal leaves the model as it was.

    Args:
        chunks: head chunks per rank of the pipelined all-to-all (see :func:`ulysses_attention`).
    """
    from diffusers import ContextParallelConfig

    check_diffusers_version()
    if not isinstance(config, ContextParallelConfig):
        raise PlanError(f"parallel= takes a diffusers ContextParallelConfig, got "
                        f"{type(config).__name__}")
    if config.ring_degree > 1:
        raise PlanError(f"ring attention (ring_degree={config.ring_degree}) is refused: block "
                        "selection needs every key of the sequence on one rank; use "
                        "ContextParallelConfig(ulysses_degree=N)")
    if config.ulysses_anything:
        raise PlanError("ulysses_anything is refused: the sparse op needs every rank to hold "
                        "the same number of heads and tokens; use ulysses_degree=N with N "
                        "dividing the head count and the token count")
    degree = config.ulysses_degree
    heads = {attn.heads for _, attn in adapter.attention_layers(transformer)}
    uneven = sorted(h for h in heads if h % degree)
    if uneven:
        raise PlanError(f"{uneven[0]} attention heads do not split over ulysses_degree={degree} "
                        "ranks; use a degree that divides the head count")
    unchunked = sorted(h for h in heads if h % (degree * chunks))
    if unchunked:
        h = unchunked[0]
        raise PlanError(f"{h} attention heads do not split into ulysses_chunks={chunks} chunks "
                        f"on each of ulysses_degree={degree} ranks ({h // degree} heads a rank); "
                        f"use a chunk count that divides {h // degree}")
    cp_plan = adapter.cp_plan(transformer)
    if cp_plan is None:
        raise PlanError(f"context parallelism is not supported for {type(transformer).__name__} "
                        "yet; run it on one GPU")
    if not (dist.is_available() and dist.is_initialized()):
        raise PlanError("context parallelism needs torch.distributed initialised: launch with "
                        "torchrun --nproc-per-node N and call "
                        "torch.distributed.init_process_group first")
    _load_warning_once()
    return cp_plan


def _load_warning_once() -> None:
    """diffusers' context-parallel hooks log through ``Logger.warning_once``, a method only
    ``transformers`` adds to the standard logger (on import): Wan with a [B] timestep would
    fail at its first forward without it. Pipelines with a text encoder have imported it."""
    if hasattr(logging.Logger, "warning_once"):
        return
    try:
        import transformers  # noqa: F401  (defines logging.Logger.warning_once)
    except ImportError as error:
        raise PlanError("diffusers' context parallelism needs the transformers package (its "
                        "hooks log through Logger.warning_once, which transformers defines): "
                        "pip install transformers") from error


def refuse_parallel_model(transformer: nn.Module) -> None:
    """A model made parallel before ditplan is installed would attend per rank: refuse it."""
    if getattr(transformer, "_parallel_config", None) is not None:
        raise PlanError(
            f"this {type(transformer).__name__} already runs under diffusers' parallelism: "
            "ditplan must be installed first; pass parallel= to apply_plan (or "
            "apply_sparse_attention) instead of calling enable_parallelism first"
        )


def enable(transformer: nn.Module, config, cp_plan: dict, adapter) -> list:
    """Make ``transformer`` context-parallel, after ditplan's hooks and processors.

    Returns:
        removable handles of the hooks added here (a token-count check per forward).
    """
    transformer.enable_parallelism(config=config, cp_plan=cp_plan)
    degree = config.ulysses_degree

    def check_tokens(module, args, kwargs):
        layout = adapter.token_layout(module, args, kwargs)
        for what, count in (("video", layout.video_tokens), ("text", layout.text_len)):
            if count % degree:
                raise PlanError(f"{count} {what} tokens do not split over ulysses_degree="
                                f"{degree} ranks; choose a size whose token count they divide")

    return [transformer.register_forward_pre_hook(check_tokens, with_kwargs=True, prepend=True)]


def is_ulysses(config) -> bool:
    """True when ``config`` (a processor's diffusers ParallelConfig, or None) runs Ulysses."""
    cp = getattr(config, "context_parallel_config", None)
    return cp is not None and cp.ulysses_degree > 1


def model_cp_plan(transformer: nn.Module) -> dict | None:
    """The context-parallel plan diffusers ships with ``transformer``'s class, or None."""
    return getattr(transformer, "_cp_plan", None)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config,
                      attend: Attend, segments: tuple[int, ...],
                      chunks: int = 1) -> torch.Tensor:
    """Self-attention of the rank's tokens through diffusers' Ulysses all-to-all.

    After the all-to-all each rank holds every rank's tokens for its ``H / W`` heads, rank
    after rank. When the rank's tokens are several segments (a joint family's
    [video_r | text_r], both streams split by diffusers) ``attend`` sees them regrouped
    segment after segment, [video_0 .. video_W-1 | text_0 .. text_W-1]: the order the
    tokens had before the split. The reverse all-to-all brings the rank's tokens back with
    every head.

    Args:
        q, k, v: [B, S / W, H, D], this rank's tokens.
        config: the processor's diffusers ParallelConfig.
        attend: the attention of the whole sequence for a slice of heads.
        segments: the lengths of the rank's token segments, summing to S / W.
        chunks: above 1, :func:`_pipelined_ulysses` in that many head chunks (H divisible by
            ``chunks * W``); 1: diffusers' own all-to-alls, around one ``attend`` call.

    Returns:
        [B, S / W, H, D].
    """
    if chunks > 1:
        return _pipelined_ulysses(q, k, v, config, attend, segments, chunks)
    from diffusers.models.attention_dispatch import TemplatedUlyssesAttention

    cp = config.context_parallel_config
    rank, degree = cp._ulysses_local_rank, cp.ulysses_degree

    def forward_op(ctx, query, key, value, *args, **kwargs):
        heads = query.shape[2]  # query, key, value: [B, S, H / W, D], rank after rank
        query, key, value = (_by_segment(x, segments, degree) for x in (query, key, value))
        out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                     slice(rank * heads, (rank + 1) * heads))  # [B, H / W, S, D]
        # [B, S, H / W, D]; diffusers copies it into the all-to-all's layout itself
        return _by_rank(out.transpose(1, 2), segments, degree)

    return TemplatedUlyssesAttention.apply(q, k, v, None, 0.0, False, None, False, False,
                                           forward_op, None, config)


def _pipelined_ulysses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config,
                       attend: Attend, segments: tuple[int, ...], chunks: int) -> torch.Tensor:
    """:func:`ulysses_attention` in head chunks whose all-to-alls overlap the attention.

    Chunk c of rank r is the heads ``r * H / W + c * h`` onwards (h = H / (W * C)): the rank's
    heads of one call, cut in C, so head order and per-head densities stay those of one call.
    Every chunk's q, k, v all-to-alls are issued at once (asynchronous, on diffusers' Ulysses
    group); ``attend`` runs on chunk c as soon as its own have arrived, while later chunks'
    inputs and earlier chunks' outputs are in flight. Forward only: the collectives carry no
    gradient, so a q that requires one is refused.

    Args, returns: as :func:`ulysses_attention`; q, k, v: [B, S / W, H, D].
    """
    if q.requires_grad:
        raise NotImplementedError("ulysses_chunks > 1 runs inference only (its all-to-alls "
                                  "carry no gradient): call under torch.no_grad(), or use "
                                  "ulysses_chunks=1 to train")
    cp = config.context_parallel_config
    rank, degree, group = cp._ulysses_local_rank, cp.ulysses_degree, ulysses_group(config)
    batch, local, heads, dim = q.shape
    width = heads // (degree * chunks)  # h

    def exchange(x: torch.Tensor):
        """Part w of x ([W, ...], contiguous) to rank w; (rank w's part for us, its work)."""
        received = torch.empty_like(x)
        return received, dist.all_to_all_single(received, x, group=group, async_op=True)

    def chunk(x: torch.Tensor, c: int) -> torch.Tensor:
        # [B, S / W, H, D] -> chunk c of every rank's heads: [W, S / W, B, h, D]
        x = x.view(batch, local, degree, chunks, width, dim)[:, :, :, c]
        return x.permute(2, 1, 0, 3, 4).contiguous()

    inputs = [[exchange(chunk(x, c)) for x in (q, k, v)] for c in range(chunks)]
    outputs = []
    for c, received in enumerate(inputs):
        for _, work in received:
            work.wait()
        # [W, S / W, B, h, D] rank after rank -> [B, h, S, D] in attend's order
        query, key, value = (_by_segment(x.flatten(0, 1).transpose(0, 1).contiguous(), segments,
                                         degree).transpose(1, 2) for x, _ in received)
        first = rank * heads // degree + c * width
        out = attend(query, key, value, slice(first, first + width))  # [B, h, S, D]
        out = _by_rank(out.transpose(1, 2), segments, degree)  # [B, S, h, D], rank after rank
        outputs.append(exchange(  # [W, S / W, B, h, D]: rank w's tokens
            out.reshape(batch, degree, local, width, dim).permute(1, 2, 0, 3, 4).contiguous()))
    for _, work in outputs:
        work.wait()
    # chunk c from rank w: [W, S / W, B, h, D] -> [B, S / W, W, C, h, D] -> [B, S / W, H, D]
    out = torch.stack([received for received, _ in outputs], dim=3)
    return out.permute(2, 1, 0, 3, 4, 5).reshape(batch, local, heads, dim)


def _by_segment(x: torch.Tensor, segments: tuple[int, ...], degree: int) -> torch.Tensor:
    """[B, S, ...] rank after rank ([seg0_0, seg1_0, seg0_1, seg1_1, ...]) -> segment after
    segment ([seg0_0, seg0_1, ..., seg1_0, seg1_1, ...]); one segment: ``x`` itself."""
    if len(segments) == 1:
        return x
    pieces = x.split(list(segments) * degree, dim=1)  # piece r * len(segments) + s
    return torch.cat([pieces[r * len(segments) + s] for s in range(len(segments))
                      for r in range(degree)], dim=1)


def _by_rank(x: torch.Tensor, segments: tuple[int, ...], degree: int) -> torch.Tensor:
    """The inverse of :func:`_by_segment`."""
    if len(segments) == 1:
        return x
    pieces = x.split([length for length in segments for _ in range(degree)], dim=1)
    return torch.cat([pieces[s * degree + r] for r in range(degree)
                      for s in range(len(segments))], dim=1)


def ulysses_group(config):
    """The process group of ``config``'s (a diffusers ParallelConfig) Ulysses ranks."""
    return config.context_parallel_config._ulysses_mesh.get_group()


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: list[float], group) -> list[float]:
    """Each value averaged over the group's ranks (a collective: every rank calls it)."""
    if not values:
        return []
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(tensor, group=group)
    return (tensor / dist.get_world_size(group)).tolist()


def check_same_on_ranks(text: str, group) -> None:
    """Raise on every rank when ranks describe this point differently (a collective).

    Args:
        text: this rank's description of a decision all ranks must share.
    """
    checksum = torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64,
                            device=_collective_device(group))
    gathered = [torch.empty_like(checksum) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, checksum, group=group)
    if len({int(c) for c in gathered}) > 1:
        raise RuntimeError(f"ranks diverged: rank {dist.get_rank(group)} decided {text!r}, "
                           "another rank decided otherwise (DITPLAN_CHECK_RANKS)")
