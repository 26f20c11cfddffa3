"""Where a Tokenizer's parts come from: an HF directory (tokenizer.json or tokenizer.model, and
the configs beside them) or GGUF metadata. Each reader returns the backend, the special token
strings, the chat templates and the extra stop ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Pipeline

from vengine.errors import ModelLoadError, one_line
from vengine.models.tokenizer.backends import Backend, SentencePieceBackend, TokenizersBackend
from vengine.models.tokenizer.gguf_vocab import (
    CONTROL,
    USER_DEFINED,
    gpt2_pipeline,
    spm_pipeline,
    template_processor,
)

Parts = tuple[Backend, dict[str, str | None], dict[str, str], set[int]]

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


def read_hf_dir(path: Path) -> Parts:
    """tokenizer.json (preferred) or tokenizer.model, plus the tokenizer_config,
    special_tokens_map, generation_config, chat_template.jinja beside it."""
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
            tok = _Pipeline.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ModelLoadError(
                f"{path / 'tokenizer.json'}: not a readable tokenizers file ({one_line(e)})"
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
        backend: Backend = TokenizersBackend(tok)
    elif (path / "tokenizer.model").is_file():
        add_bos = cfg.get("add_bos_token")
        backend = SentencePieceBackend(
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

    eos = gen.get("eos_token_id")
    stops = {i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)}
    return backend, specials, _dir_templates(path, cfg), stops


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


def read_gguf(meta: dict[str, Any], source: str) -> Parts:
    """GGUF metadata (`gguf_metadata(reader)`): 'gpt2' byte-level BPE or 'llama'
    sentencepiece-style BPE, special tokens and chat template(s) included."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError(f"{source}: no tokenizer.ggml.tokens in the metadata")
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    arch = str(meta.get("general.architecture", ""))
    if model == "gpt2":
        tok, alphabet = gpt2_pipeline(meta, tokens)
        add_bos_default = False
    elif model == "llama":
        tok, alphabet = spm_pipeline(meta, tokens, arch), None
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
        if k == CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tok.get_vocab(with_added_tokens=False)
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
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
    tok.post_processor = template_processor(
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

    backend = TokenizersBackend(tok)
    stops = {
        meta[f"tokenizer.ggml.{k}"]
        for k in ("eot_token_id", "eom_token_id")
        if isinstance(meta.get(f"tokenizer.ggml.{k}"), int)
    }
    stops |= {i for t in _EOG_TEXTS if (i := tok.token_to_id(t)) in backend.special_ids}
    return backend, specials, templates, stops


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None

