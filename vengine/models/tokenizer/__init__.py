"""One tokenizer interface over `tokenizer.json`, `tokenizer.model` and GGUF-embedded vocabularies.

HF directories bring a `tokenizers` serialisation (or a bare sentencepiece model); a GGUF only
stores llama.cpp's token list, merges and scores, so `gguf_vocab` rebuilds an equivalent
`tokenizers` pipeline the way transformers' GGUF loader does. transformers itself is not imported
here: it is a test-only reference.
"""

from vengine.models.tokenizer.core import Tokenizer
from vengine.models.tokenizer.stream import StreamDecoder

__all__ = ["StreamDecoder", "Tokenizer"]
