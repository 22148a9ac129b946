"""Caption tokenizer and CaptionEncoder: round trips, errors, save/load."""

from __future__ import annotations

import pytest
import torch

from ditplan.reference.attributes import caption_vocabulary, captions_for, sample_attributes
from ditplan.reference.captions import (
    PAD_ID,
    CaptionEncoder,
    CaptionTokenizer,
    CaptionTooLongError,
    UnknownWordError,
)


def _encoder() -> CaptionEncoder:
    torch.manual_seed(0)
    return CaptionEncoder(hidden_dim=32, text_dim=16, num_layers=1, num_heads=2).eval()


def test_generated_captions_round_trip_through_the_tokenizer():
    tok = CaptionTokenizer(caption_vocabulary())
    captions = captions_for(sample_attributes(64, torch.Generator().manual_seed(1)))
    ids = tok.encode(captions)
    assert ids.shape == (64, 32) and ids.dtype == torch.long
    assert tok.decode(ids) == captions
    assert (ids[:, 0] != PAD_ID).all()


def test_null_caption_is_all_padding():
    tok = CaptionTokenizer(caption_vocabulary())
    assert torch.equal(tok.encode(["", "  "]), torch.zeros(2, 32, dtype=torch.long))


def test_unknown_word_error_names_the_word_and_the_vocabulary():
    tok = CaptionTokenizer(caption_vocabulary())
    with pytest.raises(UnknownWordError, match="'teal'") as err:
        tok.encode(["a teal circle slowly moves left"])
    assert "purple" in str(err.value) and "diamond" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_too_long_caption_is_refused():
    tok = CaptionTokenizer(caption_vocabulary(), max_length=4)
    with pytest.raises(CaptionTooLongError):
        tok.encode(["a red circle slowly moves left"])


def test_case_and_commas_are_normalised():
    tok = CaptionTokenizer(caption_vocabulary())
    a = tok.encode(["A Red circle slowly moves left, a blue square quickly moves up and "
                    "a green diamond slowly moves down"])
    b = tok.encode(["a red circle slowly moves left , a blue square quickly moves up and "
                    "a green diamond slowly moves down"])
    assert torch.equal(a, b)


def test_encoder_shapes_and_null_differs_from_caption():
    enc = _encoder()
    out = enc.encode(["a red circle slowly moves left", ""])
    assert out.shape == (2, 32, 16)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_encoder_save_and_load_round_trip(tmp_path):
    enc = _encoder()
    enc.save_pretrained(tmp_path / "enc")
    loaded = CaptionEncoder.from_pretrained(tmp_path / "enc").eval()
    assert loaded.config.vocabulary == caption_vocabulary()
    captions = ["a white triangle quickly moves toward the lower right", ""]
    with torch.no_grad():
        assert torch.equal(enc.encode(captions), loaded.encode(captions))
