"""The fa4 backend where it can't run (CPU, CI): lazy import, one log line, fallback to flex."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys

import pytest
import torch

from ditplan.runtime.kernels import fa4, registry


@pytest.fixture
def flex_everywhere(monkeypatch):
    # Pretend flex runs here, to see what a CUDA machine without a usable fa4 resolves to.
    flex = registry._REGISTRY[registry.Backend.FLEX]
    monkeypatch.setitem(registry._REGISTRY, registry.Backend.FLEX,
                        dataclasses.replace(flex, is_available=lambda device: True))
    monkeypatch.setattr(registry, "_LOGGED", set())


def test_auto_skips_fa4_for_flex_with_one_line_saying_why(flex_everywhere, caplog):
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        for _ in range(3):
            chosen = registry.resolve_backend("auto", torch.device("cpu"))
    assert chosen.name is registry.Backend.FLEX
    assert [r.getMessage() for r in caplog.records] == [
        "block_sparse_attention: backend auto -> flex on cpu (fa4: needs a CUDA device)"]


def test_fa4_by_name_falls_back_to_flex_with_one_warning(flex_everywhere, caplog):
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        for _ in range(2):
            chosen = registry.resolve_backend("fa4", torch.device("cpu"))
    assert chosen.name is registry.Backend.FLEX
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falling back to 'flex'" in warnings[0]


def test_missing_install_names_the_extra(monkeypatch):
    monkeypatch.setattr(fa4, "_FA4", {})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install 'ditplan[fa4]'" in fa4._load()


def test_broken_install_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(fa4, "_FA4", {})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import raises ImportError
    reason = fa4._load()
    assert reason.startswith("flash_attn.cute did not import (ModuleNotFoundError")
    assert fa4._load() == reason  # tried once


def test_ditplan_import_does_not_import_flash_attn():
    assert "flash_attn" not in sys.modules or fa4._FA4.get("reason") == ""


def test_fake_op_gives_the_kernels_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = k = v = torch.empty(2, 3, 1000, 128, dtype=torch.bfloat16)
        counts = torch.empty(2, 3, 8, dtype=torch.int32)
        indices = torch.empty(2, 3, 8, 8, dtype=torch.int32)
        out, lse = fa4.fa4_block_sparse_attention_op(q, k, v, counts, indices, None, True)
        _, no_lse = fa4.fa4_block_sparse_attention_op(q, k, v, counts, indices, None)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.stride() == (1000 * 3 * 128, 128, 3 * 128, 1)  # [B, S, H, D] seen as [B, H, S, D]
    assert lse.shape == (2, 3, 1000) and lse.dtype == torch.float32
    assert no_lse.numel() == 0  # asked for none, the kernel writes none


@pytest.mark.parametrize("dtype,block_size,grad,takes", [
    (torch.bfloat16, 128, False, True), (torch.float16, 128, False, True),
    (torch.float32, 128, False, False), (torch.bfloat16, 64, False, False),
    (torch.bfloat16, 128, True, False)])
def test_which_calls_the_kernel_takes(dtype, block_size, grad, takes):
    q = torch.zeros(1, 2, 300, 128, dtype=dtype, requires_grad=grad)
    assert fa4.fa4_takes(q, q, q, block_size) is takes


def test_the_op_asks_the_kernel_for_its_log_sum_exp_only_when_wanted(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, *, softmax_scale, block_sparse_tensors, return_lse=False):
        # flash-attn-4's contract: lse is None unless return_lse (q, out: [B, S, H, D])
        calls.append(return_lse)
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1]) if return_lse else None
        return torch.zeros_like(q), lse

    monkeypatch.setattr(fa4, "_FA4", {"reason": "", "func": flash_attn_func,
                                      "tensors": lambda **lists: lists})
    q = k = v = torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16)
    counts = torch.ones(1, 2, 2, dtype=torch.int32)
    indices = torch.zeros(1, 2, 2, 2, dtype=torch.int32)
    out = fa4.fa4_attention_from_lists(q, k, v, counts, indices)
    assert out.shape == q.shape
    out, lse = fa4.fa4_attention_from_lists(q, k, v, counts, indices, return_lse=True)
    assert lse.shape == (1, 2, 256) and lse.dtype == torch.float32
    assert calls == [False, True]
