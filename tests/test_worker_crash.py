"""An image whose decoder kills the worker's process, or never ends, does not stop the run or
hang it: Ray restarts the fetch worker, which then decodes in child processes, and the images
are rows with ``fetch:decoder_crashed`` and ``fetch:decode_timeout``; every other row is as in a
run without those images.

The crash is a real segfault: a PIL image plugin, loaded into every process of the run by a
``sitecustomize`` module on ``PYTHONPATH``, reads address 0 when it opens an image starting
with ``LBCRASH!``, and loops for ever on one starting with ``LBHANG!!``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laionbuild.demo.crawl import build_crawl
from laionbuild.demo.image_server import LoopbackServer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
import ctypes
import faulthandler

from PIL import Image, ImageFile


class CrashingImage(ImageFile.ImageFile):
    format = "LBCRASH"

    def _open(self):
        faulthandler.disable()
        ctypes.string_at(0)  # SIGSEGV, as a decoder's bug on hostile bytes would


class HangingImage(ImageFile.ImageFile):
    format = "LBHANG"

    def _open(self):
        while True:  # a decoder that never ends, as one looping on hostile bytes would
            pass


Image.register_open(CrashingImage.format, CrashingImage, lambda prefix: prefix[:8] == b"LBCRASH!")
Image.register_open(HangingImage.format, HangingImage, lambda prefix: prefix[:8] == b"LBHANG!!")
'''


def _run(crawl, out: Path, site: Path | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "laionbuild", "run", "--config", str(REPO / "configs" / "smoke.yaml"),
           "--output", str(out), "--no-progress", "--set", "ray.fetch_actors=1", "--set", "ray.num_cpus=2",
           "--set", "fetch.decode_cpu_limit_s=2"]
    for path in crawl.warc_paths:
        cmd += ["--input", path]
    for s in crawl.config_overrides("127.0.0.1"):
        cmd += ["--set", s]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _published(out: Path) -> set[tuple[str, str]]:
    return {(r["URL"], r["TEXT"]) for subset in ("en", "multi", "nolang")
            for f in sorted((out / subset).glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def test_an_image_that_crashes_its_decoder_is_a_row_and_the_run_ends(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PLUGIN)
    with LoopbackServer("127.0.0.1") as server:
        crawl = build_crawl(str(tmp_path / "inputs"), n_files=2, pages_per_file=4, images_per_page=5,
                            image_base=f"http://images.crawl.test:{server.port}")
        crawl.register(server)
        poison_path, hang_path = sorted(crawl.images)[3], sorted(crawl.images)[11]
        server.add(poison_path, b"LBCRASH!" + crawl.images[poison_path], content_type="image/jpeg")
        server.add(hang_path, b"LBHANG!!" + crawl.images[hang_path], content_type="image/jpeg")
        crashed = _run(crawl, tmp_path / "crashed", site)
        assert crashed.returncode == 0, crashed.stderr[-4000:]
        assert server.request_count(poison_path) >= 2  # the first life died on it; the restart asked again
        plain = _run(crawl, tmp_path / "plain", None)  # the same crawl, the same bytes, no crashing plugin
        assert plain.returncode == 0, plain.stderr[-4000:]
    stats = json.loads((tmp_path / "crashed" / "stats.json").read_text())
    drops = stats["stages"]["fetch"]["dropped_by_reason"]
    # the image whose decoder never ends: ended by the first life's CPU watch (the worker ends itself)
    # or, in the restarted worker, by its child's CPU-time limit
    assert drops.get("decoder_crashed") == 1 and drops.get("decode_timeout") == 1, drops
    # without the plugin the same bytes are a decode error (not a JPEG): every other row is the same
    plain_drops = json.loads((tmp_path / "plain" / "stats.json").read_text())["stages"]["fetch"]["dropped_by_reason"]
    assert "decoder_crashed" not in plain_drops and "decode_timeout" not in plain_drops
    assert sum(plain_drops.values()) == sum(drops.values())
    assert _published(tmp_path / "crashed") == _published(tmp_path / "plain")
    assert len(_published(tmp_path / "plain")) > 0
    assert "Traceback" not in crashed.stderr and "Warning:" not in crashed.stderr, crashed.stderr[-3000:]
    # Ray's notices of the death and of the retry are lines of the run's log, not engine detail on stdout
    assert crashed.stdout == "", crashed.stdout[-3000:]


class DiesOnRow3:
    """A stage that kills its process on one row whatever it does: a death no isolation mends."""

    def __call__(self, batch):
        if 3 in list(batch["id"]):
            os._exit(1)
        return batch


def test_work_that_kills_its_worker_every_time_stops_the_run_with_one_line(ray_session, capsys):
    """Ray Data's default runs such work again without end (the run hangs); ``ray.max_task_retries``
    bounds it and the CLI names it in one line."""
    import argparse

    from laionbuild import cli
    from laionbuild.config import Config, RayConfig
    from laionbuild.errors import worker_died
    from laionbuild.runner.adapter import actor_pool, retries

    cfg = Config(ray=RayConfig(max_task_retries=1))
    ds = ray_session.data.range(6, override_num_blocks=6).map_batches(
        DiesOnRow3, batch_size=1, batch_format="numpy", compute=actor_pool(1), **retries(cfg))
    with pytest.raises(Exception) as raised:
        ds.take_all()
    assert worker_died(raised.value)
    assert cli._report_error(raised.value, argparse.Namespace(command="run", verbose=False)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a worker process died each time it ran the same work" in err[0], err
    assert worker_died(RuntimeError("ActorDiedError in a message")) is None  # only Ray's own errors


def test_a_lost_worker_that_ray_could_not_rebuild_is_named():
    """A task whose actor died on a lost node can come back as Ray's ``UnserializableException``
    (the error could not be rebuilt in the driver): its text still names the death."""
    from ray.exceptions import RayTaskError, UnserializableException

    from laionbuild.errors import worker_died

    lost = UnserializableException("Traceback (most recent call last):\n  ...\n"
                                   "ray.exceptions.ActorDiedError: The actor died unexpectedly")
    assert worker_died(lost) == "ActorDiedError"
    assert worker_died(RayTaskError("ListFiles", "tb", lost)) == "ActorDiedError"
    assert worker_died(UnserializableException("Traceback ...\nValueError: bad value")) is None


def _dies_on_row3(folder: str):
    """A stage factory (for :class:`~laionbuild.runner.adapter.StageActor`) whose stage kills its
    process on row 3 whatever it does, and leaves a file in ``folder`` for each death."""
    def factory(cfg):
        def stage(batch):
            if 3 in list(batch["id"]):
                open(os.path.join(folder, f"death-{os.getpid()}"), "w").close()
                os._exit(1)
            return batch
        return stage
    return factory


@pytest.mark.parametrize("limit", [0, 2])
def test_a_stage_that_kills_its_worker_every_time_dies_exactly_max_task_retries_plus_one_times(
        ray_session, capsys, tmp_path, limit):
    """A stage actor's pool runs Ray's retries without end (a lost node must not use them up); the
    actor itself counts the deaths of its process on a live node, and the work stops after the
    first run and ``ray.max_task_retries`` runs again, as Ray's own count did, with the same line."""
    import argparse

    from laionbuild import cli
    from laionbuild.config import Config, RayConfig
    from laionbuild.errors import worker_died
    from laionbuild.runner.adapter import StageActor, actor_pool, stage_retries

    cfg = Config(ray=RayConfig(max_task_retries=limit))
    assert stage_retries(cfg) == {"max_task_retries": -1}
    ds = ray_session.data.range(6, override_num_blocks=6).map_batches(
        StageActor, fn_constructor_args=(_dies_on_row3(str(tmp_path)), cfg), batch_size=1, batch_format="numpy",
        compute=actor_pool(1), **stage_retries(cfg))
    with pytest.raises(Exception) as raised:
        ds.take_all()
    assert len(list(tmp_path.glob("death-*"))) == limit + 1
    assert worker_died(raised.value) == "ActorDiedError"
    assert cli._report_error(raised.value, argparse.Namespace(command="run", verbose=False)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a worker process died each time it ran the same work" in err[0], err


def test_the_actors_own_count_is_named_as_a_worker_death():
    """The count's error, raised in an actor, reaches the driver as a Ray error that carries its
    traceback's text (or as itself): a worker death, never "this package's own error"."""
    from ray.exceptions import RayTaskError, UnserializableException

    from laionbuild.errors import WorkerDiedEachTime, own_error_in, worker_died

    text = ("Traceback (most recent call last):\n  ...\nlaionbuild.errors.WorkerDiedEachTime: the process running "
            "this work died 5 times on nodes that stayed alive (ray.max_task_retries=4)")
    for exc in (WorkerDiedEachTime("died 5 times"), RayTaskError("submit", text, RuntimeError("x")),
                UnserializableException(text)):
        assert worker_died(exc) == "ActorDiedError", exc
        assert own_error_in(exc) is None, exc
