#!/usr/bin/env python
"""Benchmark the fetch + resize stage against img2dataset on the same URLs.

* Generates test images once (textured + noise, so they compress like photos;
  JPEG / PNG / WEBP) into a cache folder, in one of two size profiles
  (``--images``): ``web`` (default), widths and heights drawn from the quantiles
  LAION-5B published for laion2B-en (5 %: 132 x 125 px, median 400 x 350 px,
  95 %: 1050 x 1014 px; width and height drawn from neighbouring quantile ranks,
  so aspect ratios vary as the web's do), or ``large`` (long side 500-2400 px,
  50 KB - 2 MB per file: mean about 1.5 MP, the decode-bound worst case).
* Serves them from a :class:`~laionbuild.demo.image_server.LoopbackServer` on
  127.0.0.1 running in its own process (its CPU is not counted).
* Runs each client in its own subprocess and measures wall time and CPU time
  (user + system, all threads, plus reaped child processes) around the
  download call only: our :class:`~laionbuild.stages.fetch.ImageFetcher`
  (new connection per image, and with keep-alive) and img2dataset's
  ``download()`` (parquet output to a temp dir, ``processes_count=1``).
  img2dataset's fixed start-up cost (spawned pool + logger process imports) is
  measured with a one-URL run and reported separately.
* Latency scenarios (``--scenarios``): ``none`` (answers at once), ``uniform``
  (every image answers after 150-350 ms) and ``slow_tail`` (the same, but 3 %
  of the images answer after 8 s, as the web's slow hosts do); ours streams
  (``ImageFetcher.stream``: every download thread busy over several batches),
  ``ours_per_batch`` (one batch at a time, each waiting for its slowest URL)
  is measured too with ``--per-batch``, and ``ours_actor`` (``--actor``: the
  batches given to one fetcher as a Ray actor pool gives them to a fetch actor,
  ``fetch.batches_in_flight`` calls at once, each ending with its batch's last
  row) with ``--actor``. Each scenario reports its *latency ceiling*: the rate
  of a client that takes the URLs in order, ``--threads`` at a time, each
  costing exactly its delay (no transfer, no CPU), and each client's share of it.
* Measures decode + resize alone on a ~1 MP JPEG, one thread: PIL plain
  decoding versus reduced-size (draft) decoding, OpenCV for reference.
* Measures what a successful row costs to move to the GPU node: resized uint8
  pixels against the same pixels re-encoded (JPEG, PNG, WEBP lossless), with
  the encoding and decoding CPU each needs.

Prints one JSON object. Ratios compare numbers measured in the same run.

    .venv/bin/python scripts/bench_fetch.py --n 3000 --threads 64 --scenarios slow_tail,uniform
    .venv/bin/python scripts/bench_fetch.py --images large      # the decode-bound worst case
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "laionbuild" / "bench_images"
MIN_BYTES, MAX_BYTES = 50_000, 2_000_000
#: laion2B-en's published width / height quantiles at 5 %, 10 %, ..., 95 % (LAION-5B blog, "Dataset Statistics")
LAION_WIDTH_Q = (132, 160, 180, 210, 225, 240, 262, 300, 309, 340, 400, 450, 480, 512, 600, 656, 760, 960, 1050)
LAION_HEIGHT_Q = (125, 150, 166, 188, 208, 225, 250, 270, 300, 320, 350, 380, 418, 470, 500, 600, 672, 800, 1014)
#: the tails below 5 % and above 95 % are drawn between these and the nearest published quantile
LAION_TAILS = ((64, 2048), (64, 2048))
#: correlation of the (normal) ranks of width and height in the web profile
WEB_RANK_CORRELATION = 0.85
PROFILES = ("web", "large")
#: answer delays of the latency scenarios: most images after FAST_S seconds, SLOW_SHARE of them after SLOW_S
FAST_S = (0.15, 0.35)
SLOW_S = 8.0
SLOW_SHARE = 0.03
SCENARIOS = ("none", "uniform", "slow_tail")


# --------------------------------------------------------------------------- images
def _texture(w: int, h: int, rng: np.random.Generator, noise: float):
    from PIL import Image, ImageFilter

    cells = int(rng.integers(8, 48))
    small = rng.integers(0, 256, (max(2, h // cells), max(2, w // cells), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, noise, (h, w, 1)).astype(np.float32)  # luminance grain
    arr += rng.normal(0.0, noise / 3, (h, w, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    return img


def _from_quantiles(u: float, quantiles: tuple, tails: tuple[int, int]) -> int:
    """The value at rank ``u`` (0-1) of a distribution given by its 5 %, ..., 95 % quantiles."""
    ranks = [0.0] + [0.05 * (i + 1) for i in range(len(quantiles))] + [1.0]
    values = [tails[0], *quantiles, tails[1]]
    return int(round(float(np.interp(u, ranks, values))))


def _web_size(rng: np.random.Generator) -> tuple[int, int]:
    """Width and height as laion2B-en's published quantiles: the two ranks are close, not equal."""
    z = rng.normal(0.0, 1.0)
    u = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    z = WEB_RANK_CORRELATION * z + math.sqrt(1.0 - WEB_RANK_CORRELATION ** 2) * rng.normal(0.0, 1.0)
    v = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    return (_from_quantiles(u, LAION_WIDTH_Q, LAION_TAILS[0]), _from_quantiles(v, LAION_HEIGHT_Q, LAION_TAILS[1]))


def _encode(img, kind: str, rng: np.random.Generator) -> bytes:
    """``img`` as a file of ``kind`` (jpg, png, webp), at a quality drawn from ``rng``."""
    buf = io.BytesIO()
    if kind == "jpg":
        img.save(buf, "JPEG", quality=int(rng.integers(80, 93)))
    elif kind == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, "WEBP", quality=int(rng.integers(75, 90)), method=2)
    return buf.getvalue()


def _make_web(index: int, folder: str) -> tuple[str, int]:
    rng = np.random.default_rng(5000 + index)
    kind = rng.choice(["jpg", "jpg", "jpg", "png", "webp"])
    w, h = _web_size(rng)
    data = _encode(_texture(w, h, rng, float(rng.uniform(3, 14))), kind, rng)
    name = f"{index:05d}.{kind}"
    (Path(folder) / name).write_bytes(data)
    return name, len(data)


def _make_one(args) -> tuple[str, int]:
    index, folder, profile = args
    if profile == "web":
        return _make_web(index, folder)
    rng = np.random.default_rng(1000 + index)
    kind = rng.choice(["jpg", "jpg", "jpg", "png", "webp"])
    if kind == "png":
        long_side = int(rng.integers(300, 800))
    else:
        long_side = int(rng.integers(500, 2400))
    ratio = float(rng.uniform(0.55, 1.0))
    w, h = long_side, max(64, int(long_side * ratio))
    if rng.random() < 0.3:
        w, h = h, w  # some portraits
    noise = float(rng.uniform(3, 14))
    data = b""
    for _ in range(4):
        data = _encode(_texture(w, h, rng, noise), kind, rng)
        if len(data) > MAX_BYTES:
            w, h = int(w * 0.7), int(h * 0.7)
        elif len(data) < MIN_BYTES:
            noise *= 1.8
            w, h = int(w * 1.2), int(h * 1.2)
        else:
            break
    name = f"{index:05d}.{kind}"
    (Path(folder) / name).write_bytes(data)
    return name, len(data)


def ensure_images(folder: Path, unique: int, profile: str = "large") -> list[Path]:
    """The ``unique`` generated images of ``profile`` (cached in ``folder/<profile>``, the
    ``large`` ones directly in ``folder`` as before)."""
    if profile != "large":
        folder = folder / profile
    folder.mkdir(parents=True, exist_ok=True)
    have = {p.stem: p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".webp")}
    todo = [(i, str(folder), profile) for i in range(unique) if f"{i:05d}" not in have]
    if todo:
        with mp.get_context("spawn").Pool(max(1, min(2, os.cpu_count() or 1))) as pool:
            for _ in pool.imap_unordered(_make_one, todo, chunksize=8):
                pass
        have = {p.stem: p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".webp")}
    return [have[f"{i:05d}"] for i in range(unique)]


def _megapixels(path: Path) -> float:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[0] * im.size[1] / 1e6


# --------------------------------------------------------------------------- server process
def plan_urls(files: list[Path], n: int, mix: dict[str, float]) -> list[Path]:
    """The file behind each of the ``n`` URLs, in the requested format proportions."""
    groups = {ext: [f for f in files if f.suffix == "." + ext] for ext in mix}
    groups = {ext: g for ext, g in groups.items() if g}
    total = sum(mix[ext] for ext in groups)
    taken = {ext: 0 for ext in groups}
    plan = []
    for i in range(n):
        # pick the format that is furthest behind its share (deterministic interleave)
        ext = max(groups, key=lambda e: mix[e] / total * (i + 1) - taken[e])
        plan.append(groups[ext][taken[ext] % len(groups[ext])])
        taken[ext] += 1
    return plan


def plan_delays(n: int, scenario: str, seed: int = 5) -> list[float]:
    """Seconds each of the ``n`` URLs waits before answering in a latency scenario."""
    if scenario == "none":
        return [0.0] * n
    rng = np.random.default_rng(seed)
    delays = rng.uniform(*FAST_S, n)
    if scenario == "slow_tail":
        delays[rng.permutation(n)[: int(round(SLOW_SHARE * n))]] = SLOW_S
    return [float(d) for d in delays]


def latency_ceiling(delays: list[float], concurrency: int) -> float:
    """Images/s of a client that downloads the URLs in order, ``concurrency`` at a time, each
    taking exactly its answer delay (no transfer, no CPU): no client of that concurrency that
    does not know the delays in advance is faster on this run."""
    import heapq

    if not delays or max(delays) <= 0:
        return float("inf")
    free = [0.0] * max(1, concurrency)
    for d in delays:
        heapq.heappush(free, heapq.heappop(free) + d)
    return len(delays) / max(free)


def _serve(plan: list[str], delays: dict[str, list[float]], ready, stop) -> None:
    """One loopback server; scenario ``s`` serves URL ``i`` at ``/<s>/<i>`` after ``delays[s][i]``."""
    from laionbuild.demo.image_server import LoopbackServer

    types = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
    bodies: dict[str, bytes] = {}
    with LoopbackServer("127.0.0.1") as srv:
        for scenario, delay in delays.items():
            for i, f in enumerate(plan):
                if f not in bodies:
                    bodies[f] = Path(f).read_bytes()
                srv.add(f"/{scenario}/{i:06d}{Path(f).suffix}", bodies[f], content_type=types[Path(f).suffix],
                        delay_s=delay[i])
        ready.put(srv.base_url)
        stop.wait()


# --------------------------------------------------------------------------- clients (subprocesses)
def _cpu() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _actor_calls(fetcher, batches, calls: int):
    """The rows of ``batches`` as a Ray Data actor pool gives them to one fetch actor: ``calls``
    batches at once (``max_concurrent_calls_per_actor``), each a ``stream([batch])`` call in a
    thread of its own; a call ends when its batch's last row is done."""
    import queue
    import threading

    todo: queue.SimpleQueue = queue.SimpleQueue()
    for b in batches:
        todo.put(b)
    out: queue.SimpleQueue = queue.SimpleQueue()

    def call_loop():
        while True:
            try:
                b = todo.get_nowait()
            except queue.Empty:
                out.put(None)
                return
            for part in fetcher.stream([b]):
                out.put(part)

    for _ in range(calls):
        threading.Thread(target=call_loop, daemon=True).start()
    ended = 0
    while ended < calls:
        part = out.get()
        if part is None:
            ended += 1
        else:
            yield part


def worker_ours(urls: list[str], threads: int, keep_alive: bool, keep_bytes: bool, per_batch: bool = False,
                batches_in_flight: int | None = None, actor_calls: int = 0) -> dict:
    from laionbuild import schema as S
    from laionbuild.config import FetchConfig, ResizeConfig
    from laionbuild.stages.fetch import ImageFetcher

    cfg = FetchConfig(
        allow_addresses=("127.0.0.1",),
        threads=threads,
        per_host_concurrency=threads,  # one host serves everything here
        keep_alive=keep_alive,
        retries=0,
        **({"batches_in_flight": batches_in_flight} if batches_in_flight else {}),
    )
    statuses: Counter = Counter()
    fetcher = ImageFetcher(cfg, ResizeConfig(), keep_image_bytes=keep_bytes)

    def batches():
        for start in range(0, len(urls), cfg.batch_size):
            chunk = np.array(urls[start:start + cfg.batch_size], dtype=object)
            yield {S.URL: chunk, S.DROP_REASON: np.full(len(chunk), "", dtype=object)}

    t0, c0 = time.perf_counter(), _cpu()
    if per_batch:
        outputs = (fetcher(b) for b in batches())
    elif actor_calls:
        outputs = _actor_calls(fetcher, batches(), actor_calls)
    else:
        outputs = fetcher.stream(batches())
    for out in outputs:
        statuses.update(out[S.STATUS])
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    fetcher.close()
    return {"wall_s": wall, "cpu_s": cpu, "statuses": dict(statuses)}


def worker_img2dataset(urls: list[str], threads: int) -> dict:
    import logging

    logging.disable(logging.WARNING)
    from img2dataset import download

    with tempfile.TemporaryDirectory() as tmp:
        url_file = Path(tmp) / "urls.txt"
        url_file.write_text("\n".join(urls) + "\n")
        out_dir = Path(tmp) / "out"
        t0, c0 = time.perf_counter(), _cpu()
        with open(os.devnull, "w") as devnull:  # img2dataset prints progress and stats
            saved = os.dup(1), os.dup(2)
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            try:
                download(
                    url_list=str(url_file),
                    output_folder=str(out_dir),
                    output_format="parquet",
                    input_format="txt",
                    image_size=224,
                    resize_mode="center_crop",
                    processes_count=1,
                    thread_count=threads,
                    number_sample_per_shard=max(10, len(urls)),
                    timeout=10,
                    retries=0,
                    extract_exif=False,
                    compute_hash=None,
                    enable_wandb=False,
                    distributor="multiprocessing",
                )
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        statuses: Counter = Counter()
        for stats in out_dir.glob("*_stats.json"):
            data = json.loads(stats.read_text())
            statuses["success"] += data.get("successes", 0)
            statuses["failed"] += data.get("count", 0) - data.get("successes", 0)
    return {"wall_s": wall, "cpu_s": cpu, "statuses": dict(statuses)}


def run_client(kind: str, url_file: Path, threads: int, **flags) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--url-file", str(url_file), "--threads", str(threads)]
    for key, value in flags.items():
        if value is True:
            cmd.append("--" + key.replace("_", "-"))
        elif value:
            cmd += ["--" + key.replace("_", "-"), str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    n = sum(res["statuses"].values())
    res["images"] = res["statuses"].get("success", 0)
    res["rows"] = n
    res["images_per_s"] = res["images"] / res["wall_s"] if res["wall_s"] else 0.0
    res["images_per_cpu_s"] = res["images"] / res["cpu_s"] if res["cpu_s"] else 0.0
    return res


# --------------------------------------------------------------------------- decode + resize
def bench_decode(seconds: float) -> dict:
    from PIL import Image

    from laionbuild.config import FetchConfig, ResizeConfig
    from laionbuild.stages.resize import decode_and_resize

    rng = np.random.default_rng(7)
    img = _texture(1224, 816, rng, 6.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    data = buf.getvalue()
    fc = FetchConfig()
    limits = dict(max_pixels=fc.max_pixels, min_size=fc.min_image_size, formats=fc.formats)

    def rate(fn) -> float:
        fn()
        n, t0 = 0, time.process_time()
        while time.process_time() - t0 < seconds:
            fn()
            n += 1
        return n / (time.process_time() - t0)

    def pil_plain_clip():  # what CLIP's own preprocessing does on a PIL image
        im = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = im.size
        s = 224 / min(w, h)
        im = im.resize((int(w * s) if w > h else 224, 224 if w > h else int(h * s)), Image.BICUBIC)
        left, top = (im.size[0] - 224) // 2, (im.size[1] - 224) // 2
        return np.asarray(im.crop((left, top, left + 224, top + 224)))

    res = {
        "image": {"width": 1224, "height": 816, "bytes": len(data)},
        "pil_plain_clip_per_s": rate(pil_plain_clip),
        "ours_full_decode_per_s": rate(lambda: decode_and_resize(data, ResizeConfig(fast_decode=False), **limits)),
        "ours_draft_per_s": rate(lambda: decode_and_resize(data, ResizeConfig(fast_decode=True), **limits)),
    }
    try:
        import cv2

        cv2.setNumThreads(1)

        def cv2_i2d_like():  # img2dataset's resizer: full decode + INTER_AREA + crop
            a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            h, w = a.shape[:2]
            s = 224 / min(w, h)
            a = cv2.resize(a, (max(224, round(w * s)), max(224, round(h * s))), interpolation=cv2.INTER_AREA)
            top, left = (a.shape[0] - 224) // 2, (a.shape[1] - 224) // 2
            return a[top:top + 224, left:left + 224]

        res["opencv_full_decode_per_s"] = rate(cv2_i2d_like)
    except ImportError:
        res["opencv_full_decode_per_s"] = None
    res["draft_vs_plain"] = res["ours_draft_per_s"] / res["pil_plain_clip_per_s"]
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}


# --------------------------------------------------------------------------- pixels to the GPU node
def bench_transfer(files: list[Path], sample: int, seconds: float) -> dict:
    """Bytes per successful row and CPU per image for each way of moving resized pixels to the
    GPU node: raw uint8 (what the fetch stage sends), or re-encoded on the CPU node and decoded
    on the GPU node's CPUs."""
    import cv2
    from PIL import Image

    from laionbuild.config import FetchConfig, ResizeConfig
    from laionbuild.stages.resize import decode_and_resize

    fc, rc = FetchConfig(), ResizeConfig()
    arrays = []
    for f in files[:sample]:
        arr, _, _ = decode_and_resize(f.read_bytes(), rc, max_pixels=fc.max_pixels, min_size=fc.min_image_size,
                                      formats=fc.formats)
        arrays.append(arr)

    def per_image_ms(fn, items) -> float:
        n, t0 = 0, time.process_time()
        while time.process_time() - t0 < seconds:
            fn(items[n % len(items)])
            n += 1
        return (time.process_time() - t0) / n * 1000

    def enc_jpeg(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=rc.encode_quality)
        return buf.getvalue()

    def enc_png(a):
        return cv2.imencode(".png", a[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()

    def enc_webp_lossless(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "WEBP", lossless=True, method=0)
        return buf.getvalue()

    def dec_cv2(b):
        return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)

    def dec_pil(b):
        return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    cv2.setNumThreads(1)
    res = {"images": len(arrays), "raw_uint8": {"bytes_per_row": int(arrays[0].nbytes), "exact": True,
                                                "encode_ms": 0.0, "decode_ms": 0.0}}
    for name, enc, dec in (("jpeg_q%d" % rc.encode_quality, enc_jpeg, dec_cv2), ("png_level1", enc_png, dec_cv2),
                           ("webp_lossless", enc_webp_lossless, dec_pil)):
        blobs = [enc(a) for a in arrays]
        exact = all(np.array_equal(dec(b)[:, :, ::-1] if dec is dec_cv2 else dec(b), a)
                    for a, b in zip(arrays[:8], blobs[:8]))
        res[name] = {"bytes_per_row": int(np.mean([len(b) for b in blobs])), "exact": bool(exact),
                     "encode_ms": round(per_image_ms(enc, arrays), 3), "decode_ms": round(per_image_ms(dec, blobs), 3)}
    return res


# --------------------------------------------------------------------------- main
def _rates(res: dict) -> None:
    for key in ("wall_s", "cpu_s", "images_per_s", "images_per_cpu_s"):
        res[key] = round(res[key], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="URLs to fetch per client")
    ap.add_argument("--unique", type=int, default=400, help="distinct generated images (URLs cycle over them)")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    ap.add_argument("--images", choices=PROFILES, default="web",
                    help="image sizes: web (laion2B-en's published quantiles) or large (about 1.5 MP)")
    ap.add_argument("--threads", type=int, default=64, help="concurrent downloads per process")
    ap.add_argument("--scenarios", default="slow_tail,uniform", help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--per-batch", action="store_true", help="also measure ours one batch at a time")
    ap.add_argument("--variants", action="store_true",
                    help="in scenario none, also ours without keep-alive and ours encoding image_bytes")
    ap.add_argument("--decode-seconds", type=float, default=3.0)
    ap.add_argument("--transfer-seconds", type=float, default=1.0, help="0 skips the pixels-transfer measurement")
    ap.add_argument("--mix", default="jpg=0.7,png=0.2,webp=0.1", help="share of each format among the URLs")
    ap.add_argument("--skip-img2dataset", action="store_true")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["ours", "img2dataset"])
    ap.add_argument("--url-file")
    ap.add_argument("--keep-alive", action="store_true")
    ap.add_argument("--keep-bytes", action="store_true")
    ap.add_argument("--batches-in-flight", type=int, default=0,
                    help="ours: fetch.batches_in_flight (0: the package default)")
    ap.add_argument("--actor-calls", type=int, default=0,
                    help="ours_actor: batches given to the fetcher at once, each a call of its own, as a Ray "
                         "actor pool does (0: fetch.batches_in_flight); measured with --actor")
    ap.add_argument("--actor", action="store_true",
                    help="also measure ours as the runner's fetch actor gets its rows (see --actor-calls)")
    args = ap.parse_args()

    if args.worker:
        urls = Path(args.url_file).read_text().split()
        if args.worker == "ours":
            res = worker_ours(urls, args.threads, args.keep_alive, args.keep_bytes, args.per_batch,
                              args.batches_in_flight, args.actor_calls)
        else:
            res = worker_img2dataset(urls, args.threads)
        print(json.dumps(res))
        return

    scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    t0 = time.perf_counter()
    files = ensure_images(Path(args.cache_dir), args.unique, args.images)
    gen_s = time.perf_counter() - t0
    mix = {k.strip(): float(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    plan = plan_urls(files, args.n, mix)
    sizes = [f.stat().st_size for f in plan]
    delays = {sc: plan_delays(args.n, sc) for sc in scenarios}

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=([str(f) for f in plan], delays, ready, stop), daemon=True)
    server.start()
    result: dict = {}
    runs: dict[str, dict] = {}
    try:
        base = ready.get(timeout=300)
        with tempfile.TemporaryDirectory() as tmp:
            one_file = Path(tmp) / "one.txt"
            one_file.write_text(f"{base}/{scenarios[0]}/000000{plan[0].suffix}")
            fixed = None
            if not args.skip_img2dataset:
                fixed = run_client("img2dataset", one_file, args.threads)["cpu_s"]
            for sc in scenarios:
                url_file = Path(tmp) / f"{sc}.txt"
                url_file.write_text("\n".join(f"{base}/{sc}/{i:06d}{f.suffix}" for i, f in enumerate(plan)))
                clients = {"ours": run_client("ours", url_file, args.threads, keep_alive=True,
                                              batches_in_flight=args.batches_in_flight)}
                if args.actor:
                    from laionbuild.config import FetchConfig

                    calls = args.actor_calls or args.batches_in_flight or FetchConfig().batches_in_flight
                    clients["ours_actor"] = run_client("ours", url_file, args.threads, keep_alive=True,
                                                       actor_calls=calls)
                if args.per_batch:
                    clients["ours_per_batch"] = run_client("ours", url_file, args.threads, keep_alive=True,
                                                           per_batch=True)
                if args.variants and sc == "none":
                    clients["ours_new_connection_per_image"] = run_client("ours", url_file, args.threads)
                    clients["ours_keep_bytes"] = run_client("ours", url_file, args.threads, keep_alive=True,
                                                            keep_bytes=True)
                if not args.skip_img2dataset:
                    clients["img2dataset"] = run_client("img2dataset", url_file, args.threads)
                for res in clients.values():
                    _rates(res)
                run: dict = {"clients": clients}
                ceiling = latency_ceiling(delays[sc], args.threads)
                if ceiling != float("inf"):
                    run["latency_ceiling_images_per_s"] = round(ceiling, 1)
                    run["share_of_ceiling"] = {name: round(res["images_per_s"] / ceiling, 3)
                                               for name, res in clients.items()}
                if "img2dataset" in clients:
                    i2d, ours = clients["img2dataset"], clients["ours"]
                    run["ratios"] = {
                        "ours_vs_img2dataset_images_per_s": round(ours["images_per_s"] / i2d["images_per_s"], 3),
                        "ours_vs_img2dataset_images_per_cpu_s": round(
                            ours["images_per_cpu_s"] / i2d["images_per_cpu_s"], 3),
                        "ours_vs_img2dataset_without_its_startup_cost": round(
                            ours["images_per_cpu_s"] / (i2d["images"] / max(1e-9, i2d["cpu_s"] - fixed)), 3),
                    }
                    if "ours_per_batch" in clients:
                        run["ratios"]["ours_per_batch_vs_img2dataset_images_per_s"] = round(
                            clients["ours_per_batch"]["images_per_s"] / i2d["images_per_s"], 3)
                runs[sc] = run
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()

    result["setup"] = {
        "n_urls": args.n,
        "images": args.images,
        "unique_images": len(set(plan)),
        "bytes_mean": int(np.mean(sizes)),
        "bytes_min": int(min(sizes)),
        "bytes_max": int(max(sizes)),
        "megapixels_mean": round(float(np.mean([_megapixels(f) for f in set(plan)])), 3),
        "megapixels_median": round(float(np.median([_megapixels(f) for f in set(plan)])), 3),
        "formats": dict(Counter(f.suffix.lstrip(".") for f in plan)),
        "threads": args.threads,
        "latency": {"fast_s": list(FAST_S), "slow_s": SLOW_S, "slow_share": SLOW_SHARE},
        "cpu_count": os.cpu_count(),
        "image_generation_s": round(gen_s, 1),
        "img2dataset_startup_cpu_s": fixed,
    }
    result["scenarios"] = runs
    if args.decode_seconds > 0:
        result["decode_resize_1mp_jpeg_per_core"] = bench_decode(args.decode_seconds)
    if args.transfer_seconds > 0:
        result["pixels_to_gpu_node"] = bench_transfer(files, 64, args.transfer_seconds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
