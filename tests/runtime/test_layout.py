"""Block streams and forward arguments read and rewrite positional and keyword calls alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditplan.runtime.layout import AttnCall, ForwardArgument, PermutePoint, StreamIO


class TwoStreamBlock(nn.Module):
    """Returns (text, video), as Qwen-Image and FLUX blocks do."""

    def forward(self, hidden_states, encoder_hidden_states=None, temb=None, *, scale=1.0):
        return encoder_hidden_states, hidden_states * scale


def test_an_argument_is_found_by_position_or_keyword():
    forward = TwoStreamBlock().forward
    temb = ForwardArgument.of(forward, "temb")
    assert temb == ForwardArgument("temb", 2)
    assert ForwardArgument.of(forward, "scale") == ForwardArgument("scale", None)
    assert temb.get(("h", "e", "t"), {}) == "t"
    assert temb.get(("h",), {"temb": "t"}) == "t"
    assert temb.get(("h",), {}) is None  # left at its default
    assert temb.replace(("h", "e", "t"), {}, "new") == (("h", "e", "new"), {})
    assert temb.replace(("h",), {"temb": "t"}, "new") == (("h",), {"temb": "new"})
    assert temb.replace(("h",), {}, "new") == (("h",), {"temb": "new"})  # by keyword
    with pytest.raises(ValueError, match="no parameter 'hidden'.*hidden_states"):
        ForwardArgument.of(forward, "hidden")


@pytest.mark.parametrize("keyword", [False, True])
def test_bound_streams_read_the_video_input_and_output(keyword):
    block = TwoStreamBlock()
    streams = StreamIO("hidden_states", "encoder_hidden_states", ("text", "video")).bind(
        block.forward)
    video, text = torch.randn(1, 4, 2), torch.randn(1, 3, 2)
    args, kwargs = ((), {"hidden_states": video, "encoder_hidden_states": text}) if keyword \
        else ((video, text), {})
    assert streams.video_input(args, kwargs) is video
    assert streams.inputs(args, kwargs) == (video, text)  # ditplan's order: (video, text)
    doubled = 2 * video
    args, kwargs = streams.with_inputs(args, kwargs, (doubled, text))
    output = block(*args, **kwargs)
    assert torch.equal(streams.video_output(output), doubled)
    assert streams.outputs(output) == (output[1], output[0])
    assert streams.native((doubled, text)) == (text, doubled)  # the block's order: (text, video)


def test_single_stream_output_is_the_value_itself():
    streams = StreamIO("hidden_states").bind(TwoStreamBlock().forward)
    video = torch.randn(1, 4, 2)
    assert streams.video_output(video) is video
    assert streams.native((video,)) is video


def test_attention_call_joins_video_then_text_and_splits_back():
    q_v, k_v, v_v = (torch.randn(2, 5, 3, 4) for _ in range(3))  # [B, S_vid, H, D]
    q_t, k_t, v_t = (torch.randn(2, 2, 3, 4) for _ in range(3))  # [B, S_txt, H, D]
    call = AttnCall(q_v, k_v, v_v, q_t, k_t, v_t)
    q, k, v = call.joint()
    assert torch.equal(q, torch.cat([q_v, q_t], 1)) and torch.equal(v, torch.cat([v_v, v_t], 1))
    out_video, out_text = call.split(k)
    assert torch.equal(out_video, k_v) and torch.equal(out_text, k_t)
    video_only = AttnCall(q_v, k_v, v_v)
    assert video_only.joint()[0] is q_v and video_only.split(q_v) == (q_v, None)


def test_permute_point_kinds_are_checked():
    with pytest.raises(ValueError, match="module_output"):
        PermutePoint("rope", "output", 0, 1)
    with pytest.raises(ValueError, match="only module_output points keep a channel subset"):
        PermutePoint("blocks.0", "module_input", "hidden_states", 1, channels=(0, 2))
