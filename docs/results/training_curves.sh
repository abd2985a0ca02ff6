#!/bin/bash
# Regenerates docs/results/training_curves.svg from the metrics and held-out figures in docs/results
# and the bundles (tokens: each run's steps x batch tokens, after what it started from).
cd "$(dirname "$0")/../.." || exit 1
.venv/bin/python scripts/plot_training.py \
 --run "SmolLM2 skip PLT (1024 BatchTopK, k 48)=docs/results/train_smollm2_plt1024_skip_metrics.jsonl:1024" \
 --run "Gemma-3 skip PLT (bundled)=docs/results/train_gemma3_plt1024_skip_metrics.jsonl:1024" \
 --run "SmolLM2 wclt3, then 5e-4=docs/results/train_smollm2_wclt3_cont_l5e-4_metrics.jsonl:512" \
 --run "SmolLM2 wclt3, then 2.5e-4 (bundled)=docs/results/train_smollm2_wclt3_cont2_l2.5e-4_metrics.jsonl:512" \
 --heldout "SmolLM2 skip PLT (1024 BatchTopK, k 48)=245760:docs/results/compare_smollm2_plt1024skip_240.json" \
 --heldout "SmolLM2 skip PLT (1024 BatchTopK, k 48)=1024000:docs/results/compare_smollm2_plt1024skip_1000.json" \
 --heldout "Gemma-3 skip PLT (bundled)=307200:clt/bundled/gemma3-270m/info.json" \
 --heldout "SmolLM2 wclt3, penalty 2e-3=307200:docs/results/compare_smollm2_wclt3_bundled.json" \
 --heldout "SmolLM2 wclt3, penalty 2e-3=2764800:docs/results/compare_smollm2_wclt3_cont4800.json#wclt3_cont4800" \
 --heldout "SmolLM2 wclt3, then 5e-4=1950720:docs/results/compare_smollm2_wclt3_cont_l5e-4_3210.json" \
 --heldout "SmolLM2 wclt3, then 5e-4=3379200:docs/results/compare_smollm2_wclt3_cont_l5e-4_6000.json" \
 --heldout "SmolLM2 wclt3, then 2.5e-4 (bundled)=4915200:docs/results/compare_smollm2_wclt3_cont2_l2.5e-4_3000.json" \
 --run "SmolLM2 wclt3, 2.5e-4 for 3,000 more=docs/results/train_smollm2_wclt3_cont3_l2.5e-4_metrics.jsonl:512" \
 --heldout "SmolLM2 wclt3, 2.5e-4 for 3,000 more=6451200:docs/results/compare_smollm2_wclt3_cont3_l2.5e-4_3000.json" \
 -o docs/results/training_curves.svg
