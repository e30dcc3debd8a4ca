"""Second opinion on the math grader: essa_mpi's ``math_reward`` against the MATH reference ``is_equiv``.

    python tools/checks/check_math_grading.py                        # grade, write tools/results/math_grading.json
    python tools/checks/check_math_grading.py --responses-limit 100  # fewer model responses to generate

Three sets, each graded by both graders (ours: normalise + math-verify, ``essa_mpi.tasks.verify``; the
reference: Hendrycks et al.'s ``is_equiv`` on the last boxed answer, from lm-evaluation-harness's
``hendrycks_math/utils.py``, installed with the ``ifeval`` extra):
  a. every gold solution of MATH-500 and MATH train against its own gold answer (should all be correct);
  b. "neighbours": row i's solution against row i+1's gold (should be ~0: only true duplicates);
  c. the embedded model's (SmolLM2-135M-Instruct) greedy responses on MATH-500, generated once and kept in
     tools/results/math500_smollm2_responses.jsonl.
Every disagreement is listed with both graders' extracted answers and a cause.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from essa_mpi.tasks.math import gold, math_reward
from essa_mpi.tasks.math_answer import last_boxed_answer

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/


def reference_correct(response: str, answer: str) -> bool:
    """lm-eval hendrycks_math: the last boxed answer of the response (else, as its process_results does,
    the text between the first and last '$'), string-equal to the gold after strip_string."""
    from lm_eval.tasks.hendrycks_math.utils import is_equiv, last_boxed_only_string, remove_boxed

    boxed = last_boxed_only_string(response)
    if boxed is not None:
        try:
            pred = remove_boxed(boxed)
        except AssertionError:
            pred = boxed
    else:
        dollars = [i for i, ch in enumerate(response) if ch == "$"]
        pred = response if len(dollars) <= 1 else response[dollars[0] + 1: dollars[-1]]
    return bool(is_equiv(pred, answer))


def cause(ours: bool, response: str, answer: str) -> str:
    """A first guess at why the graders differ; the closing table is checked by hand."""
    from lm_eval.tasks.hendrycks_math.utils import strip_string

    pred = last_boxed_answer(response)
    if ours and "\\boxed " in response:
        return ("the reference's last_boxed_only_string takes the text after any '\\boxed ' (with a space) even when "
                "a later \\boxed{} exists, here giving a malformed answer")
    if pred is None:
        return "no boxed answer: math-verify reads the response's last expression, the reference the $...$ span"
    if ours:
        return (f"equivalent forms the reference's string match misses: {strip_string(pred)!r} vs "
                f"{strip_string(answer)!r}")
    return f"the reference's string normalisation equates {pred!r} with {answer!r}; math-verify does not"


def grade(name: str, responses: list, answers: list, keep: int = 200) -> dict:
    t0 = time.time()
    ours = [bool(v) for v in math_reward(responses, answer=answers)]
    ref = [reference_correct(r, a) for r, a in zip(responses, answers)]
    differ = [i for i in range(len(ours)) if ours[i] != ref[i]]
    out = {"rows": len(ours), "ours_correct": sum(ours), "reference_correct": sum(ref),
           "agreement": round(1 - len(differ) / max(1, len(ours)), 5), "disagreements": len(differ),
           "seconds": round(time.time() - t0, 1),
           "listed": [{"row": i, "ours": ours[i], "reference": ref[i], "gold": answers[i],
                       "response_answer": last_boxed_answer(responses[i]), "cause": cause(ours[i], responses[i],
                                                                                           answers[i])}
                      for i in differ[:keep]]}
    print(f"{name}: ours {out['ours_correct']}/{out['rows']}, reference {out['reference_correct']}/{out['rows']}, "
          f"agreement {out['agreement']:.4f} ({len(differ)} differ), {out['seconds']} s", flush=True)
    return out


def generate_responses(rows: list, path: str, max_new_tokens: int, batch: int) -> list:
    """Greedy responses of the embedded model with the math task's system prompt (kept in ``path``)."""
    import torch

    from essa_mpi.config import ModelConfig
    from essa_mpi.model import load_model
    from essa_mpi.tasks.gsm8k import SYSTEM_PROMPT

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load_model(ModelConfig())
    out = []
    if os.path.isfile(path + ".part"):  # continue an interrupted generation
        with open(path + ".part") as fh:
            out = [json.loads(line) for line in fh if line.strip()]
    out = out[: len(rows)]
    with open(path + ".part", "a") as fh:
        for start in range(len(out), len(rows), batch):
            chunk = rows[start: start + batch]
            texts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": r["problem"]}],
                                             tokenize=False, add_generation_prompt=True) for r in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id)
            for r, text in zip(chunk, tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
                row = {"unique_id": r.get("unique_id"), "answer": r["answer"], "response": text}
                fh.write(json.dumps(row) + "\n")
                out.append(row)
            fh.flush()
            print(f"  generated {len(out)}/{len(rows)}", flush=True)
    os.replace(path + ".part", path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "math"),
                    help="directory with math500_test.jsonl and train.jsonl")
    ap.add_argument("--responses", default=os.path.join(HERE, "results", "math500_smollm2_responses.jsonl"))
    ap.add_argument("--responses-limit", type=int, default=140, help="MATH-500 problems to generate for (the first N)")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "math_grading.json"))
    args = ap.parse_args()

    def rows(name: str) -> list:
        with open(os.path.join(args.data, name)) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    m500 = rows("math500_test.jsonl")
    train = [r for r in rows("train.jsonl") if gold(r)]  # 2 train rows box nothing ("\boxed{}"): no gold
    result = {"reference": "lm-evaluation-harness hendrycks_math is_equiv (Hendrycks et al. strip_string) on the "
                           "last boxed answer", "train_rows_without_gold": len(rows("train.jsonl")) - len(train)}
    result["gold_math500"] = grade("gold MATH-500", [r["solution"] for r in m500], [gold(r) for r in m500])
    result["gold_train"] = grade("gold MATH train", [r["solution"] for r in train], [gold(r) for r in train])
    for name, data in (("math500", m500), ("train", train)):
        golds = [gold(r) for r in data]
        res = grade(f"neighbours {name}", [r["solution"] for r in data[:-1]], golds[1:])
        # a neighbour graded correct is a true duplicate when the two rows' gold answers are themselves equal
        res["pairs_with_equal_gold"] = sum(math_reward([f"\\boxed{{{g}}}" for g in golds[:-1]], answer=golds[1:]))
        result[f"neighbour_{name}"] = res
    if os.path.isfile(args.responses):
        with open(args.responses) as fh:
            responses = [json.loads(line) for line in fh if line.strip()]
    else:
        responses = generate_responses(m500[: args.responses_limit], args.responses, args.max_new_tokens, args.batch)
    responses = responses[: args.responses_limit]
    result["model_responses_math500"] = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF), greedy", "max_new_tokens": args.max_new_tokens,
        **grade("SmolLM2 responses MATH-500", [r["response"] for r in responses], [r["answer"] for r in responses])}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
