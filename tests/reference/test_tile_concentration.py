"""The CPU tile-concentration estimate: against float64 loops over q and k taken another way, the
model left as it was, its refusals, and the tool (JSON whole or absent)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ditplan.reference.config import SMOKE, build_caption_encoder, build_transformer
from ditplan.reference.export import export_pipeline
from ditplan.reference.flow import NUM_TRAIN_TIMESTEPS, noisy_sample
from ditplan.reference.tile_concentration import estimate_tile_concentration
from ditplan.runtime.adapters.wan import wan_self_attention_qkv
from ditplan.runtime.kernels.permute import tile_permutation_reference
from tests.tool_scripts import load_tool

GRID = (4, 8, 8)  # the smoke preset's 4 x 16 x 16 px clips after the (1, 2, 2) patch
TILES = [(1, 4, 4), (2, 4, 4), (4, 2, 2)]
BLOCK, DENSITY = 32, 0.25  # 8 key blocks, top 2


def _clips():
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 3, 4, 16, 16, generator=gen) * 2 - 1  # [B, C, F, H, W]
    embeds = torch.randn(2, 8, 16, generator=gen)  # [B, L, text_dim]
    return x0, embeds


def _oracle(model, x0, embeds, sigma, seed):
    """float64 loops: each layer's q and k from runtime's wan_self_attention_qkv on the inputs a
    forward pre-hook saw; per tile, every query block's mean distribution over the key blocks,
    summed over its top n (oracle) and over the n that mean q . mean k ranks first (predicted)."""
    inputs = {}
    hooks = [block.attn1.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: inputs.__setitem__(i, (args[0], args[3])),
        with_kwargs=True) for i, block in enumerate(model.blocks)]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    s = torch.full((2,), sigma)
    with torch.no_grad():
        model(hidden_states=noisy_sample(x0, noise, s), timestep=s * NUM_TRAIN_TIMESTEPS,
              encoder_hidden_states=embeds, return_dict=False)
    for hook in hooks:
        hook.remove()
    out, out_predicted = {}, {}
    for tile in TILES:
        order = tile_permutation_reference(GRID, tile).tolist()
        blocks = len(order) // BLOCK
        top = math.ceil(DENSITY * blocks)
        per_layer, per_layer_predicted = [], []
        for layer, attn in enumerate(model.blocks):
            with torch.no_grad():
                q, k, _ = wan_self_attention_qkv(attn.attn1, *inputs[layer])  # [B, H, S, D]
            q, k = q.double(), k.double()
            heads, heads_predicted = [], []
            for h in range(q.shape[1]):
                total = total_predicted = 0.0
                for b in range(q.shape[0]):
                    probs = torch.softmax(q[b, h] @ k[b, h].T / math.sqrt(q.shape[-1]), -1)
                    key_means = [k[b, h, order[i * BLOCK:(i + 1) * BLOCK]].mean(0)
                                 for i in range(blocks)]
                    for j in range(blocks):
                        query_rows = order[j * BLOCK:(j + 1) * BLOCK]
                        rows = probs[query_rows]  # [BLOCK, S]
                        mass = [rows[:, order[i * BLOCK:(i + 1) * BLOCK]].sum(-1).mean().item()
                                for i in range(blocks)]
                        total += sum(sorted(mass, reverse=True)[:top])
                        query_mean = q[b, h, query_rows].mean(0)
                        ranked = sorted(range(blocks), key=lambda i: -(query_mean @ key_means[i]))
                        total_predicted += sum(mass[i] for i in ranked[:top])
                heads.append(total / (q.shape[0] * blocks))
                heads_predicted.append(total_predicted / (q.shape[0] * blocks))
            per_layer.append(heads)
            per_layer_predicted.append(heads_predicted)
        out[tile] = torch.tensor(per_layer, dtype=torch.float64)  # [L, H]
        out_predicted[tile] = torch.tensor(per_layer_predicted, dtype=torch.float64)
    return out, out_predicted


def test_estimate_matches_float64_loops_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = build_transformer(SMOKE).eval()
    x0, embeds = _clips()
    originals = [block.attn1.processor for block in model.blocks]
    with torch.no_grad():
        before = model(hidden_states=x0, timestep=torch.tensor([500.0, 500.0]),
                       encoder_hidden_states=embeds, return_dict=False)[0]
    result = estimate_tile_concentration(model, embeds, x0, GRID, tiles=TILES, sigmas=[0.7],
                                         query_blocks=100, seed=3, block_size=BLOCK,
                                         density=DENSITY)
    expected, expected_predicted = _oracle(model, x0, embeds, 0.7, seed=3)
    assert result.query_blocks == 8  # every whole block: no draw
    for tile in TILES:
        # float32 softmax over 256 keys, sums of <= 32 probabilities: ~1e-6
        torch.testing.assert_close(result.masses[tile][0].double(), expected[tile],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.predicted[tile][0].double(), expected_predicted[tile],
                                   atol=1e-5, rtol=1e-5)
    # the selection differs somewhere: predicted is not the oracle under another name
    assert any(not torch.allclose(result.predicted[t], result.masses[t]) for t in TILES)
    assert all((result.predicted[t] <= result.masses[t] + 1e-6).all() for t in TILES)
    assert [block.attn1.processor for block in model.blocks] == originals
    with torch.no_grad():
        after = model(hidden_states=x0, timestep=torch.tensor([500.0, 500.0]),
                      encoder_hidden_states=embeds, return_dict=False)[0]
    assert torch.equal(before, after)


def test_summary_counts_concentrated_and_diffuse_heads():
    torch.manual_seed(0)
    model = build_transformer(SMOKE).eval()
    x0, embeds = _clips()
    result = estimate_tile_concentration(model, embeds, x0, GRID, tiles=TILES[:1],
                                         sigmas=[0.9, 0.3], query_blocks=3, block_size=BLOCK,
                                         density=DENSITY)
    mass = result.masses[TILES[0]]  # [2 noise levels, 2 layers, 2 heads]
    assert mass.shape == (2, 2, 2) and result.query_blocks == 3
    row = result.summary()["1x4x4"]
    layer_means = sorted(mass.mean(-1).flatten().tolist())
    assert row["median"] == pytest.approx((layer_means[1] + layer_means[2]) / 2)
    assert row["min"] == pytest.approx(layer_means[0])
    assert row["heads_concentrated"] == (mass >= 0.9).float().mean().item()
    assert row["heads_diffuse"] == (mass <= 0.5).float().mean().item()
    predicted_means = sorted(result.predicted[TILES[0]].mean(-1).flatten().tolist())
    assert row["predicted_median"] == pytest.approx((predicted_means[1] + predicted_means[2]) / 2)
    assert "| 1x4x4 |" in result.markdown()
    assert json.loads(json.dumps(result.as_dict()))["masses"]["1x4x4"] == mass.tolist()


@pytest.mark.parametrize("changes, match", [
    (dict(sigmas=[0.0]), "noise levels"), (dict(sigmas=[1.5]), "noise levels"),
    (dict(tiles=[]), "no tile"), (dict(block_size=512), "no whole block"),
])
def test_estimate_refuses_bad_settings(changes, match):
    model = build_transformer(SMOKE).eval()
    x0, embeds = _clips()
    settings = {**dict(tiles=TILES, sigmas=[0.5], block_size=BLOCK), **changes}
    with pytest.raises(ValueError, match=match):
        estimate_tile_concentration(model, embeds, x0, GRID, **settings)


def _tool():
    return load_tool("tile_concentration")


@pytest.fixture(scope="module")
def smoke_export(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("smoke") / "model"
    export_pipeline(build_transformer(SMOKE), build_caption_encoder(SMOKE), SMOKE, folder,
                    state={"step": 0, "train_seconds": 0.0, "preset": "smoke", "config": {}})
    return folder


def test_tool_writes_the_table_and_json(smoke_export, tmp_path, capsys):
    out = tmp_path / "tiles.json"
    assert _tool().main([str(smoke_export), "--tiles", "1x4x4", "4x2x2", "--sigmas", "0.5",
                         "--block-size", "32", "--query-blocks", "4", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert set(written["masses"]) == {"1x4x4", "4x2x2"} and written["query_blocks"] == 4
    assert "| 4x2x2 |" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.json"]  # no temporary left


@pytest.mark.parametrize("args, message", [
    (["--tiles", "1x8"], "expected three positive ints"),
    (["--tiles", "0x8x8"], "expected three positive ints"),
    (["--sigmas", "0"], "noise level"), (["--query-blocks", "0"], "--query-blocks"),
    (["--density", "2"], "--density"),
])
def test_tool_refuses_bad_arguments_and_writes_nothing(smoke_export, tmp_path, capsys, args,
                                                       message):
    with pytest.raises(SystemExit):
        _tool().main([str(smoke_export), *args, "--json", str(tmp_path / "tiles.json")])
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_tool_refuses_a_folder_without_a_pipeline(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _tool().main([str(tmp_path)])
    assert "not a pipeline folder" in capsys.readouterr().err
