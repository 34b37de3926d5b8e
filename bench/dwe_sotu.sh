#!/usr/bin/env bash
# The sotu results of docs/benchmarks.md (DWE, Sec. 5.3 on the State of the Union corpus):
# Goldstone-GD (procrustes and natural gauge solvers) vs the Adam baseline vs the aligned
# baseline (no chain prior, Procrustes alignment after training), same steps, same data, same seed.
# Usage: bash bench/dwe_sotu.sh [STEPS]   (one run after the other; runs go to outputs/dwe/sotu-*)
set -euo pipefail
STEPS=${1:-800}
# data.bin_years=10 data.keep_words=[] model.val_mass=0: the settings these results were measured with
# (before model=dwe's defaults became yearly steps with the Table 2 words kept and a validation set)
COMMON="model=dwe data.bin_years=10 data.keep_words=[] model.val_mass=0 data.vocab_size=2000 model.d=32 \
model.batch_words=500 model.batch_contexts=500 trainer.steps=$STEPS trainer.eval_every=200 trainer.checkpoint_every=200 \
trainer.progress=false"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m goldstone_cli train $COMMON optimizer.solver=procrustes run_dir=outputs/dwe/sotu-goldstone-procrustes
python -m goldstone_cli train $COMMON optimizer=adam run_dir=outputs/dwe/sotu-adam
python -m goldstone_cli train $COMMON optimizer=adam model.coupled=false run_dir=outputs/dwe/sotu-uncoupled
python -m goldstone_cli train $COMMON optimizer.solver=natural optimizer.keep_gauge_fields=false \
  optimizer.lr_scale=0.25 optimizer.rotation=expm run_dir=outputs/dwe/sotu-goldstone-natural
# Fig. 4 and its quantiles (all words; words with co-occurrence mass >= 100 in 1790-1799 and 2020-2029)
R="outputs/dwe/sotu-goldstone-procrustes outputs/dwe/sotu-goldstone-natural outputs/dwe/sotu-adam outputs/dwe/sotu-uncoupled"
python -m goldstone_cli plot cosines $R --out outputs/dwe/fig4_sotu.png
python -m goldstone_cli plot cosines $R --min-count 100 --out outputs/dwe/fig4_sotu_min100.png
python -m goldstone_cli age-words government war nation railroad constitution people navy liberty \
  --run outputs/dwe/sotu-goldstone-procrustes --compare outputs/dwe/sotu-adam --min-count 100
