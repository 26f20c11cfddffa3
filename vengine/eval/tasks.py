"""RULER-style long-context tasks, generated procedurally (no downloads, deterministic per seed).

Needle retrieval (niah_single, niah_multikey, niah_multivalue, niah_multiquery), variable
tracking (vt), common-words (cwe) and frequent-words (fwe) extraction, after RULER
(arXiv 2404.06654). Haystacks: "essay" (standard-library docstrings, our stand-in for RULER's
essays) or "noise" (RULER's repeated filler sentences). Scored by RULER's string match.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_ADJ = ("amber", "silent", "ancient", "crimson", "frozen", "golden", "hidden", "lonely", "quiet",
        "rapid", "silver", "wild", "bitter", "gentle", "hollow", "noble")
_NOUN = ("harbor", "falcon", "meadow", "lantern", "river", "canyon", "orchid", "compass", "glacier",
         "violin", "forest", "anchor", "beacon", "thistle", "garden", "pebble")
_NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
               "memorize it. I will quiz you about the numbers afterwards.")
_TEMPLATE_MARGIN = 32  # tokens the chat template adds around the user message, roughly


@dataclass(frozen=True)
class Case:
    """One prompt with the strings a correct answer contains; depth: where the (first) needle sits
    in the haystack, 0..1 (None for tasks without a needle)."""

    task: str
    messages: tuple[dict[str, str], ...]
    answers: tuple[str, ...]
    context_tokens: int
    depth: float | None = None
    answer_prefix: str = ""  # how the answer starts, for a base model to continue (RULER's)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]

    @property
    def completion(self) -> str:
        """The prompt as a base model reads it (no chat template): the answer begun."""
        return f"{self.prompt}\nAnswer: {self.answer_prefix}" if self.answer_prefix else self.prompt


@dataclass(frozen=True)
class _Spec:
    """What a task puts in the haystack (items at depths) and asks about it."""

    items: tuple[str, ...]
    depths: tuple[float, ...]
    intro: str
    question: str
    answers: tuple[str, ...]
    answer_prefix: str


def score(case: Case, text: str) -> float:
    """Fraction of the expected answers found in text (RULER's string_match_all)."""
    low = text.lower()
    return sum(a.lower() in low for a in case.answers) / len(case.answers)


def make_cases(task: str, tokenizer, context_tokens: int, num_cases: int, seed: int = 0,
               haystack: str = "essay", shared: bool = False) -> list[Case]:
    """num_cases cases of about context_tokens tokens, needles spread over depths 10%..90%.

    shared=True (needle tasks): every case puts its own needles into one same filler text, so two
    cases' prompts agree up to the shallower one's first needle; a runner that keeps the KV of a
    common prefix (ChatSession), fed deepest needles first, then prefills only the rest.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if haystack not in ("essay", "noise"):
        raise ValueError(f"haystack must be 'essay' or 'noise', got {haystack!r}")
    rngs = [random.Random(f"{seed}/{task}/{i}") for i in range(num_cases)]
    if task in ("cwe", "fwe"):
        if shared:
            raise ValueError(f"{task} has no needles: nothing to share")
        return [_words_case(task, tokenizer, context_tokens, rng) for rng in rngs]
    specs = [_SPECS[task](rng, 0.1 + 0.8 * i / max(num_cases - 1, 1))
             for i, rng in enumerate(rngs)]
    budgets = [context_tokens - _fixed_tokens(tokenizer, sp) - _TEMPLATE_MARGIN for sp in specs]
    if shared:
        filler = _filler(tokenizer, min(budgets), random.Random(f"{seed}/{task}"), haystack)
        fillers = [filler] * num_cases
    else:
        fillers = [_filler(tokenizer, b, rng, haystack) for b, rng in zip(budgets, rngs)]
    return [_haystack_case(task, sp, f, tokenizer) for sp, f in zip(specs, fillers)]


# -- needle tasks ------------------------------------------------------------------------------


def _number(rng: random.Random) -> str:
    """Seven digits: SmolLM-style tokenizers split digits one per token, so the answer spans
    several decode steps and sparse decode attention is actually exercised."""
    return str(rng.randrange(1_000_000, 10_000_000))


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _ADJ for b in _NOUN], n)
    return [f"{a}-{b}" for a, b in pairs]


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is: {value}."


def _other_depths(rng: random.Random, n: int) -> list[float]:
    return [rng.uniform(0.05, 0.95) for _ in range(n)]


def _niah_single(rng: random.Random, depth: float) -> _Spec:
    """One needle; two distractors whose keys share a word with its key, so retrieval must match
    the whole key. They sit shortly before the needle, so a shared filler stays common up to
    there (with the needle last, small models that lean on recency stay testable)."""
    a, b = rng.choice(_ADJ), rng.choice(_NOUN)
    key = f"{a}-{b}"
    others = [f"{a}-{rng.choice([n for n in _NOUN if n != b])}",
              f"{rng.choice([x for x in _ADJ if x != a])}-{b}"]
    value = _number(rng)
    items = [_needle(key, value)] + [_needle(k, _number(rng)) for k in others]
    before = sorted(rng.uniform(0.75 * depth, depth) for _ in others)
    return _Spec(tuple(items), (depth, *before), _NIAH_INTRO,
                 f"What is the special magic number for {key} mentioned in the provided text?",
                 (value,), f"The special magic number for {key} mentioned in the provided text is")


def _niah_multikey(rng: random.Random, depth: float, n: int = 6) -> _Spec:
    keys, values = _keys(rng, n), [_number(rng) for _ in range(n)]
    items = tuple(_needle(k, v) for k, v in zip(keys, values))
    return _Spec(items, (depth, *_other_depths(rng, n - 1)), _NIAH_INTRO,
                 f"What is the special magic number for {keys[0]} mentioned in the provided text?",
                 (values[0],),
                 f"The special magic number for {keys[0]} mentioned in the provided text is")


def _niah_multivalue(rng: random.Random, depth: float, n: int = 4) -> _Spec:
    key, values = _keys(rng, 1)[0], [_number(rng) for _ in range(n)]
    return _Spec(tuple(_needle(key, v) for v in values), (depth, *_other_depths(rng, n - 1)),
                 _NIAH_INTRO, f"What are all the special magic numbers for {key} mentioned in the "
                 "provided text?", tuple(values),
                 f"The special magic numbers for {key} mentioned in the provided text are")


def _niah_multiquery(rng: random.Random, depth: float, n: int = 4) -> _Spec:
    keys, values = _keys(rng, n), [_number(rng) for _ in range(n)]
    items = tuple(_needle(k, v) for k, v in zip(keys, values))
    return _Spec(items, (depth, *_other_depths(rng, n - 1)), _NIAH_INTRO,
                 f"What are the special magic numbers for {keys[0]} and {keys[1]} mentioned in "
                 "the provided text?", tuple(values[:2]), f"The special magic numbers for "
                 f"{keys[0]} and {keys[1]} mentioned in the provided text are")


def _vt(rng: random.Random, depth: float, hops: int = 4) -> _Spec:
    """A chain X1 = v, X2 = X1, ... plus a distractor chain with another value."""
    names = ["".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)) for _ in range(2 * hops + 2)]
    values = [str(rng.randrange(10_000, 100_000)) for _ in range(2)]
    items, depths = [], []
    for c, chain in enumerate((names[: hops + 1], names[hops + 1:])):
        start = depth if c == 0 else rng.uniform(0.05, 0.5)
        items += [f"VAR {chain[0]} = {values[c]}."]
        items += [f"VAR {chain[j]} = VAR {chain[j - 1]}." for j in range(1, len(chain))]
        depths += [start + (0.95 - start) * j / len(chain) for j in range(len(chain))]
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    q = (f"Find all variables that are assigned the value {values[0]} in the text above. Answer "
         "with the variable names only.")
    prefix = (f"According to the chain(s) of variable assignment in the text above, {hops + 1} "
              f"variables are assigned the value {values[0]}, they are:")
    return _Spec(tuple(items), tuple(depths), intro, q, tuple(names[: hops + 1]), prefix)


_SPECS: dict[str, Callable[[random.Random, float], _Spec]] = {
    "niah_single": _niah_single, "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue, "niah_multiquery": _niah_multiquery, "vt": _vt}


@functools.cache
def _sentences(haystack: str) -> tuple[str, ...]:
    """The haystack split into sentences, whitespace collapsed (needles go between sentences)."""
    if haystack == "noise":
        text = NOISE
    else:
        from vengine.eval.activations import corpus_text

        text = corpus_text()
    parts = (" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text))
    return tuple(dict.fromkeys(p for p in parts if p))  # inherited docstrings repeat


def _filler(tokenizer, budget: int, rng: random.Random, haystack: str) -> list[str]:
    """Consecutive sentences from a random start until they hold about budget tokens."""
    sents = _sentences(haystack)
    at, out, used = rng.randrange(len(sents)), [], 0
    while used < budget:
        s = sents[at % len(sents)]
        used += len(tokenizer.encode(" " + s, add_special_tokens=False))
        out.append(s)
        at += 1
    return out


def _render(spec: _Spec, body: list[str]) -> str:
    return f"{spec.intro}\n{' '.join(body)}\n{spec.question}"


def _fixed_tokens(tokenizer, spec: _Spec) -> int:
    """Tokens of a case besides its filler."""
    return len(tokenizer.encode(_render(spec, list(spec.items)), add_special_tokens=False))


def _haystack_case(task: str, spec: _Spec, filler: list[str], tokenizer) -> Case:
    body, n = list(filler), len(filler)
    # Insert deepest first so earlier indices stay valid.
    for item, d in sorted(zip(spec.items, spec.depths), key=lambda x: -x[1]):
        body.insert(round(min(max(d, 0.0), 1.0) * n), item)
    text = _render(spec, body)
    return Case(task, ({"role": "user", "content": text},), spec.answers,
                len(tokenizer.encode(text, add_special_tokens=False)) + _TEMPLATE_MARGIN,
                spec.depths[0], spec.answer_prefix)


# -- word-frequency tasks ----------------------------------------------------------------------


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    """Plain lowercase English words of the essay haystack, in a fixed order."""
    from vengine.eval.activations import corpus_text

    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", corpus_text()))))


def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=5))


def _words_case(task: str, tokenizer, context_tokens: int, rng: random.Random) -> Case:
    """cwe: 10 words repeated often (30 times, as RULER, when the context allows) among words
    3 times each; fwe: coded words with Zipf (alpha 2) counts."""
    n_words, sub_seed = 200, rng.random()
    for _ in range(3):  # rescale the word count to the measured tokens
        words, answers = _word_list(task, random.Random(sub_seed), n_words)
        used = len(tokenizer.encode(_render_words(task, words), add_special_tokens=False))
        n_words = int(n_words * (context_tokens - 96) / used)
    if task == "cwe":
        intro = "Below is a numbered list of words. In these words, some appear more often than others."
        q = "Question: What are the 10 most common words in the above list? Answer: The top 10 words are:"
    else:
        intro = "Read the following coded text and track the frequency of each coded word."
        q = ("Question: What are the three most frequently appeared coded words in the above coded "
             "text? Answer: The top 3 words are:")
    text = f"{intro}\n{_render_words(task, words)}\n{q}"
    return Case(task, ({"role": "user", "content": text},), answers,
                len(tokenizer.encode(text, add_special_tokens=False)) + _TEMPLATE_MARGIN)


def _render_words(task: str, words: list[str]) -> str:
    if task == "cwe":
        return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    return " ".join(words)


def _word_list(task: str, rng: random.Random, n_words: int) -> tuple[list[str], tuple[str, ...]]:
    """About n_words words in random order, and the most frequent ones (the answers)."""
    if task == "cwe":
        freq = min(30, max(4, n_words // 30))  # RULER's 30, fewer in short contexts
        vocab = rng.sample(_vocabulary(), 10 + max(n_words - 10 * freq, 3) // 3)
        common, rare = vocab[:10], vocab[10:]
        words = common * freq + rare * 3
        rng.shuffle(words)
        return words, tuple(common)
    vocab = list(dict.fromkeys(_coded_word(rng) for _ in range(max(n_words // 4, 8))))
    total = sum(1 / r**2 for r in range(1, len(vocab) + 1))
    counts = [max(1, round(n_words / (r**2 * total))) for r in range(1, len(vocab) + 1)]
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(words)
    return words, tuple(vocab[:3])
