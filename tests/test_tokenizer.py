"""dcvla's offline Llama-2 tokenizer."""

import pytest

from dcvla.openvla.config import get_preset
from dcvla.tokenizer import load_tokenizer

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_shipped_tokenizer_encodes_any_text_losslessly(tokenizer):
    text = "Ünïcode 🦓 and\ttabs, numbers 12345"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids  # byte fallback, never <unk>
    assert tokenizer.decode(ids) == text
    assert max(tokenizer.get_vocab().values()) < TINY.llm.text_vocab_size - TINY.n_action_bins


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
