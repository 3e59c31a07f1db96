"""Where every phase of a run keeps its files inside an output folder (local or any fsspec URL).

::

    OUTPUT/config.yaml, provenance.json      the exact config, models, package versions
    OUTPUT/candidates/<file_id>.parquet      phase 1: candidates + language of one input
    OUTPUT/candidates/_done/<file_id>.json   ... committed: file outcome, counters, node
    OUTPUT/candidates/<file_id>.keys         ... its de-dup keys, sorted by hash (runner/dedupkeys.py)
    OUTPUT/dedup/gNNNN/plan.json             phase 2: the generation's inputs, ranges, groups
    OUTPUT/dedup/gNNNN/winners-rRRRRRR.bin   ... per hash range: the winners' locators
    OUTPUT/dedup/gNNNN/index-rRRRRRR.bin     ... per hash range: every key held so far
    OUTPUT/dedup/gNNNN/_done/rRRRRRR.json    ... committed: one hash range (counts, node)
    OUTPUT/workshards/<shard_id>.parquet     phase 2: unique candidates in work shards
    OUTPUT/workshards/_groups/gNNNN-sGGGGG.json  ... committed: the shards of one group of inputs
    OUTPUT/workshards/_manifest-gNNNN.json   ... committed: one de-dup generation (inputs, counts)
    OUTPUT/scored/<shard_id>/                phase 3: kept rows per subset, fates of every row
    OUTPUT/scored/_done/<shard_id>.json      ... committed: parts, counters, node
    OUTPUT/en|multi|nolang/part-gNNNN-NNNNN.parquet  phase 4: published shards of generation gNNNN
    OUTPUT/_published.json                   ... committed: the files of the published generation
    OUTPUT/removals/                         lists of ``laionbuild remove``, applied at every publish
    OUTPUT/stats.json, _SUCCESS              written last: the run is complete

A unit (input file, de-dup generation, work shard) counts only once its marker
exists; anything else under a phase folder is a leftover of an interrupted run.
Publishing writes the files of a new generation next to the live ones, then the
pointer ``_published.json`` (one object, replaced in one step), then removes the
files of older generations: a reader that goes through :meth:`OutputLayout.published_files`
sees the old generation or the new one, never a mix.
This module has no Ray: ``report``, ``remove`` and ``compare`` use it too.
"""

from __future__ import annotations

import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

from ..errors import SetupError
from ..stages import shards
from .fs import open_fs, precondition_failed, put_if, takes_conditional_writes, url_of

CANDIDATES = "candidates"
#: ``candidates/_numbers.json``: the number each input got when a run first planned it
INPUT_NUMBERS = "_numbers.json"
DEDUP = "dedup"
WORKSHARDS = "workshards"
GROUPS = "_groups"
SCORED = "scored"
DONE = "_done"
REMOVALS = "removals"
#: drop-reason prefix of rows taken out by a recorded removal list
REMOVED = "removed"
#: ``removals/<NNNN>-<urls|hashes>-<name>``: a list recorded by ``laionbuild remove``
STORED_REMOVAL = re.compile(r"^(\d+)-(urls|hashes)-(.+)$")
REMOVAL_KINDS = {"urls": "url", "hashes": "hash"}
_MANIFEST = re.compile(r"^_manifest-g(\d{4})\.json$")
#: a published file of a generation (``part-g0003-00012.parquet``), which only the pointer makes visible
_GENERATION_PART = re.compile(r"^part-g\d{4}-")
#: the pointer to the published generation, written last by publish
PUBLISHED = "_published.json"
#: ``_generations/gNNNN.json``: a generation number taken by a publish (object stores)
GENERATIONS = "_generations"
#: folders a publish writes: ``<subset>``, ``<subset>_embeddings``, ``<subset>_safe``, ``images``
PUBLISHED_SUFFIXES = ("", "_embeddings", "_safe")
IMAGES = "images"


class PublishedMeanwhile(SetupError):
    """Another run published into the folder while this one was publishing."""


class OutputLayout:
    """Paths inside one output folder; every listing is one call per folder, never one per unit."""

    def __init__(self, output: str):
        self.url = output
        self.fs, self.root = open_fs(output)

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def candidates_file(self, fid: str) -> str:
        return self.path(CANDIDATES, f"{fid}.parquet")

    def candidates_marker(self, fid: str) -> str:
        return self.path(CANDIDATES, DONE, f"{fid}.json")

    def candidates_keys(self, fid: str) -> str:
        return self.path(CANDIDATES, f"{fid}.keys")

    def dedup_dir(self, generation: int) -> str:
        return self.path(DEDUP, f"g{generation:04d}")

    def dedup_plan(self, generation: int) -> str:
        return posixpath.join(self.dedup_dir(generation), "plan.json")

    def dedup_winners(self, generation: int, r: int) -> str:
        return posixpath.join(self.dedup_dir(generation), f"winners-r{r:06d}.bin")

    def dedup_index(self, generation: int, r: int) -> str:
        return posixpath.join(self.dedup_dir(generation), f"index-r{r:06d}.bin")

    def dedup_range_marker(self, generation: int, r: int) -> str:
        return posixpath.join(self.dedup_dir(generation), DONE, f"r{r:06d}.json")

    def dedup_range_markers(self, generation: int) -> dict[int, dict]:
        """``{range: marker}`` of the committed hash ranges of one generation (one listing)."""
        found = self.names(posixpath.join(self.dedup_dir(generation), DONE), ".json")
        return {int(stem[1:]): m for stem, m in zip(found, self.read_json_many(found.values()))}

    def group_marker(self, generation: int, group: int) -> str:
        return self.path(WORKSHARDS, GROUPS, f"g{generation:04d}-s{group:05d}.json")

    def group_markers(self) -> dict[str, dict]:
        """``{name: marker}`` of every committed group of work shards, all generations (one listing)."""
        found = self.names(self.path(WORKSHARDS, GROUPS), ".json")
        return dict(zip(found, self.read_json_many(found.values())))

    def committed_shards(self, manifests: list[dict] | None = None) -> dict[str, int]:
        """``{shard_id: rows}`` of the work shards of every committed generation (from the group
        markers; ``manifests``: the generation manifests, when already listed)."""
        generations = {m["generation"] for m in (self.manifests() if manifests is None else manifests)}
        return {s["id"]: s["rows"] for m in self.group_markers().values() if m["generation"] in generations
                for s in m["shards"]}

    def workshard_file(self, shard_id: str) -> str:
        return self.path(WORKSHARDS, f"{shard_id}.parquet")

    def manifest(self, generation: int) -> str:
        return self.path(WORKSHARDS, f"_manifest-g{generation:04d}.json")

    def scored_dir(self, shard_id: str) -> str:
        return self.path(SCORED, shard_id)

    def scored_marker(self, shard_id: str) -> str:
        return self.path(SCORED, DONE, f"{shard_id}.json")

    def subset_dir(self, subset: str, suffix: str = "") -> str:
        return self.path(subset + suffix)

    # ------------------------------------------------------------------ listing
    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def ls(self, path: str) -> list[str]:
        try:
            return sorted(p if isinstance(p, str) else p["name"] for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def names(self, folder: str, suffix: str) -> dict[str, str]:
        """``{stem: path}`` of the files in ``folder`` ending with ``suffix`` (one listing call)."""
        out = {}
        for p in self.ls(folder):
            name = posixpath.basename(p.rstrip("/"))
            if name.endswith(suffix) and ".tmp-" not in name:
                out[name[: -len(suffix)]] = p
        return out

    def read_json_many(self, paths: Iterable[str], threads: int = 16) -> list[Any]:
        """Read many small JSON files concurrently (object stores answer each in tens of ms)."""
        return list(self.iter_json_many(paths, threads))

    def iter_json_many(self, paths: Iterable[str], threads: int = 16) -> Iterator[Any]:
        """:meth:`read_json_many`, handed over one at a time in the order of ``paths``, so that a
        caller keeping a little of each never holds them all."""
        paths = list(paths)
        if len(paths) <= 1:
            yield from (shards.read_json(self.fs, p) for p in paths)
            return
        with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
            yield from pool.map(lambda p: shards.read_json(self.fs, p), paths)

    def rm(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def rm_many(self, paths: Iterable[str]) -> None:
        paths = [p for p in paths]
        if paths:
            self.fs.rm(paths, recursive=True)

    # ------------------------------------------------------------------ committed units
    def candidate_markers(self) -> dict[str, dict]:
        """``{file_id: marker}`` of every committed input."""
        found = self.names(self.path(CANDIDATES, DONE), ".json")
        return dict(zip(found, self.read_json_many(found.values())))

    def input_numbers(self) -> dict[str, int]:
        """``{file_id: number}`` of every input a run of this folder numbered (``SAMPLE_ID``), committed
        or not yet: an input keeps its number through kills and reruns."""
        path = self.path(CANDIDATES, INPUT_NUMBERS)
        if not self.fs.exists(path):
            return {}
        return {fid: int(n) for fid, n in shards.read_json(self.fs, path).items()}

    def write_input_numbers(self, numbers: dict[str, int]) -> None:
        shards.write_json_atomic(self.fs, self.path(CANDIDATES, INPUT_NUMBERS), numbers)

    def candidate_files(self) -> list[str]:
        """The committed candidate tables (one per input)."""
        return [self.candidates_file(fid) for fid in sorted(self.names(self.path(CANDIDATES, DONE), ".json"))]

    def manifests(self) -> list[dict]:
        """Every committed de-dup generation, oldest first."""
        paths = []
        for p in self.ls(self.path(WORKSHARDS)):
            if _MANIFEST.match(posixpath.basename(p)):
                paths.append(p)
        return self.read_json_many(sorted(paths))

    def scored_markers(self) -> dict[str, dict]:
        found = self.names(self.path(SCORED, DONE), ".json")
        return dict(zip(found, self.read_json_many(found.values())))

    def iter_scored_markers(self) -> Iterator[dict]:
        """The marker of every committed work shard, in shard order (:meth:`iter_json_many`)."""
        return self.iter_json_many(self.names(self.path(SCORED, DONE), ".json").values())

    def fate_files(self) -> list[str]:
        """The per-row fate tables of every committed work shard (found under this folder even when it
        was copied or moved since: the markers name the files, the layout says where they are)."""
        return sorted(self.path(SCORED, sid, posixpath.basename(p)) for sid, m in self.scored_markers().items()
                      for p in m["parts"] if posixpath.basename(p).startswith("fates-"))

    def published(self) -> dict | None:
        """The pointer of the published generation (None before the first publish)."""
        path = self.path(PUBLISHED)
        try:
            return shards.read_json(self.fs, path)
        except FileNotFoundError:
            return None

    def published_files(self, subset: str, suffix: str = "", pointer: dict | None = None) -> list[str]:
        """The files of ``<subset><suffix>/`` (or ``images/``) in the published generation.

        A folder published before publish kept a pointer holds no ``_published.json``: its
        files are listed instead, except those of a generation (a first publish cut short).
        """
        pointer = self.published() if pointer is None else pointer
        folder = subset + suffix
        if pointer is None:
            ext = ".tar" if folder == IMAGES else ".parquet"
            return [p for p in self.ls(self.subset_dir(folder)) if p.endswith(ext) and ".tmp-" not in p
                    and not _GENERATION_PART.match(posixpath.basename(p))]
        return [self.path(rel) for rel in pointer.get("files", {}).get(folder, [])]

    def next_generation(self, pointer: dict | None) -> int:
        return int(pointer["generation"]) + 1 if pointer else 1

    def published_tag(self) -> str | None:
        """The ETag of the pointer (object stores; None when there is none, or elsewhere). Read
        before the pointer itself: a commit conditioned on it fails if the pointer changed since."""
        if not takes_conditional_writes(self.fs):
            return None
        try:
            return self.fs.info(self.path(PUBLISHED))["ETag"]
        except FileNotFoundError:
            return None

    def reserve_generation(self, pointer: dict | None) -> int:
        """A generation number that no other publish into this folder writes files under.

        On an object store each number is taken with a conditional create of
        ``_generations/gNNNN.json``: two runs that saw the same pointer (one paused past its
        lease, the other took the lease over) never write the same file names. Elsewhere the
        folder's OS lock keeps it to one run, and the number follows the pointer's."""
        generation = self.next_generation(pointer)
        if not takes_conditional_writes(self.fs):
            return generation
        while True:
            try:
                put_if(self.fs, self.path(GENERATIONS, f"g{generation:04d}.json"), b"{}", IfNoneMatch="*")
                return generation
            except Exception as exc:  # noqa: BLE001 - only a failed precondition means "taken"
                if not precondition_failed(exc):
                    raise
                generation += 1

    def published_name(self, generation: int, index: int, ext: str = ".parquet") -> str:
        return f"part-g{generation:04d}-{index:05d}{ext}"

    @staticmethod
    def under_generation(path: str, generation: int) -> str:
        """``path`` of a published file named for ``generation`` instead (``part-g0002-00005.parquet``
        -> ``part-g0003-00005.parquet``; a name of no generation gets the prefix)."""
        folder, name = posixpath.split(path)
        return posixpath.join(folder, f"part-g{generation:04d}-" + _GENERATION_PART.sub("", name))

    def commit_published(self, generation: int, files: dict[str, list[str]], counts: dict,
                         expect_tag: str | None = None, stats: bytes | None = None) -> dict:
        """Point readers at ``generation`` (one object written last), then remove every other file
        of the published folders; returns the pointer. ``stats``: the publishing run's stats as
        they are now, kept for ``generation`` before the pointer names it (:meth:`generation_stats_path`),
        so that a kill after the pointer still leaves stats for what readers see.

        On an object store the pointer is written only if it is still the one this publish
        started from (``expect_tag``, :meth:`published_tag`; none: there was none): when another
        run published meanwhile, nothing is changed and :class:`PublishedMeanwhile` is raised."""
        pointer = {"generation": generation,
                   "files": {folder: sorted(posixpath.relpath(p, self.root) for p in paths)
                             for folder, paths in sorted(files.items())},
                   "counts": counts}
        if stats is not None:
            shards.write_bytes_atomic(self.fs, self.generation_stats_path(generation), stats)
        if takes_conditional_writes(self.fs):
            try:
                put_if(self.fs, self.path(PUBLISHED), shards.json_bytes(pointer),
                       **({"IfMatch": expect_tag} if expect_tag else {"IfNoneMatch": "*"}))
            except Exception as exc:  # noqa: BLE001 - only a failed precondition means "changed"
                if not precondition_failed(exc):
                    raise
                raise PublishedMeanwhile(f"{self.url}: another run published into this folder while this one "
                                         "was publishing; this run's generation is not published") from None
        else:
            shards.write_json_atomic(self.fs, self.path(PUBLISHED), pointer)
        self.clean_published(pointer)
        return pointer

    def generation_stats_path(self, generation: int) -> str:
        """``_generations/gNNNN-stats.json``: the stats of the run (or removal) that published
        ``generation``. ``stats.json`` describes the folder's last run and is gone while a new run
        works in it; this copy goes with the published rows until a newer generation replaces them."""
        return self.path(GENERATIONS, f"g{int(generation):04d}-stats.json")

    def write_generation_stats(self, data: bytes) -> None:
        """Keep ``data`` (the ``stats.json`` just written) beside the published generation."""
        pointer = self.published()
        if pointer is not None:
            shards.write_bytes_atomic(self.fs, self.generation_stats_path(pointer["generation"]), data)

    def clean_published(self, pointer: dict) -> None:
        """Remove the files of the published folders that ``pointer`` does not list (older
        generations, a publish that was interrupted), one listing per folder."""
        from ..schema import SUBSETS

        keep = {self.path(rel) for paths in pointer["files"].values() for rel in paths}
        folders = [s + suffix for s in SUBSETS for suffix in PUBLISHED_SUFFIXES] + [IMAGES]
        stale = [p for f in folders for p in self.ls(self.path(f)) if p not in keep]
        taken = self.names(self.path(GENERATIONS), ".json")  # reservations, and stats of older generations
        stale += [p for name, p in taken.items() if name < f"g{int(pointer['generation']):04d}"]
        self.rm_many(stale)

    def removal_lists(self, into=None, name_prefix: str = ""):
        """Every list recorded by ``laionbuild remove`` in ``removals/``, in the order applied:
        a block list of prefix ``removed``, or the lists added to the block list ``into``, each
        named ``name_prefix + <stored name>``."""
        from ..stages.blocklist import Blocklist

        lists = Blocklist(REMOVED) if into is None else into
        for path in self.ls(self.path(REMOVALS)):
            name = posixpath.basename(path)
            m = STORED_REMOVAL.match(name)
            if not m or ".tmp-" in name:
                continue
            with self.fs.open(path, "rb") as fh:
                lists.add_bytes(fh.read(), REMOVAL_KINDS[m.group(2)], name_prefix + name, path)
        return lists

    def url_of(self, path: str) -> str:
        """A path of this folder as a URL that another process (a Ray worker) can open."""
        return url_of(self.fs, path)
