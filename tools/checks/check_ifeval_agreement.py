"""IFEval scoring agreement: essa_mpi's ifeval reward path against lm-eval's reference ``process_results``.

    # 1. real responses of the embedded model (greedy) to the first N IFEval prompts
    python tools/checks/check_ifeval_agreement.py generate --data ../shared/data/ifeval/input_data.jsonl -n 120 \\
        --out tools/results/ifeval_responses.jsonl
    # 2. score them both ways and compare every instruction decision
    python tools/checks/check_ifeval_agreement.py compare --data ../shared/data/ifeval/input_data.jsonl \\
        --responses tools/results/ifeval_responses.jsonl --reference-nltk-data /path/to/nltk_data \\
        --out tools/results/ifeval_agreement.json

The reference side runs in a separate process, exactly as lm-evaluation-harness scores IFEval: its
``process_results`` on documents shaped like the ``google/IFEval`` dataset (every kwargs key present, None
where unused), with the trained Punkt model found through ``NLTK_DATA`` when given. Our side is
``essa_mpi.tasks.ifeval.follow`` as the ESSA loop calls it (offline sentence tokenizer, no NLTK_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


def read_jsonl(path: str) -> list:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def generate(args: argparse.Namespace) -> None:
    import torch

    from essa_mpi.config import ModelConfig
    from essa_mpi.model import load_model
    from essa_mpi.tasks.ifeval import SYSTEM_PROMPT

    rows = read_jsonl(args.data)[: args.n]
    model, tok = load_model(ModelConfig())
    out = []
    for start in range(0, len(rows), args.batch):
        chunk = rows[start: start + args.batch]
        texts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": r["prompt"]}], tokenize=False,
                                         add_generation_prompt=True) for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # [B, T]
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tok.pad_token_id)  # [B, T + new]
        for r, text in zip(chunk, tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            out.append({"key": r["key"], "response": text})
        print(f"{len(out)}/{len(rows)}", flush=True)
    with open(args.out, "w") as fh:
        fh.write("".join(json.dumps(o) + "\n" for o in out))


def hf_doc(row: dict, keys: list) -> dict:
    """A row as the google/IFEval dataset gives it: every kwargs key present, None where unused."""
    return {**row, "kwargs": [{k: kw.get(k) for k in keys} for kw in row["kwargs"]]}


def reference(args: argparse.Namespace) -> None:
    """(subprocess) lm-eval's process_results for every (doc, response) → JSON lines on stdout."""
    from lm_eval.tasks.ifeval.utils import process_results

    docs = {r["key"]: r for r in read_jsonl(args.data)}
    keys = sorted({k for r in docs.values() for kw in r["kwargs"] for k in kw})
    for resp in read_jsonl(args.responses):
        res = process_results(hf_doc(docs[resp["key"]], keys), [resp["response"]])
        print("RESULT " + json.dumps({"key": resp["key"], **{k: res[k] for k in METRICS}}), flush=True)


def ours(docs: dict, responses: list) -> dict:
    from essa_mpi.tasks.ifeval import follow

    out = {}
    for resp in responses:
        res = follow(resp["response"], docs[resp["key"]])
        out[resp["key"]] = {"prompt_level_strict_acc": all(res["strict"]), "inst_level_strict_acc": res["strict"],
                            "prompt_level_loose_acc": all(res["loose"]), "inst_level_loose_acc": res["loose"]}
    return out


def aggregate(results: dict) -> dict:
    prompt = {m: sum(r[m] for r in results.values()) / len(results) for m in METRICS if m.startswith("prompt")}
    inst = {m: sum(sum(r[m]) for r in results.values()) / sum(len(r[m]) for r in results.values())
            for m in METRICS if m.startswith("inst")}
    return {**prompt, **inst}


def compare(args: argparse.Namespace) -> None:
    docs = {r["key"]: r for r in read_jsonl(args.data)}
    responses = read_jsonl(args.responses)
    env = {**os.environ, **({"NLTK_DATA": args.reference_nltk_data} if args.reference_nltk_data else {})}
    proc = subprocess.run([sys.executable, __file__, "_reference", "--data", args.data, "--responses",
                           args.responses], capture_output=True, text=True, env=env, check=True)
    ref = {r["key"]: r for r in (json.loads(line[7:]) for line in proc.stdout.splitlines()
                                 if line.startswith("RESULT "))}
    mine = ours(docs, responses)
    decisions, agree, disagreements = 0, 0, []
    for key, r in ref.items():
        for mode in ("strict", "loose"):
            for i, (a, b) in enumerate(zip(r[f"inst_level_{mode}_acc"], mine[key][f"inst_level_{mode}_acc"])):
                decisions += 1
                agree += a == b
                if a != b:
                    disagreements.append({"key": key, "mode": mode,
                                          "instruction": docs[key]["instruction_id_list"][i], "reference": a})
    report = {"responses": len(responses), "instruction_decisions": decisions,
              "agreement": agree / decisions, "disagreements": disagreements,
              "reference_punkt": "trained (NLTK_DATA)" if args.reference_nltk_data else "as installed",
              "reference_metrics": aggregate(ref), "our_metrics": aggregate(mine)}
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "disagreements"}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["generate", "compare", "_reference"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--responses")
    ap.add_argument("--out")
    ap.add_argument("-n", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--reference-nltk-data", help="nltk_data directory with tokenizers/punkt_tab/english")
    args = ap.parse_args()
    {"generate": generate, "compare": compare, "_reference": reference}[args.command](args)


if __name__ == "__main__":
    main()
