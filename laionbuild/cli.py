"""Command line: ``laionbuild run | extract | remove | report | compare | demo | models``.

Exit status (see :data:`EXIT_CODES`): 0 a clean run; 1 the run finished but some
input files failed (they are listed in ``stats.json``); 2 a bad invocation or a
problem found before any work started (bad config, bad option value, missing or
unreadable input, output folder that cannot be written, unreachable model host,
missing model file), or a run stopped by full storage, a worker that died each
time or a lost cluster head, printed as one line; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .config import load_config
from .errors import (ConfigError, LaionBuildError, SetupError, first_line, os_error_in, own_error_in, storage_full,
                     worker_died)

log = logging.getLogger("laionbuild")

#: exit status of the command line, documented in README.md and --help
EXIT_OK = 0
EXIT_FILES_FAILED = 1
EXIT_BAD_INVOCATION = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_CODES = {
    EXIT_OK: "clean run",
    EXIT_FILES_FAILED: "the run finished but some input files failed or were read only in part",
    EXIT_BAD_INVOCATION: "bad invocation or setup problem, or a run stopped by a full storage, a worker that "
                         "died each time or a lost cluster head (committed work kept), printed as one line",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); rerun the same command to resume",
    EXIT_TERMINATED: "terminated (SIGTERM: kill, timeout, a scheduler); rerun the same command to resume",
}

EPILOG = """\
configuration:
  Every setting lives in a YAML file (see configs/laion5b.yaml for the faithful
  LAION-5B settings, configs/smoke.yaml for the tiny demo). Any value can be
  overridden with --set dotted.key=value, values parsed as YAML scalars, e.g.
    --set clip.thresholds.en=0.3 --set fetch.timeout_s=5 --set ray.fetch_actors=8
  Unknown keys are rejected.

cluster:
  --address (or ray.address) names the Ray cluster to join and wins over
  RAY_ADDRESS; without either, the run joins the cluster 'ray start' runs on
  this machine (inside 'ray job submit', 'ray exec', a KubeRay RayJob), and
  starts a new local Ray (on 127.0.0.1) only when there is none or with --local.

exit status:
  0 clean run, 1 some input files failed or were read only in part (listed in
  OUTPUT/stats.json; the other files were processed),
  2 bad invocation: bad config or option value, missing or unreadable input,
    output folder that cannot be written, unreachable model host or missing
    model file (one line on stderr; nothing was run); a run stopped by full
    storage, a worker that died each time or a lost cluster head (one line;
    the work committed is kept, the same command resumes); an unexpected
    error is one line too (--verbose shows its traceback),
  130 interrupted (Ctrl-C; a second Ctrl-C stops at once),
  143 terminated (SIGTERM: kill, timeout, a scheduler; stops as Ctrl-C does).
"""


def _common(p: argparse.ArgumentParser, *, config_required: bool) -> None:
    p.add_argument("--config", "-c", required=config_required, metavar="FILE",
                   help="YAML config file" + ("" if config_required else " (default: built-in defaults)"))
    p.add_argument("--output", "-o", metavar="DIR", help="output folder or URL (overrides run.output)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value by its dotted path; repeatable")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster address; wins over RAY_ADDRESS (default: RAY_ADDRESS, else the cluster "
                        "'ray start' runs on this machine, else a new local Ray)")
    p.add_argument("--local", action="store_true", help="start a new local Ray even inside a cluster")
    p.add_argument("--limit", type=int, metavar="N", help="process only the first N input files")
    p.add_argument("--shard", metavar="I/N", help="process every N-th input file starting at I")
    p.add_argument("--force", action="store_true",
                   help="resume into an output folder made with a different config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


class _Parser(argparse.ArgumentParser):
    """argparse with a bad option reported as one line (the usage stays on ``--help``)."""

    def error(self, message: str):  # type: ignore[override]
        if message.endswith("expected one argument"):
            message += " (a value that starts with '-' is written --option=VALUE)"
        self.exit(EXIT_BAD_INVOCATION, f"laionbuild: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="laionbuild",
        description="Build LAION-5B style image-text datasets from Common Crawl WARC files: "
                    "candidates -> language -> images -> CLIP filter -> en/multi/nolang parquet.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"laionbuild {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run", help="run the whole pipeline",
        description="Run every stage: extract candidates from WARC files, route them by language, download "
                    "and resize the images, score them with CLIP, and write en/, multi/, nolang/ parquet shards, "
                    "stats.json and config.yaml into the output folder. A rerun with the same config resumes: "
                    "input files already complete are skipped.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    _common(p, config_required=True)
    p.add_argument("--input", "-i", action="append", default=[], metavar="PATH",
                   help="WARC file, glob, folder, URL (http/https/s3) or warc.paths(.gz) listing; repeatable "
                        "(overrides run.inputs)")
    p.add_argument("--offline", action="store_true",
                   help="never download model files; missing ones stop the run (sets models.offline; "
                        "HF_HUB_OFFLINE=1 does the same)")

    p = sub.add_parser(
        "extract", help="only the CPU text stages (no network, no CLIP)",
        description="Extract image URL + alt-text candidates from WARC files and route them by language, "
                    "without downloading anything. Writes OUTPUT/candidates/*.parquet and OUTPUT/stats.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    p.add_argument("inputs", nargs="+", metavar="WARC", help="WARC files, globs, folders, URLs or listings")
    _common(p, config_required=False)

    p = sub.add_parser(
        "remove", help="take listed rows out of a finished output folder, for good",
        description="Rewrite the published shards (and their *_embeddings companions and images) without the rows "
                    "a URL or hash list names, atomically per file, keeping every other row as it was. The lists "
                    "are kept in OUTPUT/removals/ and applied again by any later run into the same folder; "
                    "stats.json and provenance.json record the removal. See docs/safety_lists.md.",
    )
    p.add_argument("output", metavar="OUTPUT", help="output folder of a finished run")
    p.add_argument("--urls", action="append", default=[], metavar="FILE",
                   help="file of image URLs, one per line (# comments, .gz allowed); repeatable")
    p.add_argument("--hashes", action="append", default=[], metavar="FILE",
                   help="file of hashes: LAION's hash column or md5/sha1/sha256 hex of the URL; repeatable")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    p = sub.add_parser("report", help="write a readable report with plots for an output folder",
                       description="Write OUTPUT/report/report.md and PNG plots (funnel, similarity histograms "
                                   "with thresholds, languages, image sizes) from a finished output folder.")
    p.add_argument("output", metavar="OUTPUT", help="output folder of a finished run")
    p.add_argument("--report-dir", metavar="DIR", help="where to write the report (default OUTPUT/report)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    p = sub.add_parser("compare", help="how close is this output to LAION-5B? (reference metadata parquet)",
                       description="Compare an output folder with LAION-5B / Re-LAION-5B metadata, pair by pair: "
                                   "kept by both, dropped by us and why, kept by us only, decision agreement, "
                                   "similarity and hash agreement. Writes OUTPUT/compare/compare.{json,md,html} "
                                   "and plots. See docs/compare.md.")
    p.add_argument("output", metavar="OUTPUT", help="output folder or URL of a run")
    p.add_argument("--reference", "-r", action="append", required=True, metavar="GLOB",
                   help="reference parquet files: glob, folder, file or fsspec URL; repeatable")
    p.add_argument("--subset", choices=("en", "multi", "nolang"),
                   help="subset of every reference file (default: from the path, e.g. laion2B-en)")
    p.add_argument("--report-dir", metavar="DIR", help="where to write the report (default OUTPUT/compare)")
    p.add_argument("--batch-rows", type=int, metavar="N", help="reference rows read at a time (default 65536)")
    p.add_argument("--near-threshold", type=float, metavar="D",
                   help="a pair only we kept counts as a threshold decision when its similarity lies within D "
                        "of the threshold (default 0.01)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    p = sub.add_parser(
        "demo", help="run the embedded demo (sample WARC + loopback image server + tiny CLIP)",
        description="Generate a tiny sample WARC, serve its images from a loopback HTTP server, run the whole "
                    "pipeline on it with configs/smoke.yaml and print the stats.",
    )
    p.add_argument("--output", "-o", default="demo-output", metavar="DIR", help="output folder (default demo-output)")
    p.add_argument("--config", "-c", metavar="FILE", help="config (default: the packaged smoke config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value by its dotted path; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    _models_parser(sub)
    return parser


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="list or download the model files a config needs",
                       description="List the model files a config needs (CLIP towers, tokenizers, fastText, safety "
                                   "models), or download the missing ones into the cache. See docs/models.md.")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    for name, text in (("list", "every model file the config needs, where it is expected, present or missing"),
                       ("pull", "download the missing model files into the cache, verified and recorded")):
        q = msub.add_parser(name, help=text, description=text)
        q.add_argument("--config", "-c", required=True, metavar="FILE", help="YAML config file")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value by its dotted path; repeatable")
        q.add_argument("--cache", metavar="DIR", help="model cache folder or URL (overrides models.cache)")
        q.add_argument("--verbose", "-v", action="store_true", help="debug logging")
        if name == "list":
            q.add_argument("--json", action="store_true", help="print JSON instead of a table")
        else:
            q.add_argument("--no-progress", action="store_true", help="no progress bars")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "PIL", "fsspec", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _check_shard(text: str) -> str:
    parts = text.split("/")
    try:
        i, n = (int(x) for x in parts)
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 0/4), got '{text}'") from None
    if not (n > 0 and 0 <= i < n):
        raise ConfigError(f"--shard I/N needs N >= 1 and 0 <= I < N, got '{text}'")
    return f"{i}/{n}"


def _options(args: argparse.Namespace) -> list[str]:
    """The ``dotted.key=value`` settings made from command-line options other than ``--set``."""
    out: list[str] = []
    output = getattr(args, "output", None)
    if output is not None:
        if not output.strip():
            raise ConfigError("--output is empty: give the output folder or URL")
        out.append(f"run.output={output}")
    if getattr(args, "limit", None) is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit must be at least 1 (the number of input files to process), "
                              f"got {args.limit}")
        out.append(f"run.limit={args.limit}")
    if getattr(args, "shard", None):
        out.append(f"run.shard={_check_shard(args.shard)}")
    if getattr(args, "force", False):
        out.append("run.force=true")
    if getattr(args, "no_progress", False):
        out.append("run.progress=false")
    if getattr(args, "address", None):
        out.append(f"ray.address={args.address}")
    if getattr(args, "local", False):
        out.append("ray.local=true")
    if getattr(args, "offline", False):
        out.append("models.offline=true")
    return out


def _overrides(args: argparse.Namespace) -> list[str]:
    """Every ``dotted.key=value`` setting of the command line: ``--set`` items, then the other options."""
    return [*args.overrides, *_options(args)]


def check_output_folder(output: str) -> None:
    """Refuse, before any work, a local output folder that cannot be created or written.

    URLs (``s3://...``) are left to the filesystem they name.
    """
    if "://" in output:
        _check_remote_output(output)
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise SetupError(f"output {output} exists and is not a folder; give a folder with --output")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK | os.X_OK)
    except OSError as exc:
        raise SetupError(f"cannot create output folder {output}: {_os_reason(exc)}") from None
    finally:
        for created in missing:  # the run creates it again once every other check passed
            try:
                created.rmdir()
            except OSError:
                break
    if not writable:
        raise SetupError(f"cannot write into output folder {output}: permission denied")


def _check_remote_output(output: str) -> None:
    """An object-store output that names an existing object (not a prefix) is refused, as a local
    output that is a file is; any other problem (credentials, endpoint) shows where it occurs."""
    from .output.fs import open_fs

    try:
        fs, root = open_fs(output)
        is_object = fs.isfile(root)
    except Exception:  # noqa: BLE001 - reported by the run's own checks, with their wording
        return
    if is_object:
        raise SetupError(f"output {output} is an existing object, not a folder; give a folder (prefix) with --output")


def _os_reason(exc: OSError) -> str:
    return exc.strerror or (errno.errorcode.get(exc.errno or 0, "") if exc.errno else "") or str(exc)


def _print_stats(result, command: str = "run") -> None:
    log.info("output: %s", result.output)
    label = "candidates per subset" if command == "extract" else "kept pairs"
    for line in result.stats.summary_lines(kept_label=label):
        log.info("%s", line)
    for line in result.stats.alarm_lines():
        log.warning("%s", line)


def _cmd_run(args: argparse.Namespace, command: str) -> int:
    from .runner.run import run

    options = _options(args)
    inputs = args.input if command == "run" else args.inputs
    if inputs:
        import json

        options.append(f"run.inputs={json.dumps(inputs)}")
    cfg = load_config(args.config, args.overrides, options)
    check_output_folder(cfg.run.output)
    result = run(cfg, command=command)  # downloads missing model files first unless offline
    _print_stats(result, command)
    if result.exit_code:
        log.error("%d input file(s) failed and %d were read only in part; see %s/stats.json",
                  len(result.stats.failed_files), len(result.stats.partial_files), result.output)
    return result.exit_code


def _cmd_remove(args: argparse.Namespace) -> int:
    import json

    from .remove import remove

    if not (args.urls or args.hashes):
        raise LaionBuildError("remove: give at least one --urls FILE or --hashes FILE")
    report = remove(args.output, url_files=args.urls, hash_files=args.hashes)
    print(json.dumps(report, indent=1))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    # the output may be local or an fsspec URL (s3://...): write_report checks for stats.json itself
    path = write_report(args.output, args.report_dir)
    log.info("report written to %s", path)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import write_compare

    options = {k: v for k, v in (("batch_rows", args.batch_rows), ("near_threshold", args.near_threshold))
               if v is not None}
    result = write_compare(args.output, args.reference, args.subset, args.report_dir, **options)
    o, ref = result["overall"], result["reference"]
    log.info("reference rows read %d: %d with a URL among our candidates, %d of them repeating a (URL, TEXT) "
             "pair", ref["rows_read"], ref["comparable_rows"], o.get("reference_duplicate_rows", 0))
    log.info("comparable reference pairs %d: kept by both %d, reference only %d, ours only %d, agreement %s",
             o["comparable_reference_pairs"], o["kept_by_both"], o["reference_only"]["pairs"],
             o["ours_only"]["pairs"], o["decision"]["agreement"])
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    check_output_folder(args.output)
    check_output_folder(f"{args.output.rstrip('/')}-sample")  # the sample WARCs are written beside it
    result = run_demo(args.output, config=args.config, overrides=list(args.overrides),
                      progress=not args.no_progress)
    _print_stats(result)
    return result.exit_code


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import cli as models_cli

    options = [f"models.cache={args.cache}"] if args.cache else []
    cfg = load_config(args.config, args.overrides, options)
    if args.models_command == "list":
        return models_cli.list_models(cfg, args.config, as_json=args.json)
    return models_cli.pull_models(cfg, progress=not args.no_progress)


def _stop_at_once(code: int, what: str):
    """The handler of a second signal while the first one's clean stop runs: one line, stop now."""

    def handler(signum, frame) -> None:  # noqa: ARG001 (signal handler signature)
        try:
            sys.stderr.write(f"laionbuild: {what} again; stopping now (rerun the same command to resume)\n")
            sys.stderr.flush()
        finally:
            os._exit(code)

    return handler


_second_interrupt = _stop_at_once(EXIT_INTERRUPTED, "interrupted")
_second_termination = _stop_at_once(EXIT_TERMINATED, "terminated")


def _first_interrupt(signum, frame) -> None:
    """The first Ctrl-C stops the run cleanly (KeyboardInterrupt); the next one stops the process."""
    signal.signal(signal.SIGINT, _second_interrupt)
    raise KeyboardInterrupt


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the run stops as after a first Ctrl-C (what is committed stays)."""


def _first_termination(signum, frame) -> None:  # noqa: ARG001 (signal handler signature)
    """``kill``, ``timeout``, a batch scheduler: stop cleanly; a second SIGTERM stops the process."""
    signal.signal(signal.SIGTERM, _second_termination)
    raise Terminated


def _quiet_closed_pipe() -> int:
    """stdout was closed by the reader (``| head``): stop quietly, without a traceback at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("run", "extract"):
        return _cmd_run(args, args.command)
    if args.command == "remove":
        return _cmd_remove(args)
    if args.command == "report":
        return _cmd_report(args)
    if args.command == "compare":
        return _cmd_compare(args)
    if args.command == "demo":
        return _cmd_demo(args)
    if args.command == "models":
        return _cmd_models(args)
    return EXIT_BAD_INVOCATION


def _check_utf8(argv: list[str]) -> None:
    """Arguments are written into config.yaml, stats.json and paths: bytes that are not UTF-8
    (which Python keeps as lone surrogates) are refused, naming the argument."""
    from .stages.surrogates import has_lone_surrogate

    for i, arg in enumerate(argv):
        if has_lone_surrogate(arg):
            before = f" (after {argv[i - 1]})" if i and argv[i - 1].startswith("-") else ""
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            print(f"laionbuild: error: argument '{shown}'{before} is not valid UTF-8", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INVOCATION) from None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _check_utf8(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    main_thread = threading.current_thread() is threading.main_thread()
    # Ctrl-C: only where Python's own handler is in place (a shell that starts a job in the
    # background makes it ignore SIGINT; an embedding program may have its own)
    in_main_thread = main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if in_main_thread:
        signal.signal(signal.SIGINT, _first_interrupt)
    # SIGTERM: whenever nobody chose another disposition (background jobs, schedulers, nohup)
    on_term = main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if on_term:
        signal.signal(signal.SIGTERM, _first_termination)  # kept after ray.init (runner.connect)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
        return code
    except LaionBuildError as exc:
        # a Ray error standing for a worker's (RayTaskError(ModelMissingError)): its own message
        print(f"laionbuild: error: {first_line(own_error_in(exc) or exc)}", file=sys.stderr)
        return EXIT_BAD_INVOCATION
    except Terminated:
        print("laionbuild: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("laionbuild: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _quiet_closed_pipe()
    except Exception as exc:  # noqa: BLE001 - sorted below
        return _report_error(exc, args)
    finally:
        # after a first Ctrl-C the second-interrupt handler stays until the process ends
        # (Ray's shutdown at exit included)
        if in_main_thread and signal.getsignal(signal.SIGINT) is _first_interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if on_term and signal.getsignal(signal.SIGTERM) is _first_termination:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _report_error(exc: Exception, args: argparse.Namespace) -> int:
    """One line on stderr for an error that stopped the command; its exit status."""
    log.debug("the error that stopped the command", exc_info=exc)  # -v shows where it was raised
    full = storage_full(exc)
    if full and getattr(args, "command", None) in ("run", "extract", "demo"):
        # in the driver or in a worker: nothing more can be committed
        reason, path = full
        print(f"laionbuild: error: the storage takes no more writes ({reason}{': ' + path if path else ''}); "
              "the work committed so far is kept: free space and rerun the same command to resume",
              file=sys.stderr)
        return EXIT_BAD_INVOCATION
    own = own_error_in(exc)
    if own:  # this package's one-line error, raised in a worker
        print(f"laionbuild: error: {first_line(own)}", file=sys.stderr)
        return EXIT_BAD_INVOCATION
    died = worker_died(exc)
    if died and getattr(args, "command", None) in ("run", "extract", "demo"):
        print(f"laionbuild: error: a worker process died each time it ran the same work ({died}; "
              "ray.max_task_retries runs again): a crash, the out-of-memory killer or lost nodes; "
              "the work committed so far is kept: rerun the same command to resume "
              "(-v shows Ray's report)", file=sys.stderr)
        return EXIT_BAD_INVOCATION
    found = os_error_in(exc)
    if found is None and isinstance(exc, OSError):  # one without an errno
        found = (0, _os_reason(exc), str(exc.filename or ""))
    if found:
        # a path that cannot be read or written, found while working (here or in a worker)
        _, reason, path = found
        if not path and getattr(args, "command", None) in ("report", "remove"):
            path = args.output  # an object store's refusal names no key; these commands read one folder
        print(f"laionbuild: error: cannot use{' ' + path if path else ''}: {reason}", file=sys.stderr)
        return EXIT_BAD_INVOCATION
    # the last resort: one line; with --verbose the debug log above showed the traceback
    text = first_line(exc)
    hint = "" if getattr(args, "verbose", False) else " (rerun with --verbose for the traceback)"
    print(f"laionbuild: error: unexpected {type(exc).__name__}{': ' + text if text else ''}{hint}", file=sys.stderr)
    return EXIT_BAD_INVOCATION


def entry() -> None:
    """The ``laionbuild`` command: :func:`main`, then the process ends with its exit code.

    When Ray ran in this process it is shut down here, the output streams and the logs are
    flushed, and the process ends with ``os._exit``: the interpreter's own teardown would stop
    Ray's native threads at random points and can abort the process (exit code 134) after the
    work is done and reported."""
    code = main()
    ray = sys.modules.get("ray")
    if ray is None:
        sys.exit(code)
    try:
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - the work is done; ending the process is all that is left
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a reader that went away
            pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
