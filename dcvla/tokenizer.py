"""Tokenizers: a checkpoint's own, or dcvla's offline Llama-style BPE for random presets (no hub access)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent / "assets"


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The Llama-2 tokenizer of a checkpoint directory, or dcvla's offline one when `path` is None.

    Raises:
        FileNotFoundError: `path` has no tokenizer files.
    """
    if path is None:
        return PreTrainedTokenizerFast(
            tokenizer_file=str(ASSETS / "tokenizer.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    path = Path(path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
    return AutoTokenizer.from_pretrained(str(path))
