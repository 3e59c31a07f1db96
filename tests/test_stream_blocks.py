"""Rows a streaming stage yields reach the next stage before the call that yields them ends.

Ray Data gathers a ``map_batches`` call's outputs into blocks of ``target_max_block_size`` and
sends a block on when it is full or the call ends; with the default (128 MiB) a batch's fast
rows waited for its slowest. Here the stage yields most of its rows, then waits until the
driver has some of them (a file the driver writes), then yields the rest: without streaming
blocks the driver gets nothing first and the stage records that it gave up waiting. (Of one
yield, the part left below a block's size goes on with the call's next yield or its end.)"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.ray

#: rows of the one batch; the first three quarters' pixels (29 MB) fill several streaming blocks
ROWS = 256
FIRST = ROWS * 3 // 4
PIXELS = 224 * 224 * 3  # a fetched row's pixels


def test_yielded_rows_reach_the_driver_before_the_call_ends(ray_session, tmp_path):
    from laionbuild.config import load_config
    from laionbuild.runner.adapter import StreamStageActor, actor_pool, streaming_blocks
    from laionbuild.runner.score import stream_block_bytes

    flag = str(tmp_path / "got-first-rows")

    class FirstThenRest:  # defined here: Ray's workers cannot import the tests
        def stream(self, batch):
            n = len(batch["id"])
            yield {"id": batch["id"][:FIRST], "pixels": np.zeros((FIRST, PIXELS), np.uint8),
                   "saw": np.zeros(FIRST, bool)}
            deadline = time.monotonic() + 30
            while not os.path.exists(flag) and time.monotonic() < deadline:
                time.sleep(0.05)
            rest = n - FIRST
            yield {"id": batch["id"][FIRST:], "pixels": np.zeros((rest, PIXELS), np.uint8),
                   "saw": np.full(rest, os.path.exists(flag))}

    with streaming_blocks(stream_block_bytes(load_config(None))):  # the score phase's blocks at 224 px
        ds = ray_session.data.range(ROWS, override_num_blocks=1)
    ds = ds.map_batches(StreamStageActor, fn_constructor_args=(lambda cfg: FirstThenRest(), None, ""), batch_size=ROWS,
                        batch_format="numpy", compute=actor_pool(1, concurrent_calls=2))
    seen = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        seen.append(batch)
        if not os.path.exists(flag):
            open(flag, "w").close()
    ids = sorted(int(i) for b in seen for i in b["id"])
    assert ids == list(range(ROWS))
    rest = [bool(v) for b in seen for i, v in zip(b["id"], b["saw"]) if i >= FIRST]
    assert rest == [True] * (ROWS - FIRST)  # yielded after the driver had rows of the first part
