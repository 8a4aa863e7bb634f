"""The GPU scripts' command lines still fit the code: a device call costs scarce minutes, and a renamed test, flag or
config key would waste one.  Each ``python3`` command in ``scripts/gpu_*.sh`` is checked without running it: the
tests it names exist, a bench's or script's argument parser accepts its arguments, and ``megaprorl.cli train``'s
config and overrides load."""

import argparse
import glob
import importlib
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "gpu_*.sh")))
_CUT = re.compile(r"\s(?:\||\d?>|;|&&|\))")  # where a command ends: a pipe, a redirection, a list, a subshell


def _commands():
    """(script, line, argv after ``python3``) of each python3 command that runs a test, bench, script or CLI.
    ``${VAR:-default}`` reads as its default; a loop's ``"${array[@]}"`` and ``${var:+word}`` are left out."""
    out = []
    for path in SCRIPTS:
        start, joined = 0, ""
        for k, raw in enumerate(open(path).read().splitlines(), 1):
            if not joined:
                start = k
            if raw.endswith("\\"):
                joined += raw[:-1] + " "
                continue
            line, joined = joined + raw, ""
            if line.lstrip().startswith("#"):
                continue
            for m in re.finditer(r"python3 (-m (?:pytest|megaprorl[\w.]*)|scripts/\w+\.py)\b(.*)", line):
                text = m.group(1) + " " + _CUT.split(" " + m.group(2), maxsplit=1)[0]
                text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)
                text = re.sub(r"\"?\$\{\w+(?:\[@\]|:\+[^}]*)\}\"?", "", text).replace("$OUT", "/tmp/gpu_out")
                out.append((os.path.basename(path), start, shlex.split(text)))
    return out


COMMANDS = _commands()


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch, main, argv):
    """Run ``main(argv)`` up to its parse_args: the arguments are accepted, nothing is run."""
    real = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    with pytest.raises(_Parsed):
        main(argv)


def test_the_scripts_hold_commands():
    kinds = {argv[1] if argv[0] == "-m" else "script" for _, _, argv in COMMANDS}
    assert {"pytest", "megaprorl.bench.step", "megaprorl.bench.kernels", "script", "megaprorl.cli"} <= kinds


@pytest.mark.parametrize("script,line,argv", COMMANDS, ids=[f"{s}:{k}" for s, k, _ in COMMANDS])
def test_gpu_script_command_fits_the_code(script, line, argv, monkeypatch):
    if argv[:2] == ["-m", "pytest"]:
        args = iter(argv[2:])
        nodes = [a for a in args if not (a.startswith("-") and (a != "-p" or next(args)))]
        assert nodes, "a pytest command with no test named"
        for node in nodes:
            path, *name = node.split("::")
            assert os.path.isfile(os.path.join(ROOT, path)), f"{script}:{line}: no test file {path}"
            if name:
                func = name[0].split("[")[0]
                text = open(os.path.join(ROOT, path)).read()
                assert re.search(rf"^def {func}\(", text, re.M), f"{script}:{line}: no test {node}"
    elif argv[:2] == ["-m", "megaprorl.cli"]:
        assert argv[2] == "train"
        from megaprorl.config import load_config

        load_config(os.path.join(ROOT, argv[3]), argv[4:])  # unknown keys and bad values raise ConfigError
    elif argv[0] == "-m":
        _parse_only(monkeypatch, importlib.import_module(argv[1]).main, argv[2:])
    else:
        spec = importlib.util.spec_from_file_location("_gpu_script", os.path.join(ROOT, argv[0]))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _parse_only(monkeypatch, mod.main, argv[1:])
