"""compare: a reference file whose path does not name its subset gets it from its LANGUAGE values,
or the user is asked for --subset; the gap between rows read and pairs compared is explained."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.compare import _gap_text, filter_reference_file, subset_from_languages, subset_of
from laionbuild.errors import SetupError


@pytest.mark.parametrize("languages,subset", [
    (Counter({"en": 10}), "en"),
    (Counter({"de": 5, "fr": 2}), "multi"),
    (Counter({"": 3, "und": 2}), "nolang"),
])
def test_subset_from_language_values(languages, subset):
    assert subset_from_languages("ref.parquet", languages) == subset


def test_mixed_languages_ask_for_subset():
    with pytest.raises(SetupError, match="pass --subset") as exc:
        subset_from_languages("ref.parquet", Counter({"en": 7, "de": 3}))
    assert "en 7" in str(exc.value)


def test_path_wins_and_language_column_defers():
    assert subset_of("x/laion2B-en/part-0.parquet", ["URL", "TEXT", "LANGUAGE"]) == "en"
    assert subset_of("x/sample.parquet", ["URL", "TEXT", "LANGUAGE"]) is None
    assert subset_of("x/sample.parquet", ["URL", "TEXT"], "nolang") == "nolang"
    with pytest.raises(SetupError, match="--subset"):
        subset_of("x/sample.parquet", ["URL", "TEXT"])


def test_a_reference_named_neither_way_with_english_values_is_en(tmp_path):
    import fsspec

    path = tmp_path / "sample.parquet"
    pq.write_table(pa.table({"URL": [f"http://a/{i}.jpg" for i in range(6)], "TEXT": ["t"] * 6,
                             "LANGUAGE": ["en"] * 6}), path, row_group_size=2)
    table, info = filter_reference_file(fsspec.filesystem("file"), str(path), pa.array(["http://a/1.jpg"]),
                                        batch_rows=2)
    assert info["subset"] == "en" and info["rows"] == 6 and info["comparable"] == 1
    assert table.column("ref_subset").to_pylist() == ["en"]


def test_gap_between_rows_read_and_pairs_is_explained():
    text = _gap_text({"rows_read": 10, "comparable_rows": 9},
                     {"reference_duplicate_rows": 1, "comparable_reference_pairs": 8})
    assert "1 not (their URL is not among our candidates)" in text
    assert "1 repeat(s) a (URL, TEXT) pair" in text and "8 comparable pairs" in text
    assert _gap_text({"rows_read": 5, "comparable_rows": 5}, {"reference_duplicate_rows": 0}) == ""


def test_the_name_nearest_the_file_decides_its_subset():
    # a study folder named after en above a multi reference: multi
    assert subset_of("/w/laion2B-en-study/refs/relaion2B-multi-research-safe/part-0.parquet", ["URL"]) == "multi"
    assert subset_of("/w/laion2B-multi-notes/laion2B-en/part-00000.parquet", ["URL"]) == "en"
    assert subset_of("/w/refs/laion1B-nolang-part-3.parquet", ["URL"]) == "nolang"
    with pytest.raises(SetupError, match="names several subsets"):
        subset_of("/w/laion2B-en-vs-laion2B-multi.parquet", ["URL"])


def test_a_file_two_patterns_name_is_read_once(tmp_path):
    from laionbuild.compare import reference_files

    folder = tmp_path / "laion2B-en"
    folder.mkdir()
    pq.write_table(pa.table({"URL": ["u"], "TEXT": ["t"]}), folder / "a.parquet")
    files = reference_files([str(folder), str(folder / "*.parquet"), str(folder / "a.parquet")])
    assert [p for _, p in files] == [str(folder / "a.parquet")]


def test_a_reference_that_cannot_be_listed_is_named():
    from laionbuild.compare import reference_files

    with pytest.raises(SetupError, match=r"cannot read reference foo://x/\*\.parquet"):
        reference_files(["foo://x/*.parquet"])
