"""One tokenizer interface over `tokenizer.json`, `tokenizer.model` and GGUF-embedded vocabularies.

The engine needs the same five things from every model -- encode, decode, streaming decode, stop
ids and the chat prompt -- whatever the checkpoint ships. HF directories bring a `tokenizers`
serialisation (or a bare sentencepiece model); a GGUF only stores llama.cpp's token list, merges
and scores, so we rebuild an equivalent `tokenizers` pipeline from those the way transformers'
GGUF loader does, which keeps our ids identical to `AutoTokenizer.from_pretrained(gguf_file=...)`.
transformers itself is not imported here: it is a test-only reference.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from vengine.errors import ConfigError, ModelLoadError

# GGUF token types (llama.cpp and sentencepiece share the numbering).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits per `tokenizer.ggml.pre`, the ones transformers' GGUF loader knows; any
# other value keeps GPT-2's own ByteLevel regex, as it does there.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}

# Special tokens llama.cpp treats as end-of-generation by their text; a GGUF has no
# generation_config.json, so this is how base and chat models there stop.
_EOG_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
)

# Used when a model has no chat template at all: plain ChatML, documented in apply_chat_template.
_FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_STREAM_MAX_PENDING = 8  # tokens held back for an unfinished UTF-8 character before giving up


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level vocabularies use."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _template_processor(
    bos: str | None,
    bos_id: int | None,
    eos: str | None,
    eos_id: int | None,
    add_bos: bool,
    add_eos: bool,
) -> processors.TemplateProcessing:
    """A post-processor adding BOS/EOS as the flags say (transformers' update_post_processor)."""
    add_bos = add_bos and bos is not None and bos_id is not None
    add_eos = add_eos and eos is not None and eos_id is not None
    head = f"{bos}:0 " if add_bos else ""
    tail = f" {eos}:0" if add_eos else ""
    single = f"{head}$A:0{tail}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    best score first (ties: longer left, then longer right piece), as transformers derives them."""
    index = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, str, str]] = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))]
        pairs = sorted(
            ((a, b) for a, b in pairs if a in index and b in index),
            key=lambda p: (index[p[0]], index[p[1]]),
        )
        found.extend((score, a, b) for a, b in pairs)
    found.sort(key=lambda f: (f[0], len(f[1]), len(f[2])), reverse=True)
    return [(a, b) for _, a, b in found]


def _gpt2_backend(meta: dict[str, Any], tokens: list[str]) -> tuple[_Backend, set[str]]:
    """Byte-level BPE, and the byte alphabet (a real control token is spelled in it)."""
    table = _byte_alphabet()
    alphabet = set(table.values())
    vocab = {
        t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    backend = _Backend(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend, alphabet


def _spm_backend(meta: dict[str, Any], tokens: list[str], arch: str) -> _Backend:
    """Sentencepiece-style BPE with byte fallback, rebuilt from tokens + scores.

    Gemma stores multi-space tokens as real spaces and orders merges by file position, not score;
    Phi-3 prepends the word marker in a normalizer. Both follow transformers' GGUF builders.
    """
    gemma = arch.startswith("gemma")
    if gemma:
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    else:
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, scores)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = _Backend(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif arch == "phi3":
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        decode.append(decoders.Strip(" ", 1, 0))
    else:
        # transformers ignores add_space_prefix; llama.cpp honours it, and so do we when it is False
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True) is not False
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        if prefix:
            decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)
    return backend


class _TokenizersBackend:
    """Adapter over a `tokenizers.Tokenizer` (BOS/EOS come from its post-processor)."""

    def __init__(self, tok: _Backend) -> None:
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


class _SentencePieceBackend:
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
                f"{path}: not a readable sentencepiece model ({_one_line(e)})"
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
        n = self.size()
        ids = [i for i in ids if 0 <= i < n]  # unknown ids are dropped, as `tokenizers` does
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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _jinja_env():
    """transformers' chat-template environment: sandboxed, trim/lstrip blocks, JSON without HTML
    escaping, `raise_exception`, `strftime_now`, loop controls, a pass-through `generation` tag."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}` only marks assistant text for training masks; render its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """Encode/decode, special ids and chat prompts for one model, whatever format it came in."""

    def __init__(
        self,
        backend: _TokenizersBackend | _SentencePieceBackend,
        *,
        special_tokens: dict[str, str],
        chat_templates: dict[str, str],
        extra_stop_ids: set[int],
        source: str,
    ) -> None:
        self._backend = backend
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.vocab_size: int = backend.size()  # including added tokens: every id decode accepts
        self.bos_id: int | None = self._lookup(self.special_tokens.get("bos_token"))
        self.eos_id: int | None = self._lookup(self.special_tokens.get("eos_token"))
        self.special_ids: frozenset[int] = backend.special_ids
        self.chat_templates = dict(chat_templates)
        self._env = _jinja_env()
        self._compiled: dict[str, Any] = {}
        self._fallback: Any = None
        for name, text in self.chat_templates.items():
            try:
                self._compiled[name] = self._env.from_string(text)
            except Exception as e:
                raise ModelLoadError(
                    f"{source}: chat template {name!r} does not parse ({_one_line(e)})"
                ) from None
        stops = {i for i in extra_stop_ids if 0 <= i < self.vocab_size}
        if self.eos_id is not None:
            stops.add(self.eos_id)
        turn_end = self._turn_end_id()
        if turn_end is not None:
            stops.add(turn_end)
        self.stop_ids: frozenset[int] = frozenset(stops)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """An HF model directory: tokenizer.json (preferred) or tokenizer.model, plus the
        tokenizer_config, special_tokens_map, generation_config, chat_template.jinja beside it."""
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: not a directory")
        cfg = _read_json(path / "tokenizer_config.json")
        for key, value in _read_json(path / "special_tokens_map.json").items():
            cfg.setdefault(key, value)  # config wins; the legacy map only fills gaps
        gen = _read_json(path / "generation_config.json")
        names = (
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        )
        specials = {k: _token_text(cfg.get(k)) for k in names}

        if (path / "tokenizer.json").is_file():
            try:
                tok = _Backend.from_file(str(path / "tokenizer.json"))
            except Exception as e:
                raise ModelLoadError(
                    f"{path / 'tokenizer.json'}: not a readable tokenizers file ({_one_line(e)})"
                ) from None
            # As transformers v5 does: BOS/EOS come from tokenizer.json's post-processor (the
            # config's add_bos_token is ignored), and named special tokens or added tokens the
            # config lists but the file lacks are added so they are matched whole.
            extra = [_token_text(t) for t in cfg.get("additional_special_tokens") or ()]
            added = {t.content for t in tok.get_added_tokens_decoder().values()}
            for entry in (cfg.get("added_tokens_decoder") or {}).values():
                if isinstance(entry, dict) and entry.get("content") not in added:
                    tok.add_tokens(
                        [
                            AddedToken(
                                entry["content"],
                                single_word=bool(entry.get("single_word")),
                                lstrip=bool(entry.get("lstrip")),
                                rstrip=bool(entry.get("rstrip")),
                                normalized=bool(entry.get("normalized", not entry.get("special"))),
                                special=bool(entry.get("special")),
                            )
                        ]
                    )
            added = {t.content for t in tok.get_added_tokens_decoder().values()}
            missing = [t for t in [*specials.values(), *extra] if t and t not in added]
            if missing:
                tok.add_special_tokens(
                    [AddedToken(t, special=True) for t in dict.fromkeys(missing)]
                )
            backend: _TokenizersBackend | _SentencePieceBackend = _TokenizersBackend(tok)
        elif (path / "tokenizer.model").is_file():
            add_bos = cfg.get("add_bos_token")
            backend = _SentencePieceBackend(
                path / "tokenizer.model",
                add_bos if isinstance(add_bos, bool) else None,
                bool(cfg.get("add_eos_token", False)),
            )
            sp = backend.sp
            if specials["bos_token"] is None and backend.bos_id is not None:
                specials["bos_token"] = sp.id_to_piece(backend.bos_id)
            if specials["eos_token"] is None and backend.eos_id is not None:
                specials["eos_token"] = sp.id_to_piece(backend.eos_id)
            if specials["unk_token"] is None and sp.unk_id() >= 0:
                specials["unk_token"] = sp.id_to_piece(sp.unk_id())
        else:
            raise ModelLoadError(f"{path}: no tokenizer.json or tokenizer.model in the directory")

        templates = cls._dir_templates(path, cfg)
        eos = gen.get("eos_token_id")
        stops = {i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)}
        return cls(
            backend,
            special_tokens=specials,
            chat_templates=templates,
            extra_stop_ids=stops,
            source=str(path),
        )

    @staticmethod
    def _dir_templates(path: Path, cfg: dict[str, Any]) -> dict[str, str]:
        """chat_template.jinja and additional_chat_templates/*.jinja win over the config's entry."""
        templates: dict[str, str] = {}
        raw = cfg.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            templates.update(
                {
                    t["name"]: t["template"]
                    for t in raw
                    if isinstance(t, dict) and "name" in t and "template" in t
                }
            )
        files = {"default": path / "chat_template.jinja"}
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            files.update({f.stem: f for f in sorted(extra_dir.glob("*.jinja"))})
        if any(f.is_file() for f in files.values()):
            templates = {}
            for name, f in files.items():
                if f.is_file():
                    templates[name] = f.read_text(encoding="utf-8")
        return templates

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], source: str = "GGUF file") -> Tokenizer:
        """From GGUF metadata (`gguf_metadata(reader)`): 'gpt2' byte-level BPE or 'llama'
        sentencepiece-style BPE, special tokens and chat template(s) included."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ModelLoadError(f"{source}: no tokenizer.ggml.tokens in the metadata")
        types = list(meta.get("tokenizer.ggml.token_type") or [])
        arch = str(meta.get("general.architecture", ""))
        if model == "gpt2":
            tok, alphabet = _gpt2_backend(meta, tokens)
            add_bos_default = False
        elif model == "llama":
            tok, alphabet = _spm_backend(meta, tokens, arch), None
            add_bos_default = True  # llama.cpp adds BOS to sentencepiece vocabularies by default
        else:
            raise ModelLoadError(
                f"{source}: unsupported tokenizer.ggml.model {model!r} (supported: gpt2, llama)"
            )

        def token_of(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        specials = {
            "bos_token": token_of("bos_token_id"),
            "eos_token": token_of("eos_token_id"),
            "unk_token": token_of("unknown_token_id"),
            "pad_token": token_of("padding_token_id"),
        }
        # Control tokens become special and user-defined ones plain added tokens, so both are
        # matched whole in text. A byte-level "control" token spelled outside the byte alphabet
        # is a llama.cpp mislabel and is skipped, as transformers does.
        control = [
            t
            for t, k in zip(tokens, types)
            if k == _CONTROL and (alphabet is None or set(t) <= alphabet)
        ]
        if control:
            tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        vocab = tok.get_vocab(with_added_tokens=False)
        user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
        if user:
            tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        named = [t for t in specials.values() if t is not None and t not in added and t in vocab]
        if named:
            tok.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(named)])

        def flag(key: str, default: bool) -> bool:
            value = meta.get(f"tokenizer.ggml.{key}")
            return value if isinstance(value, bool) else default

        bos, eos = specials["bos_token"], specials["eos_token"]
        tok.post_processor = _template_processor(
            bos,
            tok.token_to_id(bos) if bos else None,
            eos,
            tok.token_to_id(eos) if eos else None,
            flag("add_bos_token", add_bos_default),
            flag("add_eos_token", False),
        )

        templates = {}
        if isinstance(meta.get("tokenizer.chat_template"), str):
            templates["default"] = meta["tokenizer.chat_template"]
        for key, value in meta.items():
            if key.startswith("tokenizer.chat_template.") and isinstance(value, str):
                templates[key.removeprefix("tokenizer.chat_template.")] = value

        backend = _TokenizersBackend(tok)
        stops = {
            meta[f"tokenizer.ggml.{k}"]
            for k in ("eot_token_id", "eom_token_id")
            if isinstance(meta.get(f"tokenizer.ggml.{k}"), int)
        }
        stops |= {i for t in _EOG_TEXTS if (i := tok.token_to_id(t)) in backend.special_ids}
        return cls(
            backend,
            special_tokens=specials,
            chat_templates=templates,
            extra_stop_ids=stops,
            source=source,
        )

    # -- tokens ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; BOS/EOS only where the model's config asks for them (as transformers)."""
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise ConfigError(
                f"token id {token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        return token

    def _lookup(self, token: str | None) -> int | None:
        return self._backend.token_to_id(token) if token else None

    # -- chat --------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for `messages`, rendered like transformers' apply_chat_template(
        tokenize=False): variables messages, tools, documents, add_generation_prompt, the special
        token strings (bos_token, eos_token, ...) and any kwargs. With `tools` and a 'tool_use'
        template, that one is used. A model without any template gets plain ChatML."""
        if not messages:
            raise ConfigError("cannot apply a chat template to an empty conversation")
        template = self._select_template(kwargs.get("tools") is not None)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except Exception as e:  # raise_exception, undefined names, type errors in the template
            raise ConfigError(f"chat template failed on these messages: {_one_line(e)}") from None

    def _select_template(self, with_tools: bool):
        if not self._compiled:
            if self._fallback is None:
                self._fallback = self._env.from_string(_FALLBACK_TEMPLATE)
            return self._fallback
        if with_tools and "tool_use" in self._compiled:
            return self._compiled["tool_use"]
        if "default" in self._compiled:
            return self._compiled["default"]
        if len(self._compiled) == 1:
            return next(iter(self._compiled.values()))
        raise ConfigError(
            f"{self.source}: several chat templates and none named 'default': "
            f"{', '.join(sorted(self._compiled))}"
        )

    def _turn_end_id(self) -> int | None:
        """The special token a chat template writes right after an assistant reply (<|im_end|>,
        <|eot_id|>, <|end|>, <end_of_turn>...), found by rendering a probe conversation."""
        if not self._compiled:
            return None
        marker = "vengine-probe-reply"
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            text = self.apply_chat_template(probe, add_generation_prompt=False)
        except Exception:
            return None
        rest = text[text.rfind(marker) + len(marker) :].lstrip() if marker in text else ""
        ids = self._backend.encode(rest, False) if rest else []
        return ids[0] if ids and ids[0] in self.special_ids else None


class StreamDecoder:
    """Text of a growing id list, one token at a time, emitting only final text.

    Each push decodes a small window (the tokens of the last emission plus the pending ones) and
    emits what it adds beyond the window's prefix, so the cost per token is O(window), not
    O(sequence); a window ending in U+FFFD is an unfinished UTF-8 character and is held back
    (up to a few tokens, after which the replacement character is emitted as is).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window: tokens of the last emission, then pending ones
        self._read = 0  # how many of them were emitted

    def push(self, token_id: int) -> str:
        """The new final text after `token_id` (often '', e.g. mid-character)."""
        if self._skip and token_id in self._tok.special_ids:
            return ""  # decode() drops these before the decoder runs; so do we
        self._ids.append(token_id)
        done = self._tok.decode(self._ids[: self._read], self._skip)
        text = self._tok.decode(self._ids, self._skip)
        if len(self._ids) - self._read < _STREAM_MAX_PENDING and (
            len(text) <= len(done) or text.endswith("\ufffd")
        ):
            return ""
        del self._ids[: self._read]  # the next window starts at the tokens emitted now
        self._read = len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes to U+FFFD)."""
        done = self._tok.decode(self._ids[: self._read], self._skip)
        text = self._tok.decode(self._ids, self._skip)
        self._ids, self._read = [], 0
        return text[len(done) :]
