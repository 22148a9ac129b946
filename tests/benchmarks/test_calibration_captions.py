"""The benchmark's calibration captions: training captions with the evaluation samples' speeds."""

from benchmarks.quality.harness import _shares, calibration_captions, held_out_samples
from ditplan.reference.attributes import SPEEDS, captions_for, heldout_attributes


def test_calibration_captions_take_the_evaluation_speeds_and_never_an_evaluation_caption():
    held_out = set(captions_for(heldout_attributes()))
    slow_only = held_out_samples(32, (0,))[1]  # the benchmark's 32 captions are all slow
    assert set(slow_only.speed[:, 0].tolist()) == {0}
    captions = calibration_captions(32, like=slow_only)  # the benchmark takes 32
    assert len(captions) == len(set(captions)) == 32
    assert all(f" {SPEEDS[0]} " in c for c in captions)
    assert not held_out & set(captions)
    assert calibration_captions(32, like=slow_only) == captions  # deterministic

    both = held_out_samples(64, (0,))[1]  # half slow, half quick
    mixed = calibration_captions(16, like=both)
    assert sum(f" {SPEEDS[1]} " in c for c in mixed) == 8
    assert not held_out & set(mixed)


def test_shares_split_in_proportion_and_sum_to_n():
    assert _shares([0, 0, 0, 1], 16) == {0: 12, 1: 4}
    assert _shares([0, 1, 2], 4) == {0: 2, 1: 1, 2: 1}
    assert sum(_shares([0, 1, 1, 2, 2, 2], 7).values()) == 7
