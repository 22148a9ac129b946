"""benchmarks.peak_memory: replaying an allocator trace to its peak, and naming where it is."""

from __future__ import annotations

from benchmarks.peak_memory import live_at_peak, origin


def _alloc(addr, size, line=1):
    return dict(action="alloc", addr=addr, size=size,
                frames=[dict(filename="/x/torch/nn/modules/linear.py", line=5, name="forward"),
                        dict(filename="/tmp/torchinductor_u/ab/cab.py", line=line, name="call")])


def _free(addr, size):
    return dict(action="free_requested", addr=addr, size=size, frames=[])


def test_the_peak_is_where_the_running_total_is_highest_and_lists_what_lives_there():
    events = [_alloc(1, 100), _alloc(2, 50), _free(1, 100), _alloc(3, 120), _alloc(4, 10),
              _free(3, 120), _free(2, 50)]
    peak, live = live_at_peak(events, base=1_000)
    assert peak == 1_000 + 50 + 120 + 10  # 1_180, above the 1_150 of the first two
    assert sorted(live) == [2, 3, 4]


def test_frees_of_older_allocations_do_not_count_and_an_idle_trace_peaks_at_its_base():
    peak, live = live_at_peak([_free(9, 500)], base=1_000)
    assert (peak, live) == (1_000, {})


def test_origin_skips_torch_frames_but_keeps_inductor_code(tmp_path):
    code = tmp_path / "torchinductor_u" / "cab.py"
    code.parent.mkdir()
    code.write_text("buf3 = empty_strided_cuda((4, 8), (8, 1), torch.bfloat16)\n")
    frames = [dict(filename="/x/torch/nn/modules/linear.py", line=5, name="forward"),
              dict(filename=str(code), line=1, name="call"),
              dict(filename="/m/transformer_wan.py", line=9, name="forward")]
    assert origin(frames, depth=1) == "cab.py:1 buf3 = empty_strided_cuda((4, 8), (8, 1), " \
                                      "torch.bfloat16)"
    assert origin(frames).startswith("cab.py:1 ") and "| transformer_wan.py:9" in origin(frames)
    assert origin(frames[:1]) == "(no Python frame)"
