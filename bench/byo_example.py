"""The README's worked example of "Bring your own data and model", run end to end and measured (issue 33, item 6).

A public table that ships with scikit-learn (the Wisconsin breast cancer table: 569 patients, 30 measurements,
the diagnosis as text) is written as a team's Parquet file (examples/breast_cancer/make_table.py), imported with
``dynmm data prepare table`` (three modalities: the ten "mean", "error" and "worst" measurements; standardised,
stratified 0.7/0.15/0.15), then tuned twice, each ``dynmm tune`` a process of its own in one fresh
``DYNMM_HOME``: with no code (``model.name: late-fusion``, examples/breast_cancer/late_fusion.yaml) and with the
team's own experts (``cancer_experts:build`` beside examples/breast_cancer/own_model.yaml).

Reported per study, as the study itself reports them: wall time; the front chosen on validation (members, the
knee's validation and test accuracy and its compute saved against the full path); each expert alone on
validation (the static models); random routing at the knee's compute on validation (the experts mixed at random
in the knee's shares, the strongest trivial baseline); the hypervolume beyond random routing.

    .venv/bin/python bench/byo_example.py [--trials 32]

Last line: JSON with, per study (``late_fusion``, ``own_model``): ``wall_seconds``, ``front_size``,
``knee_val_accuracy``, ``knee_test_accuracy``, ``knee_compute_saved``, ``knee_vs_random_val_pt``,
``experts_alone_val``, ``hypervolume_beyond_random``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sklearn.datasets import load_breast_cancer

from dynmm.tune.random_routing import curve_quality

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "breast_cancer"
DYNMM = Path(sys.executable).parent / "dynmm"
STUDIES = {"late_fusion": EXAMPLE / "late_fusion.yaml", "own_model": EXAMPLE / "own_model.yaml"}


def run(command: list[str], env: dict) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({done.returncode}):\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")
    return done.stdout


def prepare(home: Path, env: dict) -> Path:
    table = Path(run([sys.executable, str(EXAMPLE / "make_table.py"), str(home / "breast_cancer.parquet")],
                     env).strip())
    names = list(load_breast_cancer().feature_names)
    groups = {"mean": [n for n in names if n.startswith("mean ")], "error": [n for n in names if n.endswith(" error")],
              "worst": [n for n in names if n.startswith("worst ")]}
    out = home / "data" / "breast-cancer"
    command = [str(DYNMM), "data", "prepare", "table", "--src", str(table), "--out", str(out), "--label",
               "diagnosis", "--task", "multiclass", "--id-column", "patient id"]
    for modality, columns in groups.items():
        command += ["--modality", f"{modality}={','.join(columns)}"]
    run(command, env)
    return out


def study(name: str, pipeline: Path, dataset: Path, home: Path, env: dict, trials: int) -> dict:
    command = [str(DYNMM), "tune", str(pipeline), "--set", f"data.dataset={dataset}", "--set",
               f"search.num_trials={trials}", "--set", f"tracking.uri=sqlite:///{home / 'mlflow.db'}"]
    started = time.perf_counter()
    output = run(command, env)
    wall = time.perf_counter() - started
    front = json.loads(Path(re.search(r"^\s+front\s+(\S+front\.json)", output, re.MULTILINE)[1]).read_text())
    full = max(baseline["gflops"] for baseline in front["baselines"])
    result = {
        "study": name, "wall_seconds": round(wall, 1), "front_size": len(front["members"]),
        "knee_val_accuracy": None, "knee_test_accuracy": None, "knee_compute_saved": None,
        "knee_vs_random_val_pt": None,
        "experts_alone_val": {b["name"]: round(b["quality"], 4) for b in front["baselines"]},
        "hypervolume_beyond_random": round(front.get("hypervolume_beyond_random") or 0.0, 4),
        "members": [(m["trial_id"], round(m["values"][0], 4), round(m["test_metrics"]["test_accuracy"], 4),
                     round(1 - m["values"][1] / full, 3)) for m in front["members"]],
        "summary": output[output.find("Pareto front"):output.find("Registered model")].rstrip(),
    }
    knee = [member for member in front["members"] if member["trial_id"] == front.get("knee_trial_id")]
    if knee:  # an empty front: no gated model beat the experts alone
        knee_val, knee_gflops = knee[0]["values"]
        random_val = curve_quality([tuple(point) for point in front["random_routing"]], knee_gflops)
        result.update(knee_val_accuracy=round(knee_val, 4),
                      knee_test_accuracy=round(knee[0]["test_metrics"]["test_accuracy"], 4),
                      knee_compute_saved=round(1 - knee_gflops / full, 3),
                      knee_vs_random_val_pt=round(100 * (knee_val - random_val), 2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dynmm-byo-") as folder:
        home = Path(folder)
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
        env["DYNMM_HOME"] = str(home / "home")
        dataset = prepare(home, env)
        results = {name: study(name, pipeline, dataset, home, env, args.trials) for name, pipeline in STUDIES.items()}
    for result in results.values():
        print(f"\n{result['study']}: {args.trials} trials in {result['wall_seconds']} s; front of "
              f"{result['front_size']}, hypervolume beyond random routing {result['hypervolume_beyond_random']}")
        print(result["summary"])
        print(f"  experts alone (val): {result['experts_alone_val']}")
        if result["knee_val_accuracy"] is not None:
            print(f"  knee: val {result['knee_val_accuracy']}, test {result['knee_test_accuracy']}, "
                  f"{result['knee_compute_saved']:.1%} less compute than the full path, "
                  f"{result['knee_vs_random_val_pt']:+.2f} pt over random routing at its compute (val)")
    print(json.dumps({name: {k: v for k, v in result.items() if k not in ("study", "members", "summary")}
                      for name, result in results.items()}))


if __name__ == "__main__":
    main()
