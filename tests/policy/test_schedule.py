"""Cache schedules: Eq. 15 intervals, warm-up, late compute, exact masks, maximal groups."""

from __future__ import annotations

import numpy as np
import pytest

from ditplan.policy.config import CompilerConfig
from ditplan.policy.schedule import (
    branches_differ,
    cache_groups,
    compute_mask,
    refresh_steps,
    warmup_steps,
)
from tests.policy.policy_factories import change_curve


def test_refresh_intervals_shrink_from_t_max_to_t_min():
    steps = refresh_steps(50, 6, 12, 2)
    gaps = np.diff(steps)
    assert steps[0] == 6 and gaps[0] == 12 and gaps[-1] <= 3
    assert all(a >= b for a, b in zip(gaps[:-1], gaps[1:], strict=True))
    for s, gap in zip(steps[:-1], gaps, strict=True):  # each gap is Eq. 15 at its step, rounded
        assert abs(gap - (12 - 10 * (s - 6) / 44)) <= 0.5
    assert refresh_steps(10, 3, 1, 1) == list(range(3, 10))


def test_warmup_follows_the_change_curve():
    curve = change_curve(12, late_rise=True)  # 0.1 + 2 exp(-1.5 s): above 0.15 until step 2
    assert warmup_steps([curve], 12, CompilerConfig(warmup_min_fraction=0.0)) == 3
    assert warmup_steps([curve], 12, CompilerConfig(warmup_min_fraction=0.5)) == 6
    slow = change_curve(12, late_rise=True, decay=0.5)
    assert warmup_steps([curve, slow], 12, CompilerConfig(warmup_min_fraction=0.0)) > 3


def test_compute_mask_exact():
    config = CompilerConfig(t_max=4, t_min=2, late_rise_factor=1.5)
    mask = compute_mask(change_curve(12, late_rise=True), warmup=3, config=config)
    # warm-up 0-2; refresh at 3, 3 + 4 = 7, 7 + round(4 - 2 * 4/9) = 10; late rise at 10, 11
    assert mask == (1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1)
    flat = compute_mask(change_curve(12, late_rise=False), warmup=3, config=config)
    assert flat == (1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0)


def test_branches_differ():
    same = np.stack([change_curve(12, True), change_curve(12, True) * 1.01])
    assert not branches_differ(same, 0.2)
    other = np.stack([change_curve(12, True), change_curve(12, True, decay=0.5)])
    assert branches_differ(other, 0.2) and not branches_differ(other[:1], 0.2)


def cache_groups_reference(blocks, roles):
    groups, run = [], []
    for block in blocks:
        same_stack = run and run[-1].rsplit(".", 1)[0] == block.rsplit(".", 1)[0]
        if roles[block] == "background" and (same_stack or not run):
            run.append(block)
            continue
        if run:
            groups.append(tuple(run))
        run = [block] if roles[block] == "background" else []
    return groups + ([tuple(run)] if run else [])


def test_groups_are_maximal_runs():
    blocks = tuple(f"blocks.{i}" for i in range(8))
    roles = dict(zip(blocks, "fbbfbbbf", strict=True))
    roles = {b: "background" if r == "b" else "foreground" for b, r in roles.items()}
    assert cache_groups(blocks, roles) == [("blocks.1", "blocks.2"),
                                          ("blocks.4", "blocks.5", "blocks.6")]


def test_groups_never_cross_a_stream_change():
    blocks = ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
              "single_transformer_blocks.1")
    roles = dict.fromkeys(blocks, "background")
    assert cache_groups(blocks, roles) == [blocks[:2], blocks[2:]]


@pytest.mark.parametrize("seed", range(20))
def test_groups_match_reference_on_random_roles(seed):
    rng = np.random.default_rng(seed)
    blocks = tuple(f"{'double' if i < 5 else 'single'}.{i}" for i in range(12))
    roles = {b: rng.choice(["foreground", "background"]) for b in blocks}
    assert cache_groups(blocks, roles) == cache_groups_reference(blocks, roles)
