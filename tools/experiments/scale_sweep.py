"""Validation accuracy of an adapter with its whole LoRA update scaled by c, split by problem kind.

    python tools/experiments/scale_sweep.py --adapter runs/sft/arithmetic-67f2ebc372f1 --scales 0,0.2,0.4,0.6,1 \\
        --name scale_sweep_strong_sft

Multiplies every LoRA layer's scale (alpha / r) by c, so c = 0 is the base model and c = 1 the adapter as
trained; every other setting (task, validation rows, greedy, task.max_new_tokens, grader) is the run's own.
Rows are grouped by the arithmetic operator in the prompt (``--group``, a regex with one group), and each
group reports accuracy and how often the completion restates the problem ("56 + 28 = 84") instead of
giving a bare number. This is how issue 12 found why search from the 1,500-problem SFT start is flat:
writes tools/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/<group>/ -> the repository


def set_scale(model, c: float, modules: str = "") -> None:
    """The scaling of every LoRA layer whose name matches the regex ``modules`` (all when empty) = c * alpha / r
    (PEFT keeps it in LoraLayer.scaling[adapter]); the other layers keep the adapter's own scale."""
    from peft.tuners.lora import LoraLayer

    for path, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and re.search(modules, path):
            for name in mod.scaling:
                mod.scaling[name] = c * mod.lora_alpha[name] / mod.r[name]


def greedy(model, tok, task, rows: list, max_new_tokens: int, batch: int = 50) -> list:
    import torch

    outs = []
    for i in range(0, len(rows), batch):
        texts = [tok.apply_chat_template(task.messages(r["prompt"]), tokenize=False, add_generation_prompt=True)
                 for r in rows[i: i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # [B, T]
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id)  # [B, T + new]
        outs += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def tally(task, rows: list, outs: list, group: str) -> dict:
    """{group: {"n", "correct", "restated"}} plus an "all" row; reward is the task's own."""
    from essa_mpi.tasks import score_rows

    rewards = score_rows(task, outs, rows)  # [len(rows)]
    table = collections.defaultdict(lambda: {"n": 0, "correct": 0, "restated": 0})
    for r, o, w in zip(rows, outs, rewards):
        m = re.search(group, r["prompt"])
        for key in ("all", m.group(1) if m else "?"):
            table[key]["n"] += 1
            table[key]["correct"] += int(w == 1.0)
            table[key]["restated"] += int("=" in o)
    return dict(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory")
    ap.add_argument("--scales", default="0,0.1,0.2,0.3,0.4,0.5,0.75,1,1.25")
    ap.add_argument("--group", default=r"What is \d+ (\S) \d+", help="regex whose group 1 names a row's kind")
    ap.add_argument("--modules", action="append", help="scale only LoRA layers whose name matches this regex "
                    r"(repeatable: one sweep each), e.g. 'layers\.[0-9]\.' or 'v_proj'; the rest stay at c = 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="scale_sweep")
    ap.add_argument("overrides", nargs="*", help="essa_mpi key=value overrides (task, model)")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import torch
    from peft import PeftModel

    from essa_mpi.config import load_config
    from essa_mpi.model import load_model
    from essa_mpi.tasks import build_task

    torch.set_num_threads(args.threads)
    cfg = load_config(None, args.overrides)
    task = build_task(cfg.task, cfg.search.seed)
    base, tok = load_model(cfg.model)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    rows = []
    for modules in args.modules or [""]:
        for c in [float(s) for s in args.scales.split(",")]:
            set_scale(model, 1.0)
            set_scale(model, c, modules)
            outs = greedy(model, tok, task, task.val, cfg.task.max_new_tokens)
            t = tally(task, task.val, outs, args.group)
            rows.append({"modules": modules or "all", "scale": c, "groups": t, "examples": outs[:4]})
            print(f"{modules or 'all'} c={c:<5} " + "  ".join(f"{k} {v['correct']}/{v['n']} (= {v['restated']})"
                                                             for k, v in t.items()), flush=True)
    write(args, rows)


def write(args, rows: list) -> None:
    out = os.path.join(ROOT, "tools", "results", args.name)
    with open(out + ".json", "w") as fh:
        json.dump({"adapter": args.adapter, "overrides": args.overrides, "rows": rows}, fh, indent=1)
    kinds = [k for k in rows[0]["groups"] if k != "all"]
    head = " | ".join(f"`{k}` correct | `{k}` restated" for k in kinds)
    lines = [f"| LoRA layers scaled | scale c | accuracy | {head} |", "|---" * (3 + 2 * len(kinds)) + "|"]
    for r in rows:
        g = r["groups"]
        cells = " | ".join(f"{g[k]['correct']}/{g[k]['n']} | {g[k]['restated']}/{g[k]['n']}" for k in kinds)
        lines.append(f"| `{r['modules']}` | {r['scale']:g} | {g['all']['correct'] / g['all']['n']:.3f} | {cells} |")
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
