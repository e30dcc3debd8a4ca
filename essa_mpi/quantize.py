"""``python -m essa_mpi quantize``: a causal LM to a 4-bit GPTQ checkpoint (the common Hugging Face format), on
CPU or GPU.

    python -m essa_mpi quantize --out runs/smollm2-gptq                   # the embedded model, ~7 min on 2 cores
    python -m essa_mpi quantize --model Qwen/Qwen2.5-1.5B-Instruct --out q15-gptq --calib prompts.jsonl
    mpiexec -n 2 python -m essa_mpi model.name_or_path=runs/smollm2-gptq model.precision=gptq

Calibration: chat-formatted prompts of the task (default: arithmetic training prompts) or a JSONL file
with a ``prompt`` column. Every linear layer inside the decoder blocks is quantized (embeddings, norms and
the LM head stay as they are); see ``essa_mpi/gptq.py`` for the algorithm and the format.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def calibration(tok, args: argparse.Namespace) -> list:
    from essa_mpi.config import TaskConfig
    from essa_mpi.tasks import build_task

    if args.calib:
        with open(args.calib) as fh:
            prompts = [json.loads(line)["prompt"] for line in fh if line.strip()][: args.samples]
        system = None
    else:
        task = build_task(TaskConfig(name=args.task, val_size=0, sft_size=args.samples), seed=0)
        prompts = [r["prompt"] + " " + r["completion"] for r in task.sft[: args.samples]]
        system = task.system_prompt
    texts = [tok.apply_chat_template(([{"role": "system", "content": system}] if system else [])
                                     + [{"role": "user", "content": p}], tokenize=False) for p in prompts]
    return [dict(tok(texts[i: i + 16], return_tensors="pt", padding=True, add_special_tokens=False))
            for i in range(0, len(texts), 16)]  # input_ids [16, T]


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m essa_mpi quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model.name_or_path (id, dir, .gguf, embedded)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="arithmetic", help="task whose SFT rows are the calibration text")
    ap.add_argument("--calib", help="JSONL with a 'prompt' column instead of the task")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args(argv)
    from essa_mpi.config import ModelConfig
    from essa_mpi.preflight import check_model_path

    try:  # bad input: one line, exit 2, before the model loads
        if args.samples < 1 or args.group_size < 8 or args.group_size % 8:
            raise ValueError(f"--samples {args.samples} must be >= 1 and --group-size {args.group_size} a multiple "
                             f"of 8 (GPTQ checkpoints use 32, 64 or 128).")
        check_model_path(ModelConfig(name_or_path=args.model, device="cpu"))
        if os.path.isfile(args.out):
            raise ValueError(f"--out {args.out} is a file; give a directory for the checkpoint.")
    except ValueError as exc:
        print(f"essa_mpi quantize: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return quantize(args)


def quantize(args) -> int:
    from safetensors.torch import save_file

    from essa_mpi.config import ModelConfig
    from essa_mpi.gptq import quantize_model, save_gptq_metadata
    from essa_mpi.model import load_model

    t0 = time.time()
    model, tok = load_model(ModelConfig(name_or_path=args.model, device="cpu"))
    tok.padding_side = "right"
    quantized = quantize_model(model, calibration(tok, args), args.group_size)
    tied_head = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k.rsplit(".", 1)[0] not in quantized and not (tied_head and k == "lm_head.weight")}
    for name, tensors in quantized.items():
        state.update({f"{name}.{k}": v.contiguous() for k, v in tensors.items()})
    os.makedirs(args.out, exist_ok=True)
    model.config.save_pretrained(args.out)
    save_gptq_metadata(args.out, args.group_size)
    tok.padding_side = "left"
    tok.save_pretrained(args.out)
    save_file(state, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print(json.dumps({"out": args.out, "quantized_layers": len(quantized), "file_bytes": size,
                      "seconds": round(time.time() - t0, 1)}))
    return 0
