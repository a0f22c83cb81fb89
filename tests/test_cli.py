"""Every `python -m` command: numeric options refused when parsed, defaults in --help, one-line errors, clean
signals and pipes; the output-directory rule every writing command shares."""

import argparse
import importlib
import io
import os
import re
import signal
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from model import cli
from model.io import OutputDirError, atomic_directory, check_output_dir, signals_deferred

# Each command's module: a new command is covered by adding it here.
CLIS = ["train.__main__", "export.__main__", "runtime.__main__", "model.generate", "bench.__main__",
        "bench.kernels.__main__", "bench.train_speed"]


def command(module: str) -> str:
    return module.removesuffix(".__main__")


def parser_of(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


def is_numeric(action: argparse.Action) -> bool:
    return action.type in (int, float) or getattr(action.type, "__name__", "") in ("integer", "number")


def required_args(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the positionals and required options, enough for parsing to succeed."""
    argv = []
    for a in parser._actions:
        if not a.option_strings:
            argv.append(a.choices[0] if a.choices else "x")
        elif a.required:
            argv += [a.option_strings[0], "x"]
    return argv


def options(predicate):
    return [pytest.param(m, a.option_strings[0], id=f"{command(m)} {a.option_strings[0]}")
            for m in CLIS for a in parser_of(m)._actions if a.option_strings and predicate(a)]


def parse(module: str, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            parser_of(module).parse_args(argv)
            return 0, err.getvalue()
        except SystemExit as e:
            return e.code, err.getvalue()


@pytest.mark.parametrize("module,option", options(is_numeric))
def test_numeric_options_refuse_bad_values_when_parsed(module, option):
    parser = parser_of(module)
    action = next(a for a in parser._actions if option in a.option_strings)
    bad = ["-1", "nan", "inf", "-inf", "abc", ""] + (["1.5"] if action.type is not float and
                                                    getattr(action.type, "__name__", "") != "number" else [])
    for value in bad + ["0"]:
        code, err = parse(module, required_args(parser) + [f"{option}={value}"])
        if value == "0" and code == 0:
            assert re.search(r"\b0\b", action.help or ""), f"{option} accepts 0; its help should say so"
            continue
        last = err.strip().splitlines()[-1]
        assert code == 2 and "error:" in last and option in last, (value, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("module,option", options(lambda a: a.nargs != 0 and not a.required))
def test_help_states_every_default(module, option):
    action = next(a for a in parser_of(module)._actions if option in a.option_strings)
    assert "default" in (action.help or ""), f"{command(module)} {option}: say the default in its help"


@pytest.mark.parametrize("module", CLIS)
def test_a_bad_number_on_the_real_command_line_is_one_line(module):
    parser = parser_of(module)
    option = next(a.option_strings[0] for a in parser._actions if a.option_strings and is_numeric(a))
    r = subprocess.run([sys.executable, "-m", command(module), *required_args(parser), option, "nan"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert option in r.stderr.strip().splitlines()[-1] and r.stdout == ""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model import Qwen3NextForCausalLM
    from model.tokenizer import Tokenizer
    from tests.conftest import randomize, small_config
    path = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer.train(["def add(a, b):\n    return a + b\n" * 40], vocab_size=300)
    randomize(Qwen3NextForCausalLM(small_config(vocab_size=300, eos_token_id=tok.eos_id))).save_pretrained(path)
    tok.save(path)
    return path


@pytest.mark.parametrize("what", ["help", "completion"])
def test_output_into_a_closed_pipe_exits_quietly(what, checkpoint):
    argv = ["--help"] if what == "help" else [str(checkpoint), "--max-new-tokens", "200", "--device", "cpu"]
    p = subprocess.Popen([sys.executable, "-m", "model.generate", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()   # the reader is gone before the command writes (`| head` that has had enough)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in ((0, 141) if what == "help" else (141,)) and err == ""


def test_signals_inside_a_deferred_block_arrive_after_it():
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            reached_end = True
    assert reached_end


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
    """A real SIGTERM while an atomic directory is being written: the temporary directory is removed."""
    script = ("import os, signal, sys, time\n"
              "from model import cli\n"
              "from model.io import atomic_directory\n"
              "def main():\n"
              "    with atomic_directory(sys.argv[1]) as tmp:\n"
              "        (tmp / 'part').write_text('x')\n"
              "        print('writing', flush=True)\n"
              "        time.sleep(60)\n"
              "cli.run(main)\n")
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    assert p.stdout.readline() == "writing\n"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 143
    assert p.stderr.read().strip() == "terminated" and list(tmp_path.iterdir()) == []


# ---- check_output_dir --------------------------------------------------------------------------------------


def never(path):
    return False


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    src = tmp_path / "runs" / "ckpt"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path / "home")
    return tmp_path, src


@pytest.mark.parametrize("where,relation",
                         [("runs/ckpt", "is"), ("runs", "contains"), ("runs/ckpt/art", "lies inside")])
def test_out_may_not_touch_an_input(tree, where, relation):
    root, src = tree
    with pytest.raises(OutputDirError, match=f"{relation} the input .* would destroy it"):
        check_output_dir(root / where, what="artifact", ours=never, overwrite=True, sources=[src])


def test_out_in_place_may_hold_an_input_but_not_lie_in_one(tree):
    root, src = tree
    check_output_dir(root / "runs" / "new", what="run", ours=never, sources=[root / "runs" / "new" / "c.txt"],
                     in_place=True)
    with pytest.raises(OutputDirError, match="lies inside the input .* would mix it into it"):
        check_output_dir(src / "run", what="run", ours=never, sources=[src], in_place=True)


def test_out_may_not_be_the_working_or_home_directory(tree):
    root, _ = tree
    (root / "home" / "file").write_text("mine")
    for out in (root / "home", root, Path(".")):
        with pytest.raises(OutputDirError, match="current directory|home directory"):
            check_output_dir(out, what="artifact", ours=lambda p: True, overwrite=True)
    # A command that only adds its own files may write into the working directory, unless told to overwrite.
    check_output_dir(Path("."), what="run", ours=lambda p: True, in_place=True)
    with pytest.raises(OutputDirError, match="current directory"):
        check_output_dir(Path("."), what="run", ours=never, overwrite=True, in_place=True)


def test_only_our_own_or_an_empty_directory_is_replaced_without_overwrite(tree):
    root, _ = tree
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="not an earlier artifact.*--overwrite to replace"):
        check_output_dir(foreign, what="artifact", ours=never)
    with pytest.raises(OutputDirError, match="--overwrite to write into it anyway"):
        check_output_dir(foreign, what="run", ours=never, in_place=True)
    assert check_output_dir(foreign, what="artifact", ours=never, overwrite=True) == foreign
    assert check_output_dir(foreign, what="artifact", ours=lambda p: p == foreign) == foreign
    (root / "empty").mkdir()
    check_output_dir(root / "empty", what="artifact", ours=never)
    (root / "file").write_text("x")
    with pytest.raises(OutputDirError, match="not a directory"):
        check_output_dir(root / "file", what="artifact", ours=never, overwrite=True)
    (root / "link").symlink_to(foreign)
    with pytest.raises(OutputDirError, match="symbolic link"):
        check_output_dir(root / "link", what="artifact", ours=never, overwrite=True)


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "art"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("failed half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["art"] and [p.name for p in out.iterdir()] == ["a"]


# ---- numeric argparse types ---------------------------------------------------------------------------------


def test_range_checked_types():
    assert cli.integer(1)("3") == 3 and cli.real(0, 1, lo_open=True)("1") == 1.0
    for parse, text in ((cli.integer(1), "0"), (cli.integer(0, 5), "6"), (cli.integer(), "2.5"),
                        (cli.real(0), "-0.1"), (cli.real(0, lo_open=True), "0"), (cli.real(), "nan"),
                        (cli.real(), "inf"), (cli.real(0, 1), "1e400")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
