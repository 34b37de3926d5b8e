"""Planted semantic change: do the methods find the planted words and their change years?

Generates a planted-drift corpus in the dated-folder format (goldstone_cli/analysis/planted.py:
topics of words, three words that switch topic at 1915, 1930 and 1945, three stable controls),
prepares it (`goldstone data prepare corpus`), trains DWE three ways with the same data, steps and
seed, and scores each run with `goldstone eval changes` (precision of the top 3 of `goldstone
changes` first vs last step; change year from each planted word's distance curve):

- Goldstone-GD: optimizer=goldstone optimizer.base=adam optimizer.k1=10 (procrustes gauge steps);
- the Adam baseline: optimizer=adam;
- no prior + alignment: optimizer=adam model.coupled=false, then chain Procrustes alignment.

All three use Adam with rho_s = 0.1 (1000/(s+1000))^0.7 (explicit overrides, no presets).

    python -m bench.planted_drift --out bench/results/planted [--steps 300] [--bins 5,1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = {
    "Goldstone-GD (procrustes, k1=10)": ["optimizer=goldstone", "optimizer.base=adam", "optimizer.k1=10"],
    "Adam baseline": ["optimizer=adam"],
    "no prior + alignment": ["optimizer=adam", "model.coupled=false"],
}
ADAM = ["optimizer.lr=0.1", "optimizer.schedule=decay", "optimizer.decay_steps=1000", "optimizer.decay_power=0.7"]


def run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    res = subprocess.run([sys.executable, "-m", "goldstone_cli", *cmd], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"failed: goldstone {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/planted"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bins", default="5,1", help="bin widths in years, comma-separated (5: T=12, 1: T=60)")
    ap.add_argument("--sentences", type=int, default=150, help="sentences per year")
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from goldstone_cli.analysis.planted import make_dated_corpus

    out = args.out
    corpus = out / "corpus"
    make_dated_corpus(corpus, sentences_per_year=args.sentences, seed=args.seed, force=True)
    rows = []
    for b in [int(x) for x in args.bins.split(",")]:
        prep = out / f"prepared-{b}y"
        run(["data", "prepare", "corpus", "--source", str(corpus / "texts"), "--out", str(prep), "--bin-years", str(b),
             "--vocab", "500", "--force", "-q"])
        common = ["model=dwe", "data=cooc", f"data.path={prep}", f"model.d={args.d}", "model.batch_words=0",
                  "model.batch_contexts=0", "model.test_steps=0", "model.test_mass=0", f"trainer.steps={args.steps}",
                  f"trainer.eval_every={args.steps}", f"trainer.checkpoint_every={args.steps}", "trainer.progress=false",
                  f"seed={args.seed}", *ADAM]
        for name, over in METHODS.items():
            rd = out / "runs" / f"{b}y-{name.split()[0].lower()}-{over[-1].split('=')[-1]}"
            run(["train", *common, *over, f"run_dir={rd}"])
            run(["eval", "changes", str(rd), "--planted", str(corpus)])
            res = json.loads((rd / "analysis" / "eval_changes.json").read_text())
            summ = json.loads((rd / "summary.json").read_text())
            rows.append((b, name, res, summ))
            print(f"{b}y {name}: precision@3 {res['precision_at_k']:.2f}, ranks {res['ranks']}, change years "
                  f"{res['years_found']} (true {res['years_true']}), error {res['year_error']:.1f} y", flush=True)
    print("\n| bins | T | method | precision of the top 3 | ranks of drift0/1/2 | change-year error (years, mean) | years found |")
    print("| --- | ---: | --- | ---: | --- | ---: | --- |")
    for b, name, res, summ in rows:
        T = 60 // b
        ranks = "/".join(str(res["ranks"][w]) for w in sorted(res["ranks"]))
        found = ", ".join(str(res["years_found"][w]) for w in sorted(res["years_found"]))
        print(f"| {b} y | {T} | {name} | {res['precision_at_k']:.2f} | {ranks} | {res['year_error']:.1f} | {found} |")


if __name__ == "__main__":
    main()
