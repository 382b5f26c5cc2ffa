"""Caption tokenizer and vocabulary.

``tokenize`` turns free text into a list of string tokens; ``Vocab`` maps tokens to the integer ids
that the text branch embeds (0 = ``<pad>``, 1 = ``<unk>``).
"""

from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

__all__ = ["tokenize", "Vocab"]

# Variation selectors only choose a glyph style ("❤" vs "❤️"); dropping them maps both to one token.
_VARIATION_SELECTORS = frozenset(
    [chr(c) for c in range(0xFE00, 0xFE10)] + [chr(c) for c in range(0xE0100, 0xE01F0)]
)
_CJK_NAME_PREFIXES = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HIRAGANA", "KATAKANA")


def _is_cjk(ch: str, category: str) -> bool:
    # Ideographs and kana are written without spaces, so each one is a token of its own.
    return category in ("Lo", "Lm") and unicodedata.name(ch, "").startswith(_CJK_NAME_PREFIXES)


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lowercase tokens.

    Steps, in order:

    1. Unicode NFKC normalisation, then ``str.casefold`` (then NFKC again, since casefolding can
       produce unnormalised sequences): full-width forms, ligatures and case variants collapse,
       e.g. ``"ＨＥＬＬＯ"`` and ``"Hello"`` both give ``"hello"``.
    2. Whitespace separates tokens.
    3. Punctuation (Unicode categories ``P*``), control and format characters (``C*``, e.g. the
       zero-width joiner) and variation selectors are deleted *without* separating tokens:
       ``"don't"`` -> ``["dont"]``, ``"well-known"`` -> ``["wellknown"]``.
    4. Every CJK ideograph, hiragana and katakana character is a token on its own
       (``"我爱猫"`` -> ``["我", "爱", "猫"]``), since those scripts do not use spaces.
    5. Every symbol (categories ``S*``: emoji, currency, math signs such as ``+`` and ``<``) is a token
       on its own, one per code point (``"hi😀😀"`` -> ``["hi", "😀", "😀"]``; a skin-tone modifier
       is a separate token).
    6. Everything else (letters, digits, combining marks) forms words.

    Empty text, or text made only of punctuation and whitespace, gives ``[]``.
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    tokens: list[str] = []
    word: list[str] = []
    for ch in text:
        if ch.isspace():
            if word:
                tokens.append("".join(word))
                word.clear()
            continue
        category = unicodedata.category(ch)
        if category[0] in "PC" or ch in _VARIATION_SELECTORS:
            continue
        if category[0] == "S" or _is_cjk(ch, category):
            if word:
                tokens.append("".join(word))
                word.clear()
            tokens.append(ch)
        else:
            word.append(ch)
    if word:
        tokens.append("".join(word))
    return tokens


TextOrTokens = Union[str, Sequence[str]]


def _as_tokens(item: Any) -> list[str]:
    if isinstance(item, str):
        return tokenize(item)
    if isinstance(item, (list, tuple)) and all(isinstance(t, str) for t in item):
        return list(item)
    raise TypeError(f"expected a str or a list of str tokens, got {type(item).__name__}")


class Vocab:
    """Token <-> id mapping with two reserved ids: ``PAD`` (``"<pad>"``) = 0 and ``UNK`` (``"<unk>"``) = 1.

    The specials cannot come out of :func:`tokenize` (``<`` and ``>`` are symbol tokens), so they never
    collide with caption words.
    """

    PAD = "<pad>"
    UNK = "<unk>"
    PAD_ID = 0
    UNK_ID = 1
    _FORMAT = "mmfast.vocab"
    _VERSION = 1

    def __init__(self, tokens: Sequence[str]):
        """``tokens``: the id -> token table; must start with ``[PAD, UNK]`` and hold no duplicates."""
        tokens = list(tokens)
        if tokens[:2] != [self.PAD, self.UNK]:
            raise ValueError(f"Vocab tokens must start with {[self.PAD, self.UNK]}, got {tokens[:2]}")
        if not all(isinstance(t, str) for t in tokens):
            raise ValueError("Vocab tokens must all be str")
        self._itos = tokens
        self._stoi = {t: i for i, t in enumerate(tokens)}
        if len(self._stoi) != len(tokens):
            dupes = sorted(t for t, n in Counter(tokens).items() if n > 1)
            raise ValueError(f"Vocab tokens must be unique, duplicated: {dupes[:10]}")

    @classmethod
    def build(
        cls,
        texts: Iterable[TextOrTokens],
        min_freq: int = 1,
        max_size: int | None = None,
    ) -> Vocab:
        """Count tokens over ``texts`` (raw strings are passed through :func:`tokenize`; lists of str are
        taken as already tokenized) and keep those seen at least ``min_freq`` times.

        Tokens are ordered by decreasing frequency; ties keep the order of first appearance in ``texts``,
        so the result is deterministic. ``max_size`` bounds ``len(vocab)`` *including* the two specials.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < 2:
            raise ValueError(f"max_size must be >= 2 (it counts {cls.PAD} and {cls.UNK}), got {max_size}")
        counts: Counter[str] = Counter()
        for item in texts:
            counts.update(_as_tokens(item))
        for special in (cls.PAD, cls.UNK):
            counts.pop(special, None)
        # sorted() is stable and Counter keeps insertion order, hence first-appearance tie-breaking.
        ranked = [t for t, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n >= min_freq]
        if max_size is not None:
            ranked = ranked[: max_size - 2]
        return cls([cls.PAD, cls.UNK, *ranked])

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._itos == other._itos

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"

    @property
    def tokens(self) -> list[str]:
        """The id -> token table (a copy)."""
        return list(self._itos)

    def encode(self, text_or_tokens: TextOrTokens) -> list[int]:
        """Ids of ``text_or_tokens`` (a str is tokenized first); unknown tokens map to ``UNK_ID`` (1)."""
        return [self._stoi.get(t, self.UNK_ID) for t in _as_tokens(text_or_tokens)]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids`` (padding included, as ``"<pad>"``). Raises IndexError for an id out of range."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._itos):
                raise IndexError(f"token id {i} out of range for a vocab of size {len(self._itos)}")
            out.append(self._itos[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"format": "mmfast.vocab", "version": 1, "tokens": [...]}``."""
        return {"format": self._FORMAT, "version": self._VERSION, "tokens": list(self._itos)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocab:
        """Inverse of :meth:`to_dict`; raises ValueError on anything else."""
        if not isinstance(data, Mapping) or data.get("format") != cls._FORMAT:
            raise ValueError(f'expected a JSON object with "format": "{cls._FORMAT}"')
        if data.get("version") != cls._VERSION:
            raise ValueError(f"unsupported vocab version {data.get('version')!r} (expected {cls._VERSION})")
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise ValueError('expected "tokens" to be a list of strings')
        return cls(tokens)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vocab as JSON, atomically: a temporary file in the same folder is renamed over
        ``path``, so a crash never leaves a half-written vocab behind."""
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".vocab-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocab:
        """Read a vocab written by :meth:`save`.

        Raises FileNotFoundError if ``path`` does not exist and ValueError (naming ``path``) if it is
        not valid JSON or not a vocab file.
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"vocab file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid vocab file (expected UTF-8 JSON written by Vocab.save): {e}") from e
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: not a valid vocab file: {e}") from e
