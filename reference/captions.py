"""Fixed-vocabulary caption tokenizer and the small caption encoder shipped with the model.

Unknown words raise `UnknownWordError` listing the vocabulary: the model was trained on a closed
caption grammar, and silently mapping a word to <unk> would generate a video that ignores it.
The empty caption is all padding; it is the unconditional (CFG) input.
"""

from __future__ import annotations

import re

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ditplan.reference.attributes import caption_vocabulary

PAD = "<pad>"
PAD_ID = 0
DEFAULT_MAX_LENGTH = 32


class UnknownWordError(ValueError):
    """A caption contains a word outside the reference model's vocabulary."""


class CaptionTooLongError(ValueError):
    """A caption has more tokens than the encoder's max_length."""


class CaptionTokenizer:
    """Maps captions to padded token ids: lower-case, ',' is its own token, whitespace splits.

    Args:
        vocabulary: the words (without the padding token); id 0 is <pad>.
        max_length: every caption is padded to this many tokens.
    """

    def __init__(self, vocabulary: list[str], max_length: int = DEFAULT_MAX_LENGTH):
        if PAD in vocabulary or len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary must be unique words without the padding token")
        self.words = [PAD, *vocabulary]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.max_length = max_length

    def split(self, caption: str) -> list[str]:
        """Splits one caption into words; an empty caption gives []."""
        return re.sub(r",", " , ", caption.lower()).split()

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Tokenizes captions.

        Args:
            captions: B strings; "" is the null caption.

        Returns:
            long [B, max_length] token ids, right-padded with PAD_ID.
        """
        out = torch.full((len(captions), self.max_length), PAD_ID, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = self.split(caption)
            unknown = sorted({w for w in words if w not in self.ids})
            if unknown:
                raise UnknownWordError(
                    f"caption {caption!r} has words outside the reference vocabulary: {unknown}. "
                    f"Known words: {' '.join(self.words[1:])}")
            if len(words) > self.max_length:
                raise CaptionTooLongError(
                    f"caption {caption!r} has {len(words)} tokens, more than {self.max_length}")
            out[row, : len(words)] = torch.tensor([self.ids[w] for w in words], dtype=torch.long)
        return out

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """Inverse of encode up to spacing around commas: long [B, L] -> B strings."""
        captions = []
        for row in token_ids.tolist():
            text = " ".join(self.words[i] for i in row if i != PAD_ID)
            captions.append(text.replace(" ,", ","))
        return captions


class CaptionEncoder(ModelMixin, ConfigMixin):
    """Token + position embedding and a few pre-norm transformer layers -> encoder_hidden_states.

    No padding mask: the padding positions carry learned states, so the null caption (all padding)
    is an ordinary input, which the transformer learns as the unconditional branch.
    """

    @register_to_config
    def __init__(
        self,
        vocabulary: list[str] | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        hidden_dim: int = 128,
        text_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
    ):
        super().__init__()
        words = list(vocabulary) if vocabulary is not None else caption_vocabulary()
        self.register_to_config(vocabulary=words)  # the saved config always carries its words
        self.tokenizer = CaptionTokenizer(words, max_length)
        self.token_embedding = nn.Embedding(len(self.tokenizer.words), hidden_dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, hidden_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            hidden_dim, num_heads, dim_feedforward=4 * hidden_dim, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, text_dim)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """long [B, max_length] token ids on this module's device (see CaptionTokenizer.encode)."""
        return self.tokenizer.encode(captions).to(self.device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embeds token ids.

        Args:
            token_ids: long [B, L] with L <= max_length.

        Returns:
            float [B, L, text_dim] encoder_hidden_states.
        """
        x = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        x = self.layers(x)  # x: [B, L, hidden_dim]
        return self.proj(self.norm(x))

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Tokenizes and embeds captions: B strings -> float [B, max_length, text_dim]."""
        return self(self.tokenize(captions))
