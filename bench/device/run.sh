#!/usr/bin/env bash
# Run ON THE GPU MACHINE (the `run` tool), from the repository root; see bench/device/README.md.
#   bash bench/device/run.sh STEP       STEP: sql | anchor | shape-1b | shape-8b | plan
# Needs the first half of the model in /tmp/tunelab-device (call 1) and .device/part2 carried (this call).
# Results go to $OUT (JSON per bench run, logs).
set -uo pipefail
step=${1:?usage: run.sh sql|anchor|shape-1b|shape-8b|plan}
out=${OUT:-/tmp/tunelab-out}; mkdir -p "$out"
stash=/tmp/tunelab-device
[ -f "$stash/model.part-aa" ] || { echo "no $stash/model.part-aa: run call 1 first (bench/device/README.md)"; exit 2; }
export TUNELAB_CACHE=$stash/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
gguf_dir=$TUNELAB_CACHE/gguf; mkdir -p "$gguf_dir"
model_file=$gguf_dir/$(cat .device/part2/model.name)
[ -f "$model_file" ] || cat "$stash/model.part-aa" .device/part2/model.part-ab > "$model_file"
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/part2/wheels/*.whl || exit 3
fi
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
sbs="python3 bench/side_by_side.py --device cuda --peak-tflops 790"
shape="--examples 48 --steps 6 --batch-size 8 --max-length 2048 --model-dtype bfloat16 --lora-alpha 16 --lora-dropout 0"
case $step in
  sql)  # the anchors' SmolLM2 job: 1,500 schema-in-prompt examples x 2 epochs at batch 16 = 188 steps
    $sbs --schema-in-prompt --examples 1500 --steps 188 --batch-size 16 --packing --workdir /tmp/sbs-sql \
      --out "$out/sql.json" 2>&1 | tee "$out/sql.log" ;;
  anchor)  # time to the anchors' accuracy through tunelab train: their settings, then a faster recipe
    python3 bench/anchor_sql.py --out /tmp/anchor-default 2>&1 | tee "$out/anchor.log"
    cp /tmp/anchor-default/anchor_summary.json "$out/anchor-default.json"
    python3 bench/anchor_sql.py --out /tmp/anchor-fast method.dropout=0 train.batch_size=64 train.lr=1e-3 \
      train.warmup_ratio=0.05 train.packing=true 2>&1 | tee -a "$out/anchor.log"
    cp /tmp/anchor-fast/anchor_summary.json "$out/anchor-fast.json" ;;
  shape-1b)  # HF + peft with checkpointing (the anchors' baseline) vs tunelab: auto, no checkpointing, liger
    $sbs --shape llama-3.2-1b $shape --plain-checkpointing --runners a,c --workdir /tmp/sbs-1b \
      --out "$out/1b-auto.json" 2>&1 | tee "$out/1b.log"
    $sbs --shape llama-3.2-1b $shape --runners c --tunelab-checkpointing false --workdir /tmp/sbs-1b \
      --out "$out/1b-nockpt.json" 2>&1 | tee -a "$out/1b.log"
    $sbs --shape llama-3.2-1b $shape --runners c --tunelab-checkpointing false --tunelab-kernels liger \
      --workdir /tmp/sbs-1b --out "$out/1b-liger.json" 2>&1 | tee -a "$out/1b.log" ;;
  shape-8b)
    $sbs --shape llama-3.1-8b --examples 16 --steps 4 --batch-size 4 --max-length 2048 --model-dtype bfloat16 \
      --lora-alpha 16 --lora-dropout 0 --plain-checkpointing --runners a,c --workdir /tmp/sbs-8b \
      --out "$out/8b.json" 2>&1 | tee "$out/8b.log" ;;
  plan)  # the planner's predictions on this GPU for the configurations above
    for pair in /tmp/sbs-1b:8 /tmp/sbs-8b:4; do
      for d in "${pair%:*}"/model-*; do
        [ -d "$d" ] || continue
        for ck in auto false true; do
          python3 -m tunelab plan configs/smollm2-135m-instruct/sft_lora_sql.yaml "model=$d" model.dtype=bfloat16 \
            method.alpha=16 data.max_length=2048 "train.batch_size=${pair#*:}" train.gradient_checkpointing=$ck \
            2>&1 | tee -a "$out/plan.log"
        done
      done
    done ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
