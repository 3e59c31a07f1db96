"""Phase 1, candidates: each input file -> its candidate rows with their language, committed per file.

One actor pool; each actor loads the language model once and, per input file,
extracts the candidates, routes them by language, writes
``candidates/<file_id>.parquet``, its de-dup keys ``candidates/<file_id>.keys`` (20 bytes per
candidate, sorted by key hash: see :mod:`.dedupkeys`) and then its marker. The actor returns one
summary row per file to the driver (no side files, no polling). A file that
failed is not committed and is tried again by the next run; a file that ends
early is committed as ``partial`` (its bytes will not change).

An input whose parsing kills the worker's process (a native parser's crash, the out-of-memory
killer) would kill it again each time Ray restarts the worker and hands it the same input.
A restarted worker therefore extracts each input in a child process
(:mod:`laionbuild.stages.isolate`): an input that kills that child is reported ``failed``
(reason ``crashed``) and the run goes on.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np

from .. import schema as S
from ..config import Config
from ..stages import shards
from ..stats import FileResult, StageCounters
from .adapter import ProcessDeaths, actor_pool, clear_deaths, node_id, stage_retries
from .dedupkeys import encode_keys
from ..output.layout import OutputLayout
from .progress import Progress
from .resources import ClusterShape, candidates_plan, cpu_stage_resources

log = logging.getLogger(__name__)


def extract_with_retries(path: str, cfg: Config):
    """``extract_file`` tried up to ``run.file_retries + 1`` times; never raises."""
    from ..stages.candidates import FileExtraction, extract_file

    attempts = 0
    while True:
        attempts += 1
        try:
            result = extract_file(path, cfg.extract)
        except Exception as exc:  # noqa: BLE001 - extract_file reports bad files itself; last guard
            log.exception("extraction of %s raised", path)
            result = FileExtraction(path, [], StageCounters(),
                                    FileResult(path, "failed", "exception", f"{type(exc).__name__}: {exc}"))
        if result.file.status != "failed" or attempts > cfg.run.file_retries:
            result.file.attempts = attempts
            return result
        time.sleep(min(5.0, 0.5 * attempts))


def extract_isolated(path: str, cfg: Config):
    """:func:`extract_with_retries` in a child process; an input whose extraction kills the
    child is a ``failed`` file (reason ``crashed``), not tried again in this run."""
    from ..stages.candidates import FileExtraction
    from ..stages.isolate import ChildDied, run_alone

    try:
        return run_alone(extract_with_retries, path, cfg)
    except ChildDied as exc:
        log.warning("extraction of %s: its process %s", path, exc)
        return FileExtraction(path, [], StageCounters(),
                              FileResult(path, "failed", "crashed", f"the extraction's process {exc}", 1))


class CandidatesWorker:
    """Actor body: extract + language + commit, one input file at a time."""

    def __init__(self, cfg: Config, output: str):
        from ..models import localize_models
        from ..stages.langid import LanguageRouter

        self.cfg = cfg
        self.layout = OutputLayout(output)
        self.router = LanguageRouter(localize_models(cfg).langid)  # this node's copy of the model cache
        # restarted after its process died on a node still alive: the input it gets again may be
        # what killed it (a lost node's inputs run again without isolation, and are not counted)
        self.deaths = ProcessDeaths(cfg.ray.max_task_retries)
        self.isolated = self.deaths.after_crash
        if self.isolated:
            log.warning("this candidates worker was restarted after its process died: it extracts each "
                        "input in a child process from now on")

    def process(self, path: str, fid: str, ordinal: int) -> dict[str, Any]:
        """``ordinal``: the input's number, which gives its rows' ``SAMPLE_ID``."""
        from ..stages.candidates import candidate_batch
        from ..stages.langid import routing_counters

        result = (extract_isolated if self.isolated else extract_with_retries)(path, self.cfg)
        counters = {"extract": result.counters.to_dict()}
        routed = None
        if result.file.status != "failed":
            batch = candidate_batch(result.rows)
            try:
                batch[S.SAMPLE_ID] = S.sample_ids(ordinal, len(result.rows))
            except ValueError as exc:  # not routed: the input is reported, its rows are not kept
                result.file = FileResult(path, "failed", "too_many_candidates", str(exc), result.file.attempts)
            else:
                routed = self.router(batch)
                counters["langid"] = routing_counters(routed).to_dict()
        marker = {"path": path, "file_id": fid, "ordinal": int(ordinal), "file": result.file.to_dict(),
                  "n_candidates": len(result.rows), "node": node_id(), "token": uuid.uuid4().hex[:12],
                  "counters": counters}
        if routed is not None:
            table = S.batch_to_candidate_table(routed)
            fs = self.layout.fs
            shards.write_bytes_atomic(fs, self.layout.candidates_file(fid),
                                      shards.table_to_bytes(table, self.cfg.output.compression))
            keys, marker["keys"] = encode_keys(table, self.cfg.run.dedup_key)
            shards.write_bytes_atomic(fs, self.layout.candidates_keys(fid), keys)
            shards.write_json_atomic(fs, self.layout.candidates_marker(fid), marker)  # the commit
        return marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        with self.deaths.call():  # an input that killed this worker more than ray.max_task_retries times
            markers = [self.process(str(p), str(f), int(o))
                       for p, f, o in zip(batch["path"], batch["file_id"], batch["ordinal"])]
        return {"file_id": np.array([m["file_id"] for m in markers], dtype=object),
                "marker": np.array([json.dumps(m) for m in markers], dtype=object)}


def number_inputs(layout: OutputLayout, pending: dict[str, str], markers) -> dict[str, int]:
    """The number of each pending input (its rows' ``SAMPLE_ID``): the one a run of this folder gave
    it before (a run killed before the input was committed), else the next free one in
    ``pending``'s order, above every number given so far. New numbers are written down before any
    input is extracted (one run writes an output at a time, see :mod:`..output.lease`)."""
    numbers = layout.input_numbers()
    new = [fid for fid in pending if fid not in numbers]
    if new:
        given = [*numbers.values(), *(int(m["ordinal"]) for m in markers if m.get("ordinal") is not None)]
        first = 1 + max(given, default=-1)
        numbers.update({fid: first + i for i, fid in enumerate(new)})
        layout.write_input_numbers(numbers)
    return {fid: numbers[fid] for fid in pending}


def run_candidates_phase(cfg: Config, layout: OutputLayout, pending: dict[str, str],
                         shape: ClusterShape, numbers: dict[str, int], *, label: str = "phase 1/4 candidates",
                         ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Extract every pending input; returns ``{file_id: marker}`` of the files committed and of those
    that failed (not committed: the next run tries them again). ``label`` names the progress line.
    ``numbers``: each input's number (:func:`number_inputs`), which gives its rows' ``SAMPLE_ID``."""
    import json

    import ray

    actors, cpus = candidates_plan(cfg, shape, len(pending))
    items = [{"path": path, "file_id": fid, "ordinal": numbers[fid]} for fid, path in pending.items()]
    blocks = max(1, min(len(items), cfg.ray.max_blocks))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(CandidatesWorker, fn_constructor_args=(cfg, layout.url), batch_size=1,
                        batch_format="numpy", compute=actor_pool(actors, in_flight=1), num_cpus=cpus,
                        **cpu_stage_resources(cfg, shape), **stage_retries(cfg))
    done: dict[str, dict] = {}
    failed: dict[str, dict] = {}
    progress = Progress(len(items), cfg.run.progress, label, "file")
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for raw in batch["marker"]:
                marker = json.loads(raw)
                progress.update(1, rows=marker["n_candidates"])
                status = marker["file"]
                if status["status"] == "failed":
                    failed[marker["file_id"]] = marker
                    log.warning("input failed: %s: %s %s", marker["path"], status["reason"], status["message"])
                else:
                    done[marker["file_id"]] = marker
    finally:
        progress.close()
        clear_deaths()
    return done, failed
