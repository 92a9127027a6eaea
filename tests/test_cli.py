"""Both CLIs share one front door: -h, one-line usage errors, Ctrl-C and missing extras as one line."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


def _invoke(which: str, args: list[str]):
    from click.testing import CliRunner

    module = importlib.import_module(f"dia2_trt.{which}.cli")
    return CliRunner().invoke(module.main, args)


@pytest.mark.parametrize("which", ["runtime", "export"])
@pytest.mark.parametrize("args", [["-h"], ["--help"]])
def test_help_on_both_clis(which, args):
    done = _invoke(which, args)
    assert done.exit_code == 0 and done.stdout.startswith("Usage:") and "-h, --help" in done.stdout


@pytest.mark.parametrize("which,command", [("runtime", "speak"), ("runtime", "bench"), ("export", "build"),
                                           ("export", "reference"), ("export", "validate")])
def test_help_on_subcommands(which, command):
    done = _invoke(which, [command, "-h"])
    assert done.exit_code == 0 and "Usage:" in done.stdout, done.output


@pytest.mark.parametrize("which,args,message", [
    ("runtime", ["speak", "--bogus"], "No such option '--bogus'"),
    ("export", ["build", "--bogus"], "No such option '--bogus'"),
    ("runtime", ["nonsense"], "No such command"),
    ("export", ["nonsense"], "No such command"),
])
def test_usage_errors_are_one_line_with_status_2(which, args, message):
    done = _invoke(which, args)
    lines = done.stderr.strip().splitlines()
    assert done.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_threads_help_tells_the_default():
    done = _invoke("runtime", ["speak", "-h"])
    text = " ".join(done.stdout.split())
    assert "1 for graphs under 64 MB, all cores for larger ones" in text


def test_entry_module_imports_nothing_heavy():
    """Ctrl-C can only be caught once the entry module runs: it must get there before any heavy import."""
    code = ("import sys, dia2_trt.runtime.entry, dia2_trt.export.entry; "
            "print(sorted(m for m in ('numpy', 'click', 'onnxruntime', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("raised,line,code", [
    (KeyboardInterrupt(), "Interrupted.", 130),
    (ModuleNotFoundError("No module named 'torch'", name="torch"),
     "Error: this command needs the [export] extra (no module 'torch'): pip install 'dia2-trt[export]'", 1),
])
def test_interrupt_or_missing_extra_during_imports(monkeypatch, capsys, raised, line, code):
    from dia2_trt.export import entry

    def import_module(name):
        raise raised

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert exit_info.value.code == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_interrupt_inside_a_command_is_one_line(monkeypatch, tmp_path):
    from dia2_trt.runtime import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "read_script", interrupted)
    done = _invoke("runtime", ["speak", "[S1] Hi.", "--artifacts", str(tmp_path), "--out", str(tmp_path / "o.wav")])
    assert done.exit_code == 130 and done.stderr.splitlines() == ["Interrupted."]


def test_bench_without_matplotlib_stops_before_measuring(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    done = _invoke("runtime", ["bench", "--artifacts", str(tmp_path / "missing"), "--out", str(tmp_path / "b")])
    lines = done.stderr.strip().splitlines()
    assert done.exit_code == 1 and lines == ["Error: the plots need matplotlib: pip install 'dia2-trt[bench]', "
                                             "or pass --no-plots"]
    assert not (tmp_path / "b").exists()
