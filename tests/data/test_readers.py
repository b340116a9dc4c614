"""read_rows: every format, every kind, and the first bad row named by file and line / row index."""
import json

import pytest

from fastrlhf.data import DataError, read_rows

SFT = [{"prompt": "what is 3 + 4 ?", "response": "7"},
       {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
RM = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
      {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}]
PPO = [{"prompt": "count to 3", "extra": 5}, {"prompt": "say hi"}]
GOOD = {"sft": SFT, "rm": RM, "ppo": PPO}


def to_dataset(rows):
    """A datasets.Dataset over the union of the rows' keys (missing ones None), as columnar data is."""
    import datasets
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo"])
def test_jsonl_json_parquet_and_saved_dataset(tmp_path, kind):
    rows = GOOD[kind]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    assert read_rows(jsonl, kind=kind) == rows
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert read_rows(str(tmp_path / "d.json"), kind=kind) == rows
    (tmp_path / "s.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    assert read_rows(tmp_path / "s.json", kind=kind, split="test") == rows[:1]

    import datasets
    if kind != "sft":  # mixed-form sft rows are tested below with a union schema
        ds = to_dataset(rows)
        ds.to_parquet(str(tmp_path / "d.parquet"))
        assert read_rows(tmp_path / "d.parquet", kind=kind) == rows  # None-filled keys dropped
        ds.save_to_disk(str(tmp_path / "saved"))
        assert read_rows(tmp_path / "saved", kind=kind) == rows
        datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
        assert len(read_rows(tmp_path / "dd", kind=kind, split="test")) == 1
        with pytest.raises(DataError, match=r"no split 'validation'; splits are \['test', 'train'\]"):
            read_rows(tmp_path / "dd", kind=kind, split="validation")


def test_mixed_sft_forms_in_columnar_formats(tmp_path):
    ds = to_dataset(SFT)  # union schema: missing keys become None
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert read_rows(tmp_path / "d.parquet", kind="sft") == SFT
    ds.save_to_disk(str(tmp_path / "saved"))
    assert read_rows(tmp_path / "saved", kind="sft") == SFT


def test_hf_data_directory_via_load_dataset(tmp_path):
    data = tmp_path / "rawdir"
    data.mkdir()
    write_jsonl(data / "train.jsonl", PPO)
    assert [r["prompt"] for r in read_rows(data, kind="ppo")] == ["count to 3", "say hi"]


@pytest.mark.parametrize("kind,bad,match", [
    ("sft", {"prompt": "p"}, "missing key 'response'"),
    ("sft", {"prompt": "p", "response": ""}, "'response' is an empty string"),
    ("sft", {"prompt": "p", "response": 7}, "'response' must be a string, got int"),
    ("sft", {"text": "p"}, "need 'prompt' and 'response', or 'messages'"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ("sft", {"messages": "hi"}, "non-empty list"),
    ("sft", {"messages": [{"role": "assistant", "content": "a"}], "prompt": "p"}, "both"),
    ("rm", {"prompt": "p", "chosen": "a"}, "missing key 'rejected'"),
    ("rm", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
     "'margin' must be a number, got str"),
    ("rm", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}, "'margin' must be a number"),
    ("ppo", {"prompt": "   "}, "'prompt' is an empty string"),
    ("ppo", {"query": "x"}, "missing key 'prompt'"),
])
def test_first_bad_row_named_with_file_and_line(tmp_path, kind, bad, match):
    rows = GOOD[kind] + [GOOD[kind][0]]
    path = write_jsonl(tmp_path / "bad.jsonl", [], [json.dumps(rows[0]), "", json.dumps(rows[1]),
                                                     json.dumps(bad), json.dumps(rows[2])])
    with pytest.raises(DataError, match=match) as info:
        read_rows(path, kind=kind)
    assert str(info.value).startswith(f"{path}, line 4: bad {kind} row:")  # blank line 2 still counts
    assert isinstance(info.value, ValueError) and info.value.location == "line 4"


def test_bad_json_and_non_object_rows(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", PPO, ['{"prompt": "unterminated'])
    with pytest.raises(DataError, match=r"x\.jsonl, line 3: bad JSON at column 12: Unterminated string"):
        read_rows(path, kind="ppo")
    path = write_jsonl(tmp_path / "y.jsonl", PPO, ['["prompt", "a"]'])
    with pytest.raises(DataError, match=r"y\.jsonl, line 3: expected an object \(dict\), got list"):
        read_rows(path, kind="ppo")
    (tmp_path / "z.json").write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(DataError, match=r"z\.json, line 2: bad JSON"):
        read_rows(tmp_path / "z.json", kind="ppo")
    (tmp_path / "w.json").write_text(json.dumps({"rows": PPO}))
    with pytest.raises(DataError, match="split 'train'"):
        read_rows(tmp_path / "w.json", kind="ppo")


def test_bad_rows_in_parquet_and_datasets_name_row_index(tmp_path):
    rows = [dict(RM[0], margin=None), {"prompt": "q", "chosen": "", "rejected": "b", "margin": 1.0}]
    ds = to_dataset(rows)
    ds.to_parquet(str(tmp_path / "rm.parquet"))
    with pytest.raises(DataError, match=r"rm\.parquet, row index 1: bad rm row: 'chosen' is an empty string"):
        read_rows(tmp_path / "rm.parquet", kind="rm")
    ds.save_to_disk(str(tmp_path / "rmds"))
    with pytest.raises(DataError, match=r"rmds, row index 1: bad rm row: 'chosen'"):
        read_rows(tmp_path / "rmds", kind="rm")
    ds = to_dataset([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}])
    ds.to_parquet(str(tmp_path / "nan.parquet"))
    with pytest.raises(DataError, match="row index 0.*'margin' must be finite"):
        read_rows(tmp_path / "nan.parquet", kind="rm")


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_rows(tmp_path / "missing.jsonl", kind="sft")
    (tmp_path / "a.csv").write_text("prompt\nx\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_rows(tmp_path / "a.csv", kind="ppo")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no ppo rows"):
        read_rows(tmp_path / "empty.jsonl", kind="ppo")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read Parquet"):
        read_rows(tmp_path / "broken.parquet", kind="ppo")
    with pytest.raises(ValueError, match="kind"):
        read_rows(tmp_path / "empty.jsonl", kind="dpo")
