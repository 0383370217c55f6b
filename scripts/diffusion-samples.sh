#!/usr/bin/env bash
# Draws the README's sample grids: three held-out prompts, eight seeds each, at a fixed 50
# DDIM steps and at the steps the committed predictor gives, into docs/diffusion/.
# Usage: scripts/diffusion-samples.sh [MODEL]   (default unet-fashion-mnist)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-unet-fashion-mnist}"
OUT=docs/diffusion
mkdir -p "$OUT"
i=0
for prompt in "a small black and white photo of skinny jeans" \
              "an image of a heeled bootie" \
              "a flowing midi dress, catalogue picture"; do
  i=$((i + 1))
  for steps in 50 predicted; do
    cargo dynexec --threads 2 --quiet --json diffuse --model "$MODEL" --prompt "$prompt" \
      --n 8 --steps "$steps" --out "$OUT/prompt$i-$steps.png"
  done
done
