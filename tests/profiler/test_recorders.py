"""The recorder leaves the model's output bit-identical and records what metrics.py computes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ditplan.profiler import metrics
from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.output_error import output_errors
from ditplan.profiler.recorders import ProfileRecorder
from ditplan.profiler.run import profile_transformer_calls
from ditplan.runtime.adapters.wan import wan_self_attention_qkv
from ditplan.runtime.kernels.block_map import forced_blocks
from ditplan.runtime.kernels.permute import first_frame_mask, tile_permutation
from tests.factories import tiny_wan, tiny_wan_inputs

# 3 frames x 8 x 8 tokens = 192 tokens: 3 blocks of 64, the first frame exactly one block.
GRID = (3, 8, 8)
SETTINGS = RecorderSettings(block_size=64, tile=(1, 4, 4), map_steps=(1,), output_error=True)


def inputs(seed=1):
    return tiny_wan_inputs(frames=3, height=16, width=16, seed=seed)


def test_recorder_does_not_change_the_output_bitwise():
    model, x = tiny_wan(), inputs()
    with torch.no_grad():
        expected = model(**x, return_dict=False)[0]
        with ProfileRecorder(model, SETTINGS, num_inference_steps=1) as recorder:
            recorder.set_foreground(torch.arange(192) % 5 == 0)
            recorded = model(**x, return_dict=False)[0]
        assert len(recorder.take_rows()) > 0  # it did record
        after = model(**x, return_dict=False)[0]
    assert torch.equal(recorded, expected)
    assert torch.equal(after, expected)  # removal restores the original processors
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.blocks)


def captured_qk(model, x):
    """q, k, v of blocks.1's self-attention, computed the way diffusers does, in original order."""
    seen = {}

    def hook(module, args, kwargs):
        seen["args"] = (args[0], args[3] if len(args) > 3 else kwargs.get("rotary_emb"))

    handle = model.blocks[1].attn1.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**x, return_dict=False)
        q, k, v = wan_self_attention_qkv(model.blocks[1].attn1, *seen["args"])
    handle.remove()
    return q, k, v  # [B, H, S, D]


def test_recorded_rows_equal_metrics_on_permuted_qk():
    model, x = tiny_wan(), inputs()
    fg = torch.zeros(GRID, dtype=torch.bool)
    fg[:, 2:5, 3:6] = True  # a 3 x 3 foreground patch in every frame
    rows = profile_transformer_calls(model, x, steps=2, settings=SETTINGS,
                                     contexts=("cond", "uncond"), foreground_mask=fg.flatten())
    cols = rows.columns()
    q, k, v = captured_qk(model, x)
    perm = tile_permutation(GRID, SETTINGS.tile)
    q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    summary = metrics.attention_summary(q, k, block_size=64)
    sink = first_frame_mask(GRID)[perm]
    forced = forced_blocks(192, 64, sink_tokens=sink)
    curves = metrics.recall_at_densities(q, k, summary, densities=SETTINGS.densities,
                                         forced=forced)
    fg_stats = metrics.foreground_stats(summary.received, fg.flatten()[perm],
                                        torch.ones(192, dtype=torch.bool), 1.0)
    stats = cols["attention_stats"]
    picked = [i for i, (s, c, layer) in enumerate(zip(stats["step"], stats["cfg"],
                                                      stats["layer"], strict=True))
              if s == 1 and c == "uncond" and layer == "blocks.1"]
    assert len(picked) == 2  # one per head
    # The recorder stores float32 of the same computation: equal up to float32 rounding.
    got = torch.tensor(stats["r_attn"][picked], dtype=torch.float32)
    torch.testing.assert_close(got, fg_stats.r_attn[0].float())
    got_sink = torch.tensor(stats["sink_mass"][picked])
    torch.testing.assert_close(got_sink, metrics.mass_on_blocks(summary, forced.cols)[0].float())
    recall = cols["attention_recall"]
    pred = [v for s, c, layer, v in zip(recall["step"], recall["cfg"], recall["layer"],
                                        recall["recall_predicted"], strict=True)
            if s == 1 and c == "uncond" and layer == "blocks.1"]
    torch.testing.assert_close(torch.tensor(pred), curves.predicted[0].flatten().float())
    errors = output_errors(q, k, v, block_size=64, densities=SETTINGS.densities, forced=forced)
    table = cols["attention_error"]
    picked = [i for i, (s, c, layer) in enumerate(zip(table["step"], table["cfg"],
                                                      table["layer"], strict=True))
              if s == 1 and c == "uncond" and layer == "blocks.1"]
    for j, name in enumerate(("error_dropped", "error_estimated")):
        got = torch.tensor(table[name][picked])  # [H * D], head-major
        torch.testing.assert_close(got, errors.mean(0)[..., j].flatten().float())


def test_row_counts_and_keys():
    model, x = tiny_wan(), inputs()
    rows = profile_transformer_calls(model, x, steps=3, settings=SETTINGS,
                                     contexts=("cond", "uncond"))
    cols = rows.columns()
    layers, heads, steps, ctx, dens = 2, 2, 3, 2, len(SETTINGS.densities)
    assert len(cols["attention_stats"]["step"]) == layers * heads * steps * ctx
    assert len(cols["attention_recall"]["step"]) == layers * heads * steps * ctx * dens
    assert len(cols["attention_error"]["step"]) == layers * heads * steps * ctx * dens
    # Maps only for the sampled step 1: one row per (layer, head, context, query block).
    assert set(cols["attention_maps"]["step"].tolist()) == {1}
    assert len(cols["attention_maps"]["step"]) == layers * heads * ctx * 3
    # Step change from step 1 on, for both blocks and the model output, per context.
    change = cols["step_change"]
    assert set(change["layer"]) == {"blocks.0", "blocks.1", "__output__"}
    assert sorted(set(change["step"].tolist())) == [1, 2]
    # The same input at every step: nothing changes between steps.
    assert max(abs(v) for v in change["rel_l1"]) < 1e-6
    assert max(abs(v) for v in change["cos_dist"]) < 1e-5


def test_output_error_is_recorded_only_when_asked(monkeypatch):
    from ditplan.profiler import recorders

    def never(*args, **kwargs):
        raise AssertionError("output_errors ran although output_error is off")

    monkeypatch.setattr(recorders, "output_errors", never)
    settings = dataclasses.replace(SETTINGS, output_error=False)
    rows = profile_transformer_calls(tiny_wan(), inputs(), steps=2, settings=settings,
                                     contexts=("cond",))
    cols = rows.columns()
    assert "attention_error" not in cols and len(cols["attention_recall"]["step"]) > 0
    assert settings.to_metadata()["output_error"] is False


def test_recall_and_output_error_share_one_selection_per_density(monkeypatch):
    from ditplan.profiler import metrics, output_error

    built = []
    select = metrics.select_blocks

    def counting(*args, **kwargs):
        built.append(kwargs["density"])
        return select(*args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("output_errors selected blocks again instead of taking the maps")

    monkeypatch.setattr(metrics, "select_blocks", counting)
    monkeypatch.setattr(output_error, "predicted_block_maps", never)
    profile_transformer_calls(tiny_wan(), inputs(), steps=1, settings=SETTINGS,
                              contexts=("cond",))
    # per layer: the predicted and the oracle map at each density, nothing more
    assert sorted(built) == sorted(2 * 2 * SETTINGS.densities)


def test_output_errors_take_given_maps_or_build_the_same():
    q, k, v = (torch.randn(1, 2, 192, 16, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    maps = metrics.predicted_block_maps(q, k, block_size=64, densities=(0.3, 0.6), forced=None)
    given = output_errors(q, k, v, block_size=64, densities=(0.3, 0.6), forced=None,
                          block_maps=maps)
    built = output_errors(q, k, v, block_size=64, densities=(0.3, 0.6), forced=None)
    torch.testing.assert_close(given, built, rtol=0, atol=0)


def test_step_change_sees_a_changed_input():
    model = tiny_wan()
    x0, x1 = inputs(seed=1), inputs(seed=2)
    calls = iter([x0, x1])
    settings = RecorderSettings(block_size=64, tile=(1, 4, 4))
    with ProfileRecorder(model, settings, num_inference_steps=2) as recorder, torch.no_grad():
        outputs = []
        for step in range(2):
            with model.cache_context("cond", step_index=step):
                outputs.append(model(**next(calls), return_dict=False)[0])
        change = recorder.take_rows().columns()["step_change"]
    index = change["layer"].index("__output__")
    expected = metrics.step_change_reference(outputs[1], outputs[0])
    # float32 sums over 768 output elements vs a float64 oracle: ~1e-5 relative at worst.
    assert change["rel_l1"][index] == pytest.approx(expected[0].item(), rel=1e-4)
    assert change["cos_dist"][index] == pytest.approx(expected[1].item(), rel=1e-3, abs=1e-6)


def test_unknown_cache_context_is_refused():
    model, x = tiny_wan(), inputs()
    with ProfileRecorder(model, SETTINGS) as recorder, torch.no_grad():
        recorder.set_foreground(None)
        with model.cache_context("guidance-3"), pytest.raises(ValueError, match="cache context"):
            model(**x, return_dict=False)


def test_foreground_of_the_wrong_size_is_refused():
    model, x = tiny_wan(), inputs()
    with ProfileRecorder(model, SETTINGS) as recorder, torch.no_grad():
        recorder.set_foreground(torch.ones(10, dtype=torch.bool))
        with pytest.raises(ValueError, match="foreground mask has 10 tokens"):
            model(**x, return_dict=False)
