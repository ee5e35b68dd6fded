#!/usr/bin/env bash
# The device check: our ViT-S/16 train step beside the authors' (the PyTorch peer in
# shared/bench/) on one GPU, in one call, one table.
#
#   bash benchmarks/gpu_check.sh --prepare      # here, once: the wheel and the peer to carry
#   # then the device tool: run(command="bash benchmarks/gpu_check.sh",
#   #                           carry=[".whl", "shared"], timeout_s=540)
#
# --prepare (on this machine, with network): downloads ml-collections (the one package our
# configs need that the device image lacks) into .whl/ and copies ../shared/bench into
# shared/bench/, both ignored by git (.git/info/exclude) and carried by the call.
# On the device: installs the carried wheel if ml_collections is missing; times the peer's
# ViT-S/16 full step and backbone-only step (batch 128, 2 x 224 + 10 x 96, K = 8192, compiled),
# then ours (configs/vits.py at batch 128, views given as float32 like the peer's, bfloat16; XLA
# attention, then the full step with cuDNN attention); writes $OUT/peer_results.jsonl,
# $OUT/ours.jsonl, $OUT/compare.md and $OUT/log.txt. Every part runs under its own timeout, so
# one that hangs leaves the others' figures. GPU_CHECK_ARGS adds flags to ours, PEER_ARGS to the
# peer's (a CPU dry run: PEER_DEVICE=cpu PEER_ARGS="--batch 2 --steps 1 --warmup 1
# --no-compile" GPU_CHECK_ARGS="--batch=2 --steps=1 --warmup=1").
set -u
cd "$(dirname "$0")/.." || exit 1
if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  grep -qx '/shared/' .git/info/exclude 2>/dev/null || echo '/shared/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl 'ml-collections==1.1.0'
  mkdir -p shared && cp -r ../shared/bench shared/
  echo "prepared: $(ls .whl) and shared/bench ($(du -sh .whl shared | awk '{print $1}' | paste -sd+))"
  exit 0
fi
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
: > "$OUT/ours.jsonl"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
if ! python3 -c 'import ml_collections' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
echo "# $(date -u +%FT%TZ) the peer"
PEER_ONLY='^(small_full_sdpa|small_backbone_sdpa)$' PEER_BUDGET=200 RESULTS="$OUT" \
    timeout -k 5 260 bash shared/bench/run_peer_gpu.sh
echo "# $(date -u +%FT%TZ) ours, XLA attention"
# shellcheck disable=SC2086
timeout -k 5 150 python3 benchmarks/train_step.py --gpu --archs=s --modes=full,backbone \
    --augment=host --json="$OUT/ours.jsonl" ${GPU_CHECK_ARGS:-}
echo "# $(date -u +%FT%TZ) ours, cuDNN attention"
# shellcheck disable=SC2086
timeout -k 5 90 python3 benchmarks/train_step.py --gpu --archs=s --modes=full \
    --augment=host --attention=cudnn --json="$OUT/ours.jsonl" ${GPU_CHECK_ARGS:-}
echo "# $(date -u +%FT%TZ) side by side"
python3 benchmarks/gpu_compare.py "$OUT/peer_results.jsonl" "$OUT/ours.jsonl" | tee "$OUT/compare.md"
