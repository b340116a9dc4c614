"""Turn public preference datasets into fastrlhf's row formats (jsonl), for the example configs.

    python examples/prepare_data.py ultrafeedback --out data/ultrafeedback [--limit N] [--margin-scale S]

reads HuggingFaceH4/ultrafeedback_binarized (needs hub access) and writes

    sft_{train,test}.jsonl      {"messages": [...]}                            (splits train_sft / test_sft)
    rm_{train,test}.jsonl       {"prompt", "chosen", "rejected"[, "margin"]}   (train_prefs / test_prefs)
    prompts_{train,test}.jsonl  {"prompt"}                                     (train_gen / test_gen)

UltraFeedback stores ``chosen`` / ``rejected`` as single-turn conversations ``[user, assistant]``; the
reward rows keep the user prompt and the two assistant replies as strings. Pairs with tied scores or
an empty reply are dropped (fastrlhf stops a run at the first malformed row instead of skipping it).
With ``--margin-scale S`` each pair gets ``margin = S * (score_chosen - score_rejected)``.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

SPLITS = {"sft": ("train_sft", "test_sft"), "rm": ("train_prefs", "test_prefs"),
          "prompts": ("train_gen", "test_gen")}


def _reply(conversation) -> str:
    return conversation[-1]["content"] if conversation and conversation[-1]["role"] == "assistant" else ""


def ultrafeedback_row(row: dict, kind: str, *, margin_scale: float = 0.0) -> dict | None:
    """One UltraFeedback row as a fastrlhf ``kind`` row ("sft", "rm" or "prompts"); None drops it."""
    prompt = (row.get("prompt") or "").strip()
    if not prompt:
        return None
    if kind == "prompts":
        return {"prompt": row["prompt"]}
    if kind == "sft":
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        ok = any(m["role"] == "assistant" and m["content"].strip() for m in messages)
        return {"messages": messages} if ok else None
    chosen, rejected = _reply(row["chosen"]), _reply(row["rejected"])
    gap = float(row["score_chosen"]) - float(row["score_rejected"])
    if not chosen.strip() or not rejected.strip() or chosen == rejected or gap <= 0:
        return None
    out = {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}
    if margin_scale:
        out["margin"] = margin_scale * gap
    return out


def write_jsonl(rows: Iterable[dict | None], path: Path, limit: int | None = None) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            if row is None:
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
            if limit is not None and n >= limit:
                break
    return n


def prepare_ultrafeedback(out: Path, *, limit: int | None, margin_scale: float) -> None:
    import datasets

    for kind, (train, test) in SPLITS.items():
        for split, name in ((train, "train"), (test, "test")):
            ds = datasets.load_dataset("HuggingFaceH4/ultrafeedback_binarized", split=split)
            path = out / f"{kind}_{name}.jsonl"
            n = write_jsonl((ultrafeedback_row(r, kind, margin_scale=margin_scale) for r in ds), path, limit)
            print(f"{path}: {n} rows (from {len(ds)} in {split})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=["ultrafeedback"])
    p.add_argument("--out", type=Path, default=Path("data/ultrafeedback"))
    p.add_argument("--limit", type=int, default=None, help="at most this many rows per file")
    p.add_argument("--margin-scale", type=float, default=0.0)
    args = p.parse_args(argv)
    prepare_ultrafeedback(args.out, limit=args.limit, margin_scale=args.margin_scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
