"""The command line end to end on tiny models: --json contract, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import TEXT

from leanlm.checkpoint import save_checkpoint
from leanlm.cli import main
from leanlm.config import preset
from leanlm.model import Transformer


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_tokenizer):
    model = Transformer(preset("tiny", vocab_size=300, eos_token_id=tiny_tokenizer.eos_id)).init_weights(seed=0)
    return save_checkpoint(model, tiny_tokenizer, tmp_path / "ck")


def run_json(capsys, argv: list[str]) -> tuple[int, dict]:
    rc = main([*argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(out[-1])


def test_generate_json_batch(capsys, tiny_ckpt):
    rc, res = run_json(
        capsys,
        ["generate", "-m", str(tiny_ckpt), "-p", "def add", "-p", "The quick brown fox", "-n", "5", "--ignore-eos"],
    )
    assert rc == 0 and res["ok"] and len(res["outputs"]) == 2 and all(len(t) == 5 for t in res["tokens"])


def test_generate_streams_a_single_prompt(capsys, tiny_ckpt):
    assert main(["generate", "-m", str(tiny_ckpt), "-p", "def add", "-n", "4", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_generate_errors(capsys, tiny_ckpt):
    rc, res = run_json(capsys, ["generate", "-m", str(tiny_ckpt), "-p", "word " * 400, "-n", "4"])
    assert rc == 2 and not res["ok"] and "exceeds the model's context of 256" in res["error"]
    rc, res = run_json(capsys, ["generate", "-m", str(tiny_ckpt), "-p", "hi", "--chat"])
    assert rc == 2 and "no chat template" in res["error"]
    rc, res = run_json(capsys, ["generate", "-m", "tiny", "-p", "hi"])
    assert rc == 2 and "without a tokenizer" in res["error"]


def test_convert_round_trip_and_refuses_to_overwrite(capsys, tmp_path, tiny_ckpt):
    rc, res = run_json(capsys, ["convert", str(tiny_ckpt), str(tmp_path / "hf"), "--to", "hf"])
    assert rc == 0 and (tmp_path / "hf" / "config.json").is_file()
    rc, res = run_json(capsys, ["convert", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert rc == 0 and res["params"] > 0
    rc, res = run_json(capsys, ["convert", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert rc == 2 and "--force" in res["error"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["convert", "does/not/exist", "OUT"], "no such file or directory"),
        (["convert", "nope-preset", "OUT"], "not a preset"),
        (["eval", "-m", "tiny", "-d", "missing.txt"], "missing.txt: no such file"),
        (["eval", "-m", "tiny", "-d", "wikitext-3"], "not the name of a text shipped with leanlm (wikitext-2, "),
        (["prepare", "missing-dir", "--out", "OUT"], "missing-dir"),
        (["bench", "-m", "tiny", "--what", "fly"], "unknown benchmark 'fly'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("leanlm: error:") and needle in err[0]


def test_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_prepare_then_eval(capsys, tmp_path, tiny_ckpt):
    (tmp_path / "a.txt").write_text(TEXT)
    rc, res = run_json(
        capsys, ["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "data"), "--tokenizer", str(tiny_ckpt)]
    )
    assert rc == 0 and res["train_tokens"] > 0
    rc, res = run_json(capsys, ["eval", "-m", str(tiny_ckpt), "-d", str(tmp_path / "a.txt"), "--seq-len", "64"])
    assert rc == 0 and res["perplexity"] > 1 and "windows of 64" in res["protocol"]


def test_console_entry_point_and_module():
    out = subprocess.run(
        [sys.executable, "-m", "leanlm", "convert", "nope", "x", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["ok"] is False
    for verb in ("generate", "eval", "bench", "convert", "prepare"):
        h = subprocess.run([sys.executable, "-m", "leanlm", verb, "--help"], capture_output=True, text=True)
        assert h.returncode == 0 and "--json" in h.stdout
