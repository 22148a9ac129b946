#!/usr/bin/env bash
# Issue 15 part 3 on one GPU: export the long model if needed, measure its attention concentration
# (first: the shorter stage), evaluate it, run the quality benchmark's long workload; resumable.
#
#   . benchmarks/gpu_env.sh && bash benchmarks/long_part3.sh "$OUT"
#
# Work happens in $LONG_PART3_WORK/step-N (default out/long_part3, git-ignored, kept on a warm
# machine), N the weights' training step: a stage already finished there is skipped, the
# benchmark resumes its rows. A checkpoint in artifacts/runs/long newer than the model folder's
# weights is exported first (refused before its stop step unless LONG_PART3_ALLOW_PARTIAL=1). Each call stops
# its stages at $LONG_PART3_BUDGET_S seconds (default 540) and copies the results (8 files, the
# benchmark's traces as long_traces.tgz) into RESULTS; it prints "part 3 done" once every stage
# has finished, else run it again.
# On two GPUs the stages can run side by side after the export, each process on its own GPU:
#   LONG_PART3_STAGES=export bash benchmarks/long_part3.sh "$OUT"
#   CUDA_VISIBLE_DEVICES=0 LONG_PART3_STAGES=eval,concentration bash benchmarks/long_part3.sh "$OUT" &
#   CUDA_VISIBLE_DEVICES=1 LONG_PART3_STAGES=benchmark bash benchmarks/long_part3.sh "$OUT"; wait
# (each selection logs to its own part3-<stages>.log). LONG_PART3_MODEL and LONG_PART3_RUN
# replace the model folder and the training run folder. LONG_PART3_TILE (default 1x8x8) is the
# token tile of the concentration profile and the benchmark; another tile works in
# step-N/tile-<tile> (the evaluation, which has no tile, stays in step-N).
# The default keeps the concentration profile comparable with the model card's (1x8x8); the
# shipped long plans and the benchmark's own default use 8x4x4 (pass LONG_PART3_TILE=8x4x4).
set -uo pipefail

RESULTS=${1:?usage: benchmarks/long_part3.sh RESULTS_DIR}
BASE=${LONG_PART3_WORK:-out/long_part3}
BUDGET_S=${LONG_PART3_BUDGET_S:-540}
MODEL=${LONG_PART3_MODEL:-artifacts/models/ditplan-ref-t2v-long}
RUN=${LONG_PART3_RUN:-artifacts/runs/long}
STAGES=${LONG_PART3_STAGES:-eval,concentration,benchmark}
TILE=${LONG_PART3_TILE:-1x8x8}
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$BASE" "$RESULTS"
LOG=part3-${STAGES//,/-}.log
WORK=$BASE  # until the weights are known: then $BASE/step-N, results per weights (and tile)
EVAL=$BASE/eval
exec > >(tee -a "$BASE/$LOG") 2>&1

# True when the stage named $1 is in this call's selection.
selected() { [[ ",$STAGES," == *",$1,"* ]]; }

# Runs "$@" with the seconds left (SIGINT first: the benchmark keeps the rows it finished).
stage() {
    local left=$((DEADLINE - SECONDS))
    if ((left < 30)); then
        echo "== out of budget before: $*"
        return 1
    fi
    echo "== $(date +%T) ($left s left): $*"
    timeout -k 20 -s INT "$left" "$@"
}

finish() {
    python3 -m benchmarks.quality --workload long --model "$MODEL" --out "$WORK/quality" \
        --tile "$TILE" --report-only > /dev/null 2>&1 || true
    for file in "$WORK"/quality/{table.md,quality.jsonl,pareto.png} "$EVAL"/{eval_results.json,sample_grid.png} \
            "$WORK/attention_concentration.json"; do
        [[ -f "$file" ]] && cp "$file" "$RESULTS/"
    done
    cp "$BASE/$LOG" "$RESULTS/"
    # the benchmark's traces (no block maps: small), to ship as artifacts/traces/<model>
    [[ -d "$WORK/quality/traces" ]] && tar -C "$WORK/quality/traces" -czf "$RESULTS/long_traces.tgz" .
    echo "$1"
    exit "$2"
}

# The training step of the weights in a state file (an export's training_state.json or a
# checkpoint's state.json); -1 when there is none.
step_of() {
    python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$1" 2>/dev/null \
        || echo -1
}

shipped=$(step_of "$MODEL/training_state.json")
[[ -f "$MODEL/model_index.json" ]] || shipped=-1
trained=$(step_of "$RUN/checkpoint/state.json")
if ((trained > shipped)); then  # a checkpoint newer than the model folder: export it first
    stop=$(python3 -c "import json; c = json.load(open('$RUN/checkpoint/state.json'))['config']
print(c.get('stop_step') or c['total_steps'])")
    if ((trained < stop)) && [[ -z ${LONG_PART3_ALLOW_PARTIAL:-} ]]; then
        finish "$RUN/checkpoint is at step $trained of $stop: train on (or set \
LONG_PART3_ALLOW_PARTIAL=1 to measure these weights)" 1
    fi
    stage python3 tools/train_reference.py --long --out "$RUN" --max-steps 0 --export "$MODEL" \
        || finish "export failed" 1
    shipped=$trained
elif ((shipped < 0)); then
    finish "no weights in $MODEL and no $RUN/checkpoint: train it: python \
tools/train_reference.py --long --out $RUN --time-budget-min 8 (carry $RUN)" 1
fi
WORK=$BASE/step-$shipped
EVAL=$WORK/eval
[[ $TILE == 1x8x8 ]] || WORK=$WORK/tile-$TILE
mkdir -p "$WORK"
echo "== weights of step $shipped, tile $TILE: results in $WORK"

if selected concentration && [[ ! -f "$WORK/attention_concentration.json" ]]; then
    # sample mode, as the shipped numbers were measured; no sink, so the
    # numbers are the pure top-block shares (as the shipped model's card)
    stage python3 -m ditplan.runtime.cli profile --model "$MODEL" --out "$WORK/concentration" \
        --no-sink --mode sample --frames 32 --height 64 --width 64 --steps 32 --seeds 0 \
        --tile "$TILE" \
        || finish "concentration profile not finished: run again" 1
    python3 tools/attention_concentration.py "$WORK/concentration" \
        --json "$WORK/attention_concentration.json" || finish "concentration failed" 1
fi

if selected eval && [[ ! -f "$EVAL/eval_results.json" ]]; then
    stage python3 tools/eval_reference.py --model "$MODEL" --out "$EVAL" --preset long \
        --guidance 4 \
        || finish "evaluation not finished: run again" 1
fi

if selected benchmark; then
    stage python3 -m benchmarks.quality --workload long --model "$MODEL" --out "$WORK/quality" \
        --tile "$TILE" || finish "benchmark not finished: run again (finished rows are kept)" 1
fi
if [[ $STAGES == eval,concentration,benchmark ]]; then finish "part 3 done" 0; fi
finish "part 3 stages done: $STAGES" 0
