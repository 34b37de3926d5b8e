#!/usr/bin/env bash
# The sotu results of docs/benchmarks.md (DWE, Sec. 5.3 on the State of the Union corpus):
# Goldstone-GD (procrustes gauge solver) vs the Adam baseline vs the aligned
# baseline (no chain prior, Procrustes alignment after training), same steps, same data, same seed.
# Usage: bash bench/dwe_sotu.sh [STEPS]   (one run after the other; runs go to outputs/dwe/sotu-*)
set -euo pipefail
STEPS=${1:-800}
COMMON="model=dwe data.vocab_size=2000 model.d=32 model.batch_words=500 model.batch_contexts=500 \
trainer.steps=$STEPS trainer.eval_every=200 trainer.checkpoint_every=200 trainer.progress=false"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m goldstone_cli train $COMMON optimizer.solver=procrustes run_dir=outputs/dwe/sotu-goldstone-procrustes
python -m goldstone_cli train $COMMON optimizer=adam_dwe run_dir=outputs/dwe/sotu-adam
python -m goldstone_cli train $COMMON optimizer=adam_dwe model.coupled=false run_dir=outputs/dwe/sotu-uncoupled
