#!/usr/bin/env bash
# DWE on the State of the Union corpus with one time step per year (1790-2026, T=237, as the paper's
# 209 yearly steps of Google Books): Goldstone-GD (procrustes, natural) vs the Adam baseline vs no chain
# prior + Procrustes alignment, same steps, data, split and seed; then Fig. 4 and Table 2 (`age-words`).
# With many steps and little text per year the baseline's Goldstone modes are what Fig. 4 of the paper
# shows. Two runs at a time side by side (one thread each; two rounds of ~15 minutes for 600 steps on
# a 2-core machine). Results: docs/benchmarks.md.
# Usage: bash bench/dwe_sotu_yearly.sh [STEPS]      (runs go to outputs/dwe/sotu1y-*)
set -euo pipefail
STEPS=${1:-600}
# data.keep_words=[] model.val_mass=0: the settings these results were measured with (before model=dwe
# kept the Table 2 words in the vocabulary and held out a validation set)
COMMON="model=dwe data.bin_years=1 data.keep_words=[] model.val_mass=0 data.vocab_size=1000 model.d=32 model.batch_words=300 \
model.batch_contexts=300 trainer.steps=$STEPS trainer.eval_every=100 trainer.checkpoint_every=100 trainer.progress=false"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m goldstone_cli train $COMMON optimizer.solver=procrustes run_dir=outputs/dwe/sotu1y-goldstone-procrustes &
GS=$!
python -m goldstone_cli train $COMMON optimizer=adam run_dir=outputs/dwe/sotu1y-adam
wait $GS
# the other two of the decade table: the natural solver, and no chain prior + Procrustes alignment
python -m goldstone_cli train $COMMON optimizer.solver=natural optimizer.keep_gauge_fields=false \
  optimizer.lr_scale=0.25 optimizer.rotation=expm run_dir=outputs/dwe/sotu1y-goldstone-natural &
GS=$!
python -m goldstone_cli train $COMMON optimizer=adam model.coupled=false run_dir=outputs/dwe/sotu1y-uncoupled
wait $GS
R="outputs/dwe/sotu1y-goldstone-procrustes outputs/dwe/sotu1y-adam outputs/dwe/sotu1y-goldstone-natural outputs/dwe/sotu1y-uncoupled"
python -m goldstone_cli plot cosines $R --out outputs/dwe/fig4_sotu_yearly.png
python -m goldstone_cli plot cosines $R --min-count 100 --out outputs/dwe/fig4_sotu_yearly_min100.png
python -m goldstone_cli age-words government war nation people navy liberty congress peace \
  --run outputs/dwe/sotu1y-goldstone-procrustes --compare outputs/dwe/sotu1y-adam --min-count 20
