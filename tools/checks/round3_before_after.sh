#!/usr/bin/env bash
# The seven "bad" findings of reliability round 3 (issue 36), each run as a user would on the tiny test model under
# mpiexec -n 2, printing: exit code, seconds, the essa_mpi line (or what was lost).
#   bash tools/checks/round3_before_after.sh                    # the checkout's code
#   ESSA_CODE=/path/to/older/checkout bash tools/checks/round3_before_after.sh   # another version, for "before"
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore PYTHONPATH="${ESSA_CODE:-$ROOT}:$ROOT/tests"
W=$(mktemp -d)
python "$ROOT/tests/tiny.py" "$W/tiny" >/dev/null 2>&1
cd "$W"  # not the checkout: python -m puts the working directory first on sys.path, before ESSA_CODE
BASE=(model.name_or_path=$W/tiny model.device=cpu model.threads=1 adapter.rank=2 adapter.warm_start=none task.name=toy
      task.batch_size=3 task.val_size=4 task.val_every=2 task.max_new_tokens=6 search.popsize=7 run.progress=false)
ess() { mpiexec -n 2 python -m essa_mpi "$@"; }
show() {  # name, exit code, seconds, stderr file
  printf '%s | exit %s | %ss | %s\n' "$1" "$2" "$3" "$(grep -m1 'essa_mpi' "$4" | cut -c1-230 || true)"
}
timed() {  # name, command...: run it, then show
  local name=$1; shift
  local t0=$SECONDS; "$@" >"$W/out" 2>"$W/err"; local rc=$?
  show "$name" "$rc" "$((SECONDS - t0))" "$W/err"
}

# 1. a resume of a finished run to more generations forgets its last validation
ess "${BASE[@]}" run.generations=3 run.output_dir=$W/r1 >/dev/null 2>&1
timed "1 resume 3 -> 5 generations" ess --resume $W/r1 run.generations=5
echo "  validations in metrics.jsonl: $(python -c "import json;print([m['generation'] for m in map(json.loads, open('$W/r1/metrics.jsonl')) if 'val_reward' in m])")"
# 2. sft into a folder holding a user's files
mkdir -p $W/mine && echo "my notes" > $W/mine/notes.txt
timed "2 sft.output_dir=a user's folder" ess sft "${BASE[@]}" adapter.warm_start=sft sft.output_dir=$W/mine
echo "  notes.txt still there: $([ -f $W/mine/notes.txt ] && echo yes || echo NO)"
# 3. run.overwrite=true with adapter.path inside the run's own best_adapter/
ess "${BASE[@]}" run.generations=2 run.output_dir=$W/r3 >/dev/null 2>&1
timed "3 overwrite with adapter.path in the run" ess "${BASE[@]}" run.generations=2 run.output_dir=$W/r3 \
  run.overwrite=true adapter.path=$W/r3/best_adapter
echo "  best_adapter still there: $([ -f $W/r3/best_adapter/adapter_config.json ] && echo yes || echo NO)"
# 4. truncate that cannot fit (the tiny model's context is 256 tokens)
timed "4 long_prompts=truncate, max_new_tokens=250" ess "${BASE[@]}" run.generations=1 run.output_dir=$W/r4 \
  task.long_prompts=truncate task.max_new_tokens=250
# 5. an override holding ' #'
timed "5 run.output_dir='r5 #3'" ess "${BASE[@]}" run.generations=1 "run.output_dir=r5 #3"
echo "  wrote to: $(ls -d r5* 2>/dev/null | sed 's/.*/[&]/' | tr '\n' ' ')"
# 6. an MPMD launch where rank 1 has another popsize
t0=$SECONDS
mpiexec -n 1 python -m essa_mpi "${BASE[@]}" run.generations=2 run.output_dir=$W/r6 : \
        -n 1 python -m essa_mpi "${BASE[@]}" run.generations=2 run.output_dir=$W/r6 search.popsize=8 >"$W/out" 2>"$W/err"
rc=$?; show "6 MPMD, rank 1 with search.popsize=8" $rc $((SECONDS - t0)) "$W/err"
grep -q "message truncated\|Fatal error" "$W/err" && echo "  (an MPI abort: $(grep -m1 -o 'Message truncated[^;]*\|Fatal error[^;]*' "$W/err" | cut -c1-80))"
# 7. a reward that calls os._exit(0)
timed "7 reward calls os._exit(0)" ess "${BASE[@]}" run.generations=2 run.output_dir=$W/r7 \
  task.reward_fn=mpi_rewards:os_exit_0
echo "  checkpoint: $([ -f $W/r7/checkpoint.h5 ] && echo kept || echo none)"
rm -rf "$W"
