"""`fastrlhf sft`, `fastrlhf rm` and `fastrlhf report` end to end on CPU from jsonl files (no downloads)."""
from __future__ import annotations

import importlib.util
import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastrlhf.cli import main
from fastrlhf.config import ConfigError
from fastrlhf.data import DataError, build_test_tokenizer
from fastrlhf.data.tokenizer import TEST_WORDS
from fastrlhf.models import RewardModel, tiny_llama

WORDS = [w for w in TEST_WORDS if w not in ("good", "bad")]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny Llama + the test tokenizer saved as a local "hub" directory."""
    path = tmp_path_factory.mktemp("base")
    tok = build_test_tokenizer()
    tiny_llama(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _sft_rows(n, rng):
    rows = []
    for _ in range(n):
        w = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
        rows.append({"prompt": "repeat " + " ".join(w) + " :", "response": " ".join(w)})
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    return rows


def _rm_rows(n, rng):
    rows = []
    for _ in range(n):
        base = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
        rows.append({"prompt": "say", "chosen": " ".join(base + ["good"]),
                     "rejected": " ".join(base + ["bad"]), "margin": rng.choice([0.0, 0.5])})
    return rows


def test_sft_then_rm_then_report(base_model, tmp_path):
    rng = random.Random(0)
    sft_data = _jsonl(tmp_path / "sft.jsonl", _sft_rows(24, rng))
    sft_eval = _jsonl(tmp_path / "sft_eval.jsonl", _sft_rows(6, rng))
    (tmp_path / "sft.yaml").write_text(
        f"model: {base_model}\ndata: {sft_data}\neval_data: {sft_eval}\noutput_dir: {tmp_path / 'sft'}\n"
        "max_length: 32\nlr: 3.0e-3\nbatch_size: 8\nmicro_batch_size: 4\nprogress: false\n")
    assert main(["sft", "--config", str(tmp_path / "sft.yaml"), "epochs=2", "eval_every=3"]) == 0
    final = tmp_path / "sft" / "final"
    policy = AutoModelForCausalLM.from_pretrained(final)
    assert policy.config.vocab_size == len(build_test_tokenizer())
    # TensorBoard is an optional extra: event files exactly when it is installed
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert (tmp_path / "sft" / "tensorboard").is_dir() == has_tb
    sft_rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in sft_rows) == 8 and sum("eval_loss" in r for r in sft_rows) == 3

    rm_data = _jsonl(tmp_path / "rm.jsonl", _rm_rows(32, rng))
    rm_eval = _jsonl(tmp_path / "rm_eval.jsonl", _rm_rows(16, rng))
    (tmp_path / "rm.yaml").write_text(
        f"model: {final}\ndata: {rm_data}\neval_data: {rm_eval}\noutput_dir: {tmp_path / 'rm'}\n"
        "max_length: 32\nlr: 3.0e-3\nbatch_size: 16\nmicro_batch_size: 8\nepochs: 2\nprogress: false\n")
    assert main(["rm", "--config", str(tmp_path / "rm.yaml"), "eval_every=1"]) == 0  # eval curves, not dots
    rm = RewardModel.from_pretrained(tmp_path / "rm" / "final")
    # The reward model's body starts from the SFT policy's body, not from the base model.
    assert rm.config.vocab_size == policy.config.vocab_size and rm.reward_std is not None
    result = json.loads((tmp_path / "rm" / "rm_result.json").read_text())
    assert result["eval_pairs"] == 16 and 0.0 <= result["eval_accuracy"] <= 1.0
    assert (tmp_path / "rm" / "reward_histogram.png").is_file()

    assert main(["report", str(tmp_path / "rm")]) == 0
    for name in ("rm_train.png", "rm_eval.png"):
        assert (tmp_path / "rm" / "plots" / name).stat().st_size > 1000
    assert main(["report", str(tmp_path / "sft")]) == 0
    assert (tmp_path / "sft" / "plots" / "sft_train.png").is_file()


def test_rm_body_is_the_sft_body(base_model, tmp_path):
    rng = random.Random(1)
    data = _jsonl(tmp_path / "rm.jsonl", _rm_rows(4, rng))
    (tmp_path / "empty.yaml").write_text("")
    assert main(["rm", "--config", str(tmp_path / "empty.yaml"), f"model={base_model}", f"data={data}",
                 f"output_dir={tmp_path / 'rm'}", "max_steps=1", "lr=1e-9", "progress=false",
                 "max_length=32", "warmup_ratio=0"]) == 0
    rm = RewardModel.from_pretrained(tmp_path / "rm" / "final")
    lm = AutoModelForCausalLM.from_pretrained(base_model)
    torch.testing.assert_close(rm.body.embed_tokens.weight, lm.model.embed_tokens.weight, atol=1e-6, rtol=0)


def test_cli_errors(base_model, tmp_path, capsys, monkeypatch):
    data = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "reply": "b"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {base_model}\ndata: {data}\noutput_dir: {tmp_path / 'out'}\n")
    # user errors: one line on stderr naming the command, the key / file and line, exit status 2
    monkeypatch.delenv("FASTRLHF_TRACEBACK", raising=False)
    for argv, message in ((["sft", "--config", str(cfg), "learning_rate=1"], r"fastrlhf sft: error: .*learning_rate"),
                          (["sft", "--config", str(cfg)], r"fastrlhf sft: error: .*bad\.jsonl, line 2"),
                          (["rm", "--config", str(tmp_path / "missing.yaml")], "fastrlhf rm: error: .*does not exist")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err
    monkeypatch.setenv("FASTRLHF_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="learning_rate"):
        main(["sft", "--config", str(cfg), "learning_rate=1"])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2"):
        main(["sft", "--config", str(cfg)])
    assert main(["report", str(tmp_path / "nowhere")]) == 1


def test_example_configs_load():
    """Every example YAML fits its config dataclass (a renamed key would fail here, not on a GPU)."""
    from pathlib import Path

    from fastrlhf.config import load_config
    from fastrlhf.trainers.ppo import PPOConfig
    from fastrlhf.trainers.reward import RewardConfig
    from fastrlhf.trainers.sft import SFTConfig

    root = Path(__file__).resolve().parents[1] / "examples"
    classes = {"sft.yaml": SFTConfig, "rm.yaml": RewardConfig, "ppo.yaml": PPOConfig}
    found = sorted(root.glob("*/*.yaml"))
    assert len(found) >= 5
    for path in found:
        cfg = load_config(classes[path.name], path)
        assert cfg.model and cfg.data and cfg.output_dir


def test_prepare_data_ultrafeedback_rows(tmp_path):
    import importlib.util
    from pathlib import Path

    from fastrlhf.data import read_rows

    spec = importlib.util.spec_from_file_location(
        "prepare_data", Path(__file__).resolve().parents[1] / "examples" / "prepare_data.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    conv = [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello"}]
    row = {"prompt": "hi?", "messages": conv, "chosen": conv, "score_chosen": 8.0, "score_rejected": 5.0,
           "rejected": [conv[0], {"role": "assistant", "content": "go away"}]}
    tied = {**row, "score_rejected": 8.0}
    empty = {**row, "rejected": [conv[0], {"role": "assistant", "content": " "}]}
    assert prep.ultrafeedback_row(row, "rm", margin_scale=0.5) == {
        "prompt": "hi?", "chosen": "hello", "rejected": "go away", "margin": 1.5}
    assert prep.ultrafeedback_row(tied, "rm") is None and prep.ultrafeedback_row(empty, "rm") is None
    assert prep.ultrafeedback_row(row, "prompts") == {"prompt": "hi?"}
    converted = (prep.ultrafeedback_row(r, "rm") for r in (row, tied, empty, row))
    n = prep.write_jsonl(converted, tmp_path / "rm.jsonl")
    assert n == 2 and len(read_rows(tmp_path / "rm.jsonl", kind="rm")) == 2
    prep.write_jsonl([prep.ultrafeedback_row(row, "sft")], tmp_path / "sft.jsonl")
    assert read_rows(tmp_path / "sft.jsonl", kind="sft")[0]["messages"] == conv
