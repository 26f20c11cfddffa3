"""The two encoders behind Tokenizer: a `tokenizers` pipeline (tokenizer.json or a rebuilt GGUF
vocabulary) and a bare sentencepiece model, behind one small adapter interface."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer as _Pipeline

from vengine.errors import ModelLoadError, one_line


class TokenizersBackend:
    """Adapter over a `tokenizers.Tokenizer` (BOS/EOS come from its post-processor)."""

    def __init__(self, tok: _Pipeline) -> None:
        self.tok = tok
        self.special_ids = frozenset(
            i for i, t in tok.get_added_tokens_decoder().items() if t.special
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)


class SentencePieceBackend:
    """Adapter over a sentencepiece model: exact sentencepiece ids for plain text; control pieces
    such as `<s>` written in the text are matched whole and every text run between them is
    encoded on its own (sentencepiece's dummy prefix applies to each run, like transformers'
    legacy slow LlamaTokenizer)."""

    def __init__(self, path: Path, add_bos: bool | None, add_eos: bool) -> None:
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with multi-line text
            raise ModelLoadError(
                f"{path}: not a readable sentencepiece model ({one_line(e)})"
            ) from None
        n = self.sp.get_piece_size()
        self.special_ids = frozenset(i for i in range(n) if self.sp.is_control(i))
        pieces = sorted((self.sp.id_to_piece(i) for i in self.special_ids), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = (self.bos_id is not None) if add_bos is None else add_bos
        self.add_eos = add_eos

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text) if self._split else [text]:
            if not part:
                continue
            special = (
                self.sp.piece_to_id(part) if self._split and self._split.fullmatch(part) else None
            )
            ids.extend([special] if special is not None else self.sp.encode(part))
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_special_tokens and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        out, run = [], []
        for i in ids:  # sentencepiece drops control pieces, so write them out between runs
            if i in self.special_ids:
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # returns the unk id for unknown pieces
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.size() else None


Backend = TokenizersBackend | SentencePieceBackend
