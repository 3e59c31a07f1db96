"""Every bad invocation ends with one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from laionbuild.cli import EXIT_BAD_INVOCATION, EXIT_CODES, EXIT_INTERRUPTED, EXIT_TERMINATED, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
    """A folder with the kinds of files a user gets wrong."""
    (tmp_path / "regular").write_text("not a folder\n")
    (tmp_path / "bad.yaml").write_text("run:\n  name: x\n limit: 3\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "empty.warc.gz").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "stats.json").write_text('{"stages": ')
    (tmp_path / "listy").mkdir()
    (tmp_path / "listy" / "stats.json").write_text("[1, 2]")
    (tmp_path / "urls.txt").write_text("http://x.test/a.jpg\n")
    for name, config in (("badyaml", "clip: [unclosed\n"), ("listcfg", "- a\n"), ("strthr", "clip:\n  thresholds:\n    en: high\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stats.json").write_text("{}")
        (tmp_path / name / "config.yaml").write_text(config)
    return tmp_path


def _cases():
    # (name, argv with {t} = the files folder, words the one line must contain, words it must not)
    warc = "{t}/empty.warc.gz"
    return [
        ("output under /proc", ["extract", warc, "-o", "/proc/laionbuild-x"], ["/proc/laionbuild-x"], []),
        ("output is a regular file", ["extract", warc, "-o", "{t}/regular"], ["{t}/regular", "not a folder"], []),
        ("output under a regular file", ["extract", warc, "-o", "{t}/regular/sub"], ["{t}/regular/sub"], []),
        ("limit 0", ["extract", warc, "--limit", "0"], ["--limit", "0"], ["with --set"]),
        ("limit negative", ["extract", warc, "--limit", "-2"], ["--limit", "-2"], ["with --set"]),
        ("shard out of range", ["extract", warc, "--shard", "3/2"], ["--shard", "3/2"], ["with --set", "run.shard"]),
        ("shard not i/n", ["extract", warc, "--shard", "half"], ["--shard", "half"], ["with --set"]),
        ("shard zero parts", ["extract", warc, "--shard", "0/0"], ["--shard", "0/0"], []),
        ("yaml syntax error", ["extract", warc, "-c", "{t}/bad.yaml"], ["{t}/bad.yaml", "line 3"], []),
        ("yaml not a mapping", ["extract", warc, "-c", "{t}/list.yaml"], ["{t}/list.yaml", "mapping"], []),
        ("config is a folder", ["extract", warc, "-c", "{t}/folder"], ["{t}/folder", "folder"], []),
        ("config missing", ["extract", warc, "-c", "{t}/none.yaml"], ["{t}/none.yaml", "not found"], []),
        ("bad value without --set", ["extract", warc, "-c", "{t}/neg.yaml"], ["run.limit"], ["with --set"]),
        ("bad value with --set", ["extract", warc, "--set", "run.limit=-1"], ["run.limit", "with --set"], []),
        ("missing input", ["extract", "{t}/none.warc.gz", "-o", "{t}/o"], ["{t}/none.warc.gz"], []),
        ("empty output", ["extract", warc, "-o", ""], ["--output", "empty"], []),
        ("empty run.output", ["extract", warc, "--set", "run.output="], ["run.output", "empty"], []),
        ("remove without lists", ["remove", "{t}/folder"], ["--urls"], []),
        ("report of a non-output", ["report", "{t}/folder"], ["{t}/folder"], []),
        ("report of a cut stats.json", ["report", "{t}/corrupt"], ["{t}/corrupt/stats.json", "not valid JSON"], []),
        ("report of a damaged config.yaml", ["report", "{t}/badyaml"], ["{t}/badyaml/config.yaml", "not valid YAML"],
         ["unexpected"]),
        ("report of a config.yaml list", ["report", "{t}/listcfg"], ["{t}/listcfg/config.yaml", "not a config"], []),
        ("report of a threshold word", ["report", "{t}/strthr"], ["{t}/strthr/config.yaml", "clip.thresholds.en"], []),
        ("report of a stats.json list", ["report", "{t}/listy"], ["{t}/listy/stats.json", "list"], []),
        ("remove from a cut stats.json", ["remove", "{t}/corrupt", "--urls", "{t}/urls.txt"],
         ["{t}/corrupt/stats.json", "not valid JSON"], []),
        ("models with a bad config", ["models", "list", "-c", "{t}/bad.yaml"], ["line 3"], []),
        ("demo output is a regular file", ["demo", "-o", "{t}/regular"], ["{t}/regular", "not a folder"], []),
        ("demo output under /proc", ["demo", "-o", "/proc/laionbuild-x"], ["/proc/laionbuild-x"], []),
        ("demo with an unknown key", ["demo", "-o", "{t}/o", "--set", "foo=1"], ["unknown key 'foo'"], []),
    ]


@pytest.mark.parametrize("name,argv,must,must_not", _cases(), ids=[c[0] for c in _cases()])
def test_bad_invocation_is_one_line_and_exit_2(files, capsys, name, argv, must, must_not):
    (files / "neg.yaml").write_text("run:\n  limit: -4\n")
    t = str(files)
    code = main([a.format(t=t) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line]
    assert code == EXIT_BAD_INVOCATION, err
    assert len(lines) == 1, err
    assert lines[0].startswith("laionbuild: error: ")
    for word in must:
        assert word.format(t=t) in lines[0], lines[0]
    for word in must_not:
        assert word not in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (files / "o").exists() and not (files / "o-sample").exists()
    assert (files / "regular").read_text() == "not a folder\n"  # nothing in the way is deleted


@pytest.mark.parametrize(
    "argv, words",
    [
        (["extract", "x.warc.gz", "--limit", "abc"], ["--limit", "'abc'", "laionbuild extract --help"]),
        (["run"], ["--config", "laionbuild run --help"]),
        (["extract", "x.warc.gz", "--shard", "-1/2"], ["--shard", "--option=VALUE"]),
        (["frobnicate"], ["frobnicate", "laionbuild --help"]),
        (["extract", "x.warc.gz", "--set", "run.name=\udcff"], ["'run.name=\\xff' (after --set)", "UTF-8"]),
        (["extract", "x.warc.gz", "-o", "out/\udcffdir"], ["'out/\\xffdir' (after -o)", "UTF-8"]),
    ],
)
def test_option_errors_are_one_line_without_the_usage(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_BAD_INVOCATION
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("laionbuild: error: "), err
    for word in words:
        assert word in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_refused_output_leaves_no_folder_behind(files, capsys):
    code = main(["extract", str(files / "none.warc.gz"), "-o", str(files / "new" / "deeper")])
    assert code == EXIT_BAD_INVOCATION
    assert not (files / "new").exists()


def test_every_exit_code_is_documented():
    readme = (REPO / "README.md").read_text()
    from laionbuild.cli import EPILOG

    for code in EXIT_CODES:
        assert f"`{code}`" in readme
        assert f"{code} " in EPILOG


def test_models_list_under_a_closed_pipe_is_quiet():
    """``laionbuild models list | head -1``: the reader goes away, no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "laionbuild", "models", "list", "-c", "configs/laion5b.yaml"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err


def _ctrl_c_reaches_python() -> None:
    """In the child: SIGINT back to its default, so that Python turns it into KeyboardInterrupt even
    when the test run itself ignores it (a job started in the background of a shell, as CI may be)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_second_ctrl_c_stops_with_one_line(tmp_path):
    """The first Ctrl-C starts a clean stop; a second one during that stop ends the process with one line."""
    script = tmp_path / "slow_stop.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import laionbuild.cli as cli

        def slow(args):
            try:
                print("ready", flush=True)
                time.sleep(60)
            finally:  # a clean-up that takes long (as Ray's shutdown can)
                print("stopping", flush=True)
                time.sleep(60)
            return 0

        cli._dispatch = slow
        sys.exit(cli.main(["report", "x"]))
    """))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_reaches_python)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "stopping"
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert code == EXIT_INTERRUPTED
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "laionbuild: interrupted again; stopping now (rerun the same command to resume)"]


def test_first_ctrl_c_is_a_clean_stop(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import laionbuild.cli as cli

        def slow(args):
            print("ready", flush=True)
            time.sleep(60)
            return 0

        cli._dispatch = slow
        sys.exit(cli.main(["report", "x"]))
    """))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_reaches_python)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == EXIT_INTERRUPTED
    err = proc.stderr.read()
    assert "Traceback" not in err and "resume" in err


@pytest.mark.ray
def test_sigterm_after_ray_started_is_a_clean_stop(tmp_path):
    """kill / timeout / a scheduler send SIGTERM: one line and 143, also once ray.init installed its
    native handler (which printed a stack dump and ended the process with status 15)."""
    script = tmp_path / "term.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import laionbuild.cli as cli
        from laionbuild.runner.connect import connect

        def slow(args):
            connect(local=True, num_cpus=1)
            print("ready", flush=True)
            time.sleep(120)
            return 0

        cli._dispatch = slow
        code = cli.main(["report", "x"])
        import ray
        ray.shutdown()
        sys.exit(code)
    """))
    # started as a shell starts a background job: SIGINT ignored (the SIGTERM handling must not
    # depend on it)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert code == EXIT_TERMINATED, err
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("laionbuild:")] == [
        "laionbuild: terminated (SIGTERM); rerun the same command to resume"]


def test_an_unexpected_error_is_one_line_and_verbose_shows_it(monkeypatch, capsys, caplog):
    import laionbuild.cli as cli

    def broken(args):
        raise ValueError("a value nobody expected\nsecond line")

    monkeypatch.setattr(cli, "_dispatch", broken)
    assert cli.main(["report", "x"]) == EXIT_BAD_INVOCATION
    err = capsys.readouterr().err
    assert err.strip() == ("laionbuild: error: unexpected ValueError: a value nobody expected "
                           "(rerun with --verbose for the traceback)")
    # --verbose: the same status and line, the traceback in the debug log before it
    caplog.set_level(logging.DEBUG)
    assert cli.main(["report", "x", "--verbose"]) == EXIT_BAD_INVOCATION
    err = capsys.readouterr().err
    assert err.strip() == "laionbuild: error: unexpected ValueError: a value nobody expected"
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [ValueError]


class _Ended(Exception):
    def __init__(self, code):
        self.code = code


def test_the_command_ends_its_process_itself_once_ray_ran_in_it(monkeypatch):
    """After a command that used Ray, the process ends with the command's exit status through
    ``os._exit`` (the interpreter's teardown of Ray's threads can abort it), Ray shut down first;
    without Ray the usual ``sys.exit``."""
    import types

    import laionbuild.cli as cli

    calls = []
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, shutdown=lambda: calls.append("shutdown"))

    def ended(code):
        raise _Ended(code)

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", ended)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    with pytest.raises(_Ended) as info:
        cli.entry()
    assert info.value.code == 3 and calls == ["shutdown"]
    monkeypatch.delitem(sys.modules, "ray")
    with pytest.raises(SystemExit) as plain:
        cli.entry()
    assert plain.value.code == 3


def test_a_local_ray_that_does_not_start_is_one_line(monkeypatch):
    import ray

    from laionbuild.errors import SetupError
    from laionbuild.runner.connect import connect

    def init(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of\n"
                        "the Ray processes failed to startup.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(SetupError) as raised:
        connect(local=True, num_cpus=1)
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith("a local Ray instance did not start (Exception: The current node timed out during startup.")
    assert "rerun the same command" in text


def test_version_is_printed_and_exit_0(capsys):
    from laionbuild import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"laionbuild {__version__}"
