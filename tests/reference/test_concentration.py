"""The attention-concentration penalty: its mass against float64 loops over the layer's own q and
k, the model's output untouched, its gradient, compiled, and in the trainer."""

from __future__ import annotations

import math

import pytest
import torch

from ditplan.reference.concentration import ConcentrationPenalty, top_block_mass
from ditplan.reference.config import SMOKE, build_transformer
from ditplan.reference.training import Shard, TrainConfig, Trainer
from ditplan.runtime.adapters.wan import wan_self_attention_qkv
from ditplan.runtime.kernels.permute import tile_permutation_reference
from tests.tool_scripts import load_tool

GRID = (4, 8, 8)  # the smoke preset's 4 x 16 x 16 px clips after the (1, 2, 2) patch


def _inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 3, 4, 16, 16, generator=gen),
                timestep=torch.tensor([700.0, 200.0][:batch]),
                encoder_hidden_states=torch.randn(batch, 8, 16, generator=gen), return_dict=False)


def _top_mass_loops(q_rows, k, block_size, density):
    """float64, per clip and head: the query block's mean distribution over key blocks, top n."""
    q_rows, k = q_rows.double(), k.double()
    batch, _, heads, dim = q_rows.shape
    blocks = math.ceil(k.shape[1] / block_size)
    n = max(1, math.ceil(density * blocks))
    out = torch.empty(batch, heads, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            probs = torch.softmax(q_rows[b, :, h] @ k[b, :, h].T / math.sqrt(dim), dim=-1)
            mass = [probs[:, j * block_size:(j + 1) * block_size].sum(-1).mean()
                    for j in range(blocks)]
            out[b, h] = sum(sorted(mass, reverse=True)[:n])
    return out


@pytest.mark.parametrize("seq", [96, 100])  # whole blocks, and a partial last block
def test_top_block_mass_matches_float64_loops(seq):
    gen = torch.Generator().manual_seed(seq)
    q_rows = torch.randn(2, 16, 3, 8, generator=gen) * 2
    k = torch.randn(2, seq, 3, 8, generator=gen) * 2
    got = top_block_mass(q_rows, k, block_size=16, density=0.2)
    # float32 softmax over <= 100 keys: ~1e-6 relative per probability
    torch.testing.assert_close(got.double(), _top_mass_loops(q_rows, k, 16, 0.2),
                               atol=1e-5, rtol=1e-5)


def test_probe_measures_the_layers_own_q_and_k_and_leaves_the_output_alone():
    torch.manual_seed(0)
    model = build_transformer(SMOKE).eval()
    originals = [block.attn1.processor for block in model.blocks]
    with torch.no_grad():
        dense = model(**_inputs())[0]
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):  # WanTransformerBlock: attn1(x, None, None, rotary_emb)
            seen[name] = (args[0], args[3])
        return hook

    hooks = [block.attn1.register_forward_pre_hook(grab(i), with_kwargs=True)
             for i, block in enumerate(model.blocks)]
    penalty = ConcentrationPenalty(model, target=0.9, block_size=64)
    penalty.sample(GRID, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(**_inputs())[0]
    for h in hooks:
        h.remove()
    assert torch.equal(out, dense)
    masses = penalty.masses()  # [L, B, H]
    assert masses.shape == (2, 2, 2)
    order = tile_permutation_reference(GRID, (1, 8, 8))
    rows = penalty._sample.query_tokens  # [B, 64]
    for layer, block in enumerate(model.blocks):
        hidden, rotary = seen[layer]
        q, k, _ = wan_self_attention_qkv(block.attn1, hidden, rotary)  # [B, H, S, D]
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, S, H, D]
        q_rows = torch.stack([q[b, rows[b]] for b in range(2)])
        want = _top_mass_loops(q_rows, k[:, order], 64, 0.2)
        torch.testing.assert_close(masses[layer].double(), want, atol=1e-5, rtol=1e-5)
    # each clip's query block is one whole block of the tiled order
    for b in range(2):
        start = (order == rows[b, 0]).nonzero().item()
        assert start % 64 == 0 and torch.equal(order[start:start + 64], rows[b])
    penalty.remove()
    assert [block.attn1.processor for block in model.blocks] == originals


def test_penalty_descent_raises_the_mass():
    torch.manual_seed(0)
    model = build_transformer(SMOKE)
    penalty = ConcentrationPenalty(model, target=1.0, block_size=32)
    params = [p for name, p in model.named_parameters() if ".attn1." in name]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    masses = []
    for _ in range(15):
        penalty.sample(GRID, 2, torch.Generator().manual_seed(5))
        model(**_inputs())
        loss, mass = penalty.penalty()
        masses.append(mass.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert masses[-1] > masses[0] + 0.1, masses


def test_compiled_model_gives_the_eager_penalty_and_gradient():
    torch.manual_seed(0)
    model = build_transformer(SMOKE)
    penalty = ConcentrationPenalty(model, target=0.9, block_size=64)
    weight = model.blocks[1].attn1.to_k.weight
    results = []
    for runner in (model, torch.compile(model, backend="aot_eager", dynamic=False)):
        penalty.sample(GRID, 2, torch.Generator().manual_seed(7))
        runner(**_inputs())
        loss, _ = penalty.penalty()
        results.append((loss.detach(), torch.autograd.grad(loss, weight)[0]))
    torch.testing.assert_close(results[1], results[0])


def test_penalty_per_head_or_per_layer_mean():
    model = build_transformer(SMOKE)  # 2 layers x 2 heads
    masses = torch.tensor([[[0.5, 1.0]], [[0.95, 0.95]]])  # [L, B=1, H]
    for over, want in (("heads", (0.4 + 0 + 0 + 0) / 4), ("layers", (0.15 + 0) / 2)):
        penalty = ConcentrationPenalty(model, target=0.9, over=over)
        for probe, mass in zip(penalty.probes, masses, strict=True):
            probe.mass = mass
        loss, mean = penalty.penalty()
        assert loss.item() == pytest.approx(want)
        assert mean.item() == pytest.approx(masses.mean().item())
        penalty.remove()
    with pytest.raises(ValueError, match="choose one of"):
        ConcentrationPenalty(model, target=0.9, over="tokens")


def test_sampling_under_data_parallelism_keeps_the_single_process_draw():
    model = build_transformer(SMOKE)
    penalty = ConcentrationPenalty(model, target=0.9, block_size=32)
    penalty.sample(GRID, 4, torch.Generator().manual_seed(2))
    whole = penalty._sample.query_tokens
    penalty.sample(GRID, 4, torch.Generator().manual_seed(2), take=Shard(1, 2).take)
    assert torch.equal(penalty._sample.query_tokens, whole[2:])


def test_refusals():
    model = build_transformer(SMOKE)
    with pytest.raises(ValueError, match=r"target 0 must be in \(0, 1\]"):
        ConcentrationPenalty(model, target=0)
    penalty = ConcentrationPenalty(model, target=0.9)
    with pytest.raises(RuntimeError, match="no forward since"):
        penalty.masses()
    with pytest.raises(ValueError, match="hold no whole block of 128"):
        penalty.sample((1, 8, 8), 2, torch.Generator())
    penalty.remove()
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse"):
        ConcentrationPenalty(model, target=0.9)


def _tool():
    return load_tool("train_reference")


def test_trainer_adds_the_penalty_and_reports_the_mass(tmp_path, caplog):
    def config(folder, weight):
        return TrainConfig(out=tmp_path / folder, preset="smoke", device="cpu", compile=False,
                           batch_size=2, max_steps=1, log_every=1, save_every=0, warmup_steps=1,
                           total_steps=20, concentration_weight=weight)

    steps = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        trainer = Trainer(config(str(weight), weight))
        loss, _, mass = trainer.train_step()
        steps[weight] = (loss.item(), mass, trainer.transformer.blocks[0].attn1.to_q.weight)
    assert steps[0.0][1] is None
    assert 0 < steps[5.0][1].item() <= 1
    assert steps[5.0][0] == pytest.approx(steps[0.0][0])  # same batch: the diffusion loss
    assert not torch.equal(steps[5.0][2], steps[0.0][2])  # the penalty moved the weights
    caplog.set_level("INFO")
    trainer = Trainer(config("run", 5.0))
    trainer.run()
    logged = float(caplog.text.split("top-block mass ")[1].split()[0])
    row = trainer.loss_csv.splitlines()[-1].split(",")  # step ... clips/s, top_block_mass
    assert float(row[-1]) == pytest.approx(logged, abs=5e-4)  # 4 places in the CSV, 3 logged
    assert trainer.training_state()["config"]["concentration_weight"] == 5.0
    with pytest.raises(SystemExit):
        _tool().parse_args(["--smoke", "--out", str(tmp_path / "a"),
                            "--concentration-weight", "-1"])
    with pytest.raises(SystemExit):
        _tool().parse_args(["--smoke", "--out", str(tmp_path / "b"),
                            "--concentration-target", "1.5"])


def test_trainer_orders_the_penalty_blocks_by_its_tile_and_warns_only_on_a_change(tmp_path,
                                                                                  caplog):
    args = _tool().parse_args(["--smoke", "--out", str(tmp_path), "--concentration-weight", "1",
                               "--concentration-tile", "2x4x4"])
    assert args.concentration_tile == (2, 4, 4)
    with pytest.raises(SystemExit):
        _tool().parse_args(["--smoke", "--out", str(tmp_path), "--concentration-tile", "2x4"])

    def config(tile, **changes):
        return TrainConfig(out=tmp_path, preset="smoke", device="cpu", compile=False,
                           batch_size=2, max_steps=1, log_every=1, save_every=0, warmup_steps=1,
                           total_steps=20, concentration_weight=1.0, concentration_tile=tile,
                           **changes)

    trainer = Trainer(config((2, 4, 4)))
    assert trainer.concentration.tile == (2, 4, 4)
    trainer.run()
    assert trainer.training_state()["config"]["concentration_tile"] == [2, 4, 4]
    caplog.set_level("WARNING")
    Trainer(config((2, 4, 4), resume=tmp_path / "checkpoint")).run()
    assert "concentration_tile changed" not in caplog.text  # a JSON list against the tuple
    Trainer(config((1, 8, 8), resume=tmp_path / "checkpoint")).run()
    assert "concentration_tile changed on resume: [2, 4, 4] -> [1, 8, 8]" in caplog.text
