#!/usr/bin/env bash
# Every GPU row of issue 29 in one short run (at most BUDGET seconds, default 450), for a session lent a GPU:
#
#   OUT=/path/to/results bash benchmarks/gpu_session.sh          # on the GPU machine, from the repository root
#   OUT=/tmp/gpu-dry bash benchmarks/gpu_session.sh --dry-run    # anywhere: the CPU-safe parts, tiny sizes
#
# 1. The pre-training step, bf16, eager against compiled (`--compile-mode reduce-overhead`: one graph, static
#    shapes, CUDA graphs), at batch 48, 96, 192 and 256, with samples/s, MFU (counted and 6NT + attention) and peak
#    memory; VisualBERT and LXMERT in the same run at batch 48 and 192 (the 1.5x target is against them).
# 2. The FSDP and DeepSpeed accelerate configs of configuration/accelerate run the demo recipe for a few steps in
#    one process each, saving a checkpoint and resuming from it (the config and the checkpoint format work).
#
# Everything goes to $OUT: bench_*.log, RESULTS.md (benchmarks/RESULTS.md with the new rows appended), the engines'
# logs and pretrain_results.json, and summary.txt. Each part has its own time limit, a failure does not stop the
# others, and a part that would end past BUDGET is skipped (most wanted first: batch 48 and 192 with the peers, the
# engines, then batch 96 and 256), so one run gives every row it can within a device session's 10-minute command
# limit. Copy the new rows of $OUT/RESULTS.md into benchmarks/RESULTS.md.
set -u
OUT=${OUT:?set OUT to the folder for the results}
BUDGET=${BUDGET:-450}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME LIMIT_SECONDS COMMAND...: runs a part with a time limit (cut to what is left of BUDGET; skipped when
# less than half of it is left), logs it to $OUT/NAME.log, records its status.
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < limit / 2)); then
        note "$name: skipped, ${left} s of the ${BUDGET} s budget left"
        return 0
    fi
    ((limit > left)) && limit=$left
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    note "$name: exit $status in $((SECONDS - start)) s ($*)"
    return 0
}

if [[ $DRY == 1 ]]; then
    # CPU-safe: the tiny size, ImageBERT eager vs compiled only (compiling is slow on a few shared cores).
    DEVICE=cpu SIZE=tiny STEPS=(--steps 1 --warmup 1) FIRST=(4) LATER=() PEER_BATCHES=" " DTYPE=fp32 MODE=default
    BENCH_LIMIT=${BENCH_LIMIT:-400}
else
    DEVICE=cuda SIZE=base STEPS=(--steps 20 --warmup 5) FIRST=(48 192) LATER=(96 256) PEER_BATCHES=" 48 192 "
    DTYPE=bf16 MODE=reduce-overhead BENCH_LIMIT=${BENCH_LIMIT:-110}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
fi
note "gpu_session: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?) device $DEVICE"
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())" \
    2>&1 | tee -a "$SUMMARY"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"

# 1. The step: eager vs compiled (and the peers at two batch sizes). Rows are appended to $OUT/RESULTS.md.
bench() {
    local batch=$1 models=imagebert
    [[ "$PEER_BATCHES" == *" $batch "* ]] && models=imagebert,visualbert,lxmert
    run "bench_b$batch" "$BENCH_LIMIT" python benchmarks/bench_pretrain_step.py --device "$DEVICE" --size "$SIZE" \
        --dtype "$DTYPE" --batch-size "$batch" "${STEPS[@]}" --models "$models" --compile --compile-mode "$MODE" \
        --no-collator --results "$OUT/RESULTS.md"
}
for batch in "${FIRST[@]}"; do bench "$batch"; done

# 2. FSDP and DeepSpeed, one process each: the demo recipe for 3 steps per stage, a checkpoint at step 2, then a
#    resume from the newest checkpoint to the end of the run (no zero-shot check: the engines are what is tested).
engine() {
    local name=$1 config=$2
    local dir=$OUT/$name
    local args=(examples/run_pretrain.py --output_dir "$dir" --max_steps 3 --save_steps 2 --no_eval --no_progress
        --mixed_precision bf16 --set "stages.0.datasets.0.toy_world.num_images=200"
        --set "stages.1.datasets.0.toy_world.num_images=200")
    local launch=(accelerate launch --config_file "$config" --num_processes 1)
    if [[ $DRY == 1 ]]; then
        note "dry run: would run ${launch[*]} ${args[*]} --max_steps_this_run 2; then --resume_from_checkpoint latest"
        return
    fi
    run "${name}_first" 70 "${launch[@]}" "${args[@]}" --max_steps_this_run 2
    run "${name}_resume" 50 "${launch[@]}" "${args[@]}" --resume_from_checkpoint latest
    ls -R "$dir" >"$OUT/${name}_files.txt" 2>&1
}
engine fsdp configuration/accelerate/fsdp.yaml
if python -c "import deepspeed" >/dev/null 2>&1 || [[ $DRY == 1 ]]; then
    engine deepspeed configuration/accelerate/deepspeed_zero2.yaml
else
    note "deepspeed: not installed on this machine (pip install deepspeed); skipped"
fi
for batch in "${LATER[@]}"; do bench "$batch"; done
note "done: $(date -u +%FT%TZ) after $SECONDS s"
