"""The shared command-line layer: secret-on-argv refusal, common flags, compilation cache folder,
and progress output that never writes carriage returns into a log."""

import argparse
import io
import sys

import pytest

from ifadit_jax import cli
from ifadit_jax.errors import SecretError
from tests.helpers import run_cli


@pytest.mark.parametrize("argv,refused", [
    (["in", "out", "--secret", "s"], True),
    (["in", "out", "--secret=s"], True),
    (["in", "out", "--secret", "s", "--unsafe-secret-on-command-line"], False),
    (["in", "out", "--secret-file", "f"], False),
    (["in", "out", "--", "--secret"], False),  # a file named --secret, not the flag
])
def test_secret_on_the_command_line(argv, refused):
    if refused:
        with pytest.raises(SecretError, match="command line"):
            cli.refuse_secret_on_command_line(argv)
    else:
        cli.refuse_secret_on_command_line(argv)


def test_secret_on_argv_is_refused_before_jax_is_imported():
    code = ("import sys\nfrom ifadit_jax import anonymize\ntry:\n    anonymize.main(['a', 'b', '--secret', 'x'])\n"
            "except Exception as e:\n    print(type(e).__name__, 'jax' in sys.modules)\n")
    proc = run_cli("-c", code)
    assert proc.stdout.split() == ["SecretError", "False"]


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("IFADIT_JAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.cache_dir() == str(tmp_path / "ifadit-jax" / "jit")
    monkeypatch.setenv("IFADIT_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert cli.cache_dir() == str(tmp_path / "mine")


def test_no_compile_cache_wins_over_the_environment():
    code = ("import argparse, jax\nfrom ifadit_jax import cli\np = argparse.ArgumentParser()\n"
            "cli.add_common_arguments(p)\ncli.setup(p.parse_args(['--no-compile-cache']))\n"
            "print(jax.config.jax_enable_compilation_cache)\n")
    proc = run_cli("-c", code, env={"JAX_COMPILATION_CACHE_DIR": "/nonexistent/cache"})
    assert proc.stdout.split() == ["False"]


def test_common_flags_parse():
    p = argparse.ArgumentParser()
    cli.add_common_arguments(p)
    args = p.parse_args(["--device", "cpu", "--quiet", "--no-compile-cache"])
    assert args.device == "cpu" and args.quiet and not args.verbose and args.no_compile_cache
    with pytest.raises(SystemExit):
        p.parse_args(["--device", "tpu9"])


def test_progress_without_a_terminal_is_plain_lines(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.0)
    assert list(cli.progress(range(3))) == [0, 1, 2]
    assert err.getvalue().splitlines() == ["progress: 0 of 3 images", "progress: 1 of 3 images",
                                           "progress: 2 of 3 images"]
    assert "\r" not in err.getvalue()
    err.truncate(0)
    assert list(cli.progress(range(3), quiet=True)) == [0, 1, 2] and err.getvalue() == ""


def test_device_gpu_without_a_gpu_is_one_line():
    proc = run_cli("-m", "ifadit_jax.demo", "--device", "gpu", "--no-compile-cache", check=False,
                   env={"JAX_PLATFORMS": ""})
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --device gpu: no GPU is available to JAX (install jax[cuda12], or use --device cpu)"]


@pytest.mark.parametrize("command", [
    ("ports/convert_stylegan2.py", "--version"),
    ("ports/convert_lpips.py", "--version"),
    ("ports/convert_ifadit.py", "release", "--version"),
    ("-m", "experiments.run", "all", "--version"),
    ("-m", "ifadit_jax.train", "--version"),
])
def test_converters_training_and_experiments_share_the_common_flags(command):
    proc = run_cli(*command)
    assert proc.stdout.strip().endswith(cli.version())
