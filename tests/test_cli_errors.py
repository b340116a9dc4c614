"""Issue 9: every user error of `fastrlhf sft|rm|ppo` is one line `fastrlhf CMD: error: ...`, exit 2, no
traceback, no output folder left behind; the output folder lock; Ctrl-C; threads; a fast `--help`."""
from __future__ import annotations

import errno
import json
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

from fastrlhf.cli import main
from fastrlhf.data import build_test_tokenizer
from fastrlhf.models import RewardModel, tiny_llama

ROWS = [{"prompt": "hello cat", "response": "big dog"}, {"prompt": "what", "response": "the small bird"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SFT policy (with the test tokenizer) and a reward model saved as local folders."""
    root = tmp_path_factory.mktemp("models")
    tok = build_test_tokenizer()
    tiny_llama(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    RewardModel(tiny_llama(len(tok), seed=1)).save_pretrained(root / "rm", tokenizer=tok)
    return root


def _config(tmp_path, name="c.yaml", **keys):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(keys))
    return str(path)


def _sft(tmp_path, models, **keys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base = dict(model=str(models / "sft"), data=str(data), output_dir=str(tmp_path / "out"), max_steps=1, max_length=64,
                batch_size=2, micro_batch_size=2, progress=False, tensorboard=False, device="cpu")
    return _config(tmp_path, **{**base, **keys})


def _ppo(tmp_path, models, prompts=("hello cat", "what", "the big red dog is here", "i like it"), **keys):
    data = tmp_path / "ppo.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    base = dict(model=str(models / "sft"), reward_model=str(models / "rm"), data=str(data),
                output_dir=str(tmp_path / "out"), iterations=1, rollout_batch_size=2, minibatch_size=2,
                ppo_epochs=1, progress=False, tensorboard=False, rollout={"max_new_tokens": 3})
    return _config(tmp_path, "ppo.yaml", **{**base, **keys})


def _user_error(capsys, argv, pattern, out=None):
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err  # (transformers' loading bars may precede it on stderr)
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(f"^fastrlhf {argv[0]}: error: .*{pattern}", lines[0]), err
    if out is not None:
        assert not pathlib.Path(out).exists(), "a failed run left its output folder behind"


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch):
    monkeypatch.delenv("FASTRLHF_TRACEBACK", raising=False)
    yield
    torch.set_num_threads(1)


def test_data_and_config_errors_are_one_line(tmp_path, models, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bytes.jsonl"
    bad.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n')
    _user_error(capsys, ["sft", "--config", _sft(tmp_path, models, data=str(bad))],
                r"bytes\.jsonl, line 2: not UTF-8 text: byte 0xe9 at column 16", out)
    (tmp_path / "syntax.yaml").write_text("model: x\ndata: [unclosed\noutput_dir: o\n")
    _user_error(capsys, ["sft", "--config", str(tmp_path / "syntax.yaml")], r"syntax\.yaml, line \d: YAML syntax")
    _user_error(capsys, ["sft", "--config", _sft(tmp_path, models, dtype="float13")], "dtype must be one of", out)
    (tmp_path / "empty").mkdir()
    _user_error(capsys, ["sft", "--config", _sft(tmp_path, models, model=str(tmp_path / "empty"))],
                r"model: .*empty is not a saved model folder \(config.json missing\)", out)
    _user_error(capsys, ["rm", "--config", _sft(tmp_path, models, dtype="float13")], "dtype", out)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "cat " * 40, "response": "dog"}) + "\n")
    _user_error(capsys, ["sft", "--config", _sft(tmp_path, models, data=str(long), max_length=16,
                                                 drop_overlong=False)],
                r"long\.jsonl, line 2: .*max_length=16", out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error(tmp_path, models, capsys):
    _user_error(capsys, ["sft", "--config", _sft(tmp_path, models, device="cuda")],
                "device='cuda' but CUDA is not available", tmp_path / "out")


def test_ppo_config_errors_before_any_model_loads(tmp_path, models, capsys, monkeypatch):
    from fastrlhf.trainers import ppo_cli

    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr("fastrlhf.models.load_causal_lm", no_models)
    out = tmp_path / "out"
    _user_error(capsys, ["ppo", "--config", _ppo(tmp_path, models, minibatch_size=8)],
                "PPOConfig: minibatch_size must be in", out)
    _user_error(capsys, ["ppo", "--config", _ppo(tmp_path, models, reward_model="")], "`reward_model` or `rewards` is required", out)
    _user_error(capsys, ["ppo", "--config", _ppo(tmp_path, models, reward_model=str(models / "sft"))],
                "reward_model: .* is not a saved model folder", out)
    _user_error(capsys, ["ppo", "--config", _ppo(tmp_path, models, dtype="half-ish")], "dtype must be", out)
    _user_error(capsys, ["ppo", "--config", _ppo(tmp_path, models, max_prompt_length=4, drop_overlong=False)],
                r"ppo\.jsonl, line 3: the prompt has \d+ tokens, more than max_prompt_length=4", out)
    assert ppo_cli  # imported for monkeypatching the loaders it imports lazily


def test_output_dir_problems(tmp_path, models, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    _user_error(capsys, ["sft", "--config", _sft(tmp_path, models, output_dir=str(tmp_path / "afile"))],
                "afile exists and is not a folder")
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *a, **k):
        if self.name == "ro-out":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    _user_error(capsys, ["sft", "--config", _sft(tmp_path, models, output_dir=str(tmp_path / "ro-out"))],
                r"ro-out cannot be created \(Read-only file system\)", tmp_path / "ro-out")


def test_full_disk_is_one_line(tmp_path, models, capsys, monkeypatch):
    from fastrlhf.trainers import common
    from fastrlhf.trainers.sft import SFTTrainer

    def full(self, directory):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 512 vs 402")

    monkeypatch.setattr(SFTTrainer, "save_model", full)
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    _user_error(capsys, ["sft", "--config", _sft(tmp_path, models)],
                r"no space left on the device while writing .*final", tmp_path / "out")


def test_output_dir_lock(tmp_path, models, capsys):
    from fastrlhf.trainers.guard import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(f"{busy.pid} {__import__('os').uname().nodename}\n")
        _user_error(capsys, ["sft", "--config", _sft(tmp_path, models)],
                    f"in use by another run \\(pid {busy.pid}, lock file")
    finally:
        busy.kill()
        busy.wait()
    # the holder is gone: its stale lock is taken over and the run goes through (and releases the lock)
    assert main(["sft", "--config", _sft(tmp_path, models)]) == 0
    assert (out / "final" / "config.json").is_file() and not (out / LOCK_FILE).exists()


def test_ctrl_c_says_how_to_resume(tmp_path, models, capsys, monkeypatch):
    from fastrlhf.trainers.sft import SFTTrainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(SFTTrainer, "train", interrupted)
    assert main(["sft", "--config", _sft(tmp_path, models)]) == 130
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == "fastrlhf sft: interrupted; run the same command again to resume from the last checkpoint"
    assert not (tmp_path / "out").exists()  # nothing to resume from: nothing left behind


def test_cpu_runs_pin_threads(tmp_path, models, monkeypatch):
    torch.set_num_threads(2)
    assert main(["sft", "--config", _sft(tmp_path, models, num_threads=1)]) == 0
    assert torch.get_num_threads() == 1


def test_help_imports_nothing_heavy():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fastrlhf", "--help"],
                          capture_output=True, text=True, check=True)
    assert "usage: fastrlhf" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "fastrlhf.data", "numpy"}, sorted(imported)


def test_ppo_cli_outputs(tmp_path, models, capsys):
    """`fastrlhf ppo`: ppo_config.json, TensorBoard, eval_every on held-out prompts with a sample table,
    final/, critic/ (a ValueModel), ppo_result.json, plots/, a closing line; over-long prompts dropped."""
    from fastrlhf.models import ValueModel

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello", "the cat", "what is it")))
    cfg = _ppo(tmp_path, models, prompts=("hello cat", "what", "cat " * 30, "the big red dog is here", "i like"),
               iterations=2, max_prompt_length=12, eval_data=str(held), eval_every=1, eval_samples=2,
               tensorboard=True)
    assert main(["ppo", "--config", cfg]) == 0
    stdout = capsys.readouterr().out
    assert "ppo.jsonl: dropped 1 of 5 rows longer than the length limit (first: line 3:" in stdout
    assert "[fastrlhf] ppo done:" in stdout.splitlines()[-1]
    out = tmp_path / "out"
    assert json.loads((out / "ppo_config.json").read_text())["max_prompt_length"] == 12
    assert any((out / "tensorboard").iterdir())
    result = json.loads((out / "ppo_result.json").read_text())
    assert result["iteration"] == 2 and "kl" in result and "eval_rm_score" in result and "eval_kl" in result
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2] and {"prompt", "response", "rm_score"} <= set(samples[0])
    critic = ValueModel.from_pretrained(out / "critic")
    assert critic(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)).shape == (1, 3)
    assert (out / "final" / "config.json").is_file()
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["ppo_eval.png", "ppo_train.png"]
    assert not (out / ".fastrlhf.lock").exists()
