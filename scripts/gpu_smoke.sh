#!/usr/bin/env bash
# GPU smoke test: every model script on generated rehearsal data with --device cuda, AMP and
# --compile where the script has them (channels-last is automatic for CNNs on CUDA: the resnet,
# cnn-features and RN50 colour runs take that path), then a 2-process torchrun of
# train_clip_arcface.py, then ensemble.py over the runs. Random or tiny weights only
# (--weights none, a tiny BLIP built here): nothing is downloaded. Aimed at under 5 minutes.
#
#   bash scripts/gpu_smoke.sh                 # work folder: a new temp folder (kept, printed)
#   GPU_SMOKE_DIR=/tmp/smoke bash scripts/gpu_smoke.sh
#   GPU_SMOKE_DEVICE=cpu bash scripts/gpu_smoke.sh   # the same commands on the CPU, small data, no --compile:
#                                                    # checks the script itself, not a GPU
#
# Without a CUDA GPU (and GPU_SMOKE_DEVICE unset) it prints one "no GPU" line and exits 0. Exit 1 when any step fails;
# the last lines are a table of steps, seconds and status, and each step's log is kept.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TIMM_OFFLINE=1
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python

DEVICE=${GPU_SMOKE_DEVICE:-cuda}
COMPILE=(--compile) WORKERS=4 DATA_SIZE=()
if [ "$DEVICE" = cpu ]; then
    gpus=0 COMPILE=() WORKERS=0 DATA_SIZE=(--train-identities 12 --test-identities 8 --size 48)
    echo "GPU_SMOKE_DEVICE=cpu: the smoke commands on the CPU (a check of this script, not of a GPU)"
elif ! gpus=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null) || [ "$gpus" = "0" ]; then
    echo "no GPU: torch sees no CUDA device here; gpu_smoke.sh checks nothing on this machine (exit 0)"
    exit 0
fi

OUT=${GPU_SMOKE_DIR:-$(mktemp -d -t gpu_smoke.XXXXXX)}
DATA=$OUT/data RUNS=$OUT/runs LOGS=$OUT/logs
mkdir -p "$LOGS"
[ "$gpus" -gt 0 ] && echo "gpu_smoke: $gpus GPU(s): $($PY -c 'import torch; print(torch.cuda.get_device_name(0))')"
echo "gpu_smoke: work folder $OUT"
start_all=$(date +%s)
failed=0
summary=""

step() {  # step NAME CMD...: run, time, keep the log, record the status
    local name=$1; shift
    local t0 rc
    t0=$(date +%s)
    "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then status=ok; else status="FAILED (exit $rc; $LOGS/$name.log)"; failed=1; tail -5 "$LOGS/$name.log"; fi
    summary+=$(printf "%-22s %5ss  %s" "$name" "$dt" "$status")$'\n'
    echo "$name: $status (${dt}s)"
}

step data $PY -m utils.data.rehearsal_data --out "$DATA" --overwrite "${DATA_SIZE[@]}"

# a tiny random BLIP captioner and a tiny open_clip config with a text tower, for infer_caption_match.py
step tiny_models $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
import torch
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

out = Path(sys.argv[1])
words = "a photo of the dog cat red blue green square circle star on white black background painting sketch".split()
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words]
tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, bos_token="[DEC]")
config = BlipConfig(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
    text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     encoder_hidden_size=32, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                     pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id),
    projection_dim=32,
)
torch.manual_seed(0)
BlipForConditionalGeneration(config).save_pretrained(out / "tiny_blip")
BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out / "tiny_blip")
(out / "tiny-clip-text.json").write_text(json.dumps({
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}))
EOF

COMMON=(--data "$DATA" --runs "$RUNS" --device "$DEVICE" --workers "$WORKERS")
step train_resnet $PY train_resnet.py "${COMMON[@]}" --model resnet18 --weights none --img-size 64 \
    --epochs 1 --max-steps 30 --amp "${COMPILE[@]}"
step train_clip_arcface $PY train_clip_arcface.py "${COMMON[@]}" --model ViT-B-32 --weights none --img-size 64 \
    --unfreeze 2 --epochs 1 --max-steps 30 --amp "${COMPILE[@]}"
step infer_cnn_features $PY infer_cnn_features.py "${COMMON[@]}" --model resnet18 --weights none --img-size 64 --amp
step infer_clip_colour $PY infer_clip_colour.py "${COMMON[@]}" --model RN50 --weights none --img-size 64 --amp
step infer_caption_match $PY infer_caption_match.py "${COMMON[@]}" --model "$OUT/tiny-clip-text.json" --weights none \
    --captioner "$OUT/tiny_blip" --max-new-tokens 8 --num-beams 1 --amp
step infer_facenet $PY infer_facenet.py "${COMMON[@]}" --embedder facenet --weights none --detector mtcnn --amp
step train_face_adapter $PY train_face_adapter.py --data "$DATA" --runs "$RUNS" --device "$DEVICE" --source facenet \
    --adapter mlp --epochs 1 --max-steps 30

# two processes under torchrun: NCCL with one GPU each where there are two, else gloo on the CPU
# (NCCL refuses two ranks on one GPU); rank 0 embeds with the DDP-trained tower
if [ "$gpus" -ge 2 ]; then ddp_device=cuda; else ddp_device=cpu; echo "torchrun: $gpus GPU, so the 2 ranks run on the CPU (gloo)"; fi
step torchrun_clip_2proc $PY -m torch.distributed.run --standalone --nproc_per_node=2 train_clip_arcface.py \
    --data "$DATA" --runs "$RUNS" --run-name clip_ddp --device $ddp_device --workers 0 --model ViT-B-32 --weights none \
    --img-size 64 --unfreeze 1 --epochs 1 --max-steps 10 --batch-size 16 --amp
step ensemble $PY ensemble.py --runs "$RUNS" --data "$DATA" --auto

total=$(( $(date +%s) - start_all ))
echo
printf "%-22s %6s  %s\n" step time status
printf "%s" "$summary"
printf "%-22s %5ss  %s\n" total "$total" "$([ $total -le 300 ] && echo 'within 5 minutes' || echo 'OVER 5 minutes')"
[ $failed -eq 0 ] && echo "gpu_smoke: every step passed" || echo "gpu_smoke: some steps FAILED (logs in $LOGS)"
exit $failed
