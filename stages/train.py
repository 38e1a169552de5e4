"""DVC stage: data/tokens -> checkpoints/best (HF layout), metrics/train.json, plots/train.csv.

Runs as `python -m stages.train`, or `torchrun --nproc_per_node=N -m stages.train` for DDP.
"""

from pathlib import Path

from gemma3.errors import run_main
from gemma3.fileio import recover_dir
from gemma3.params import load_params
from gemma3.runtime import exit_with_parent
from gemma3.train import TrainPaths, train

PATHS = TrainPaths(
    data_dir=Path("data/tokens"),
    best_dir=Path("checkpoints/best"),
    state_dir=Path("checkpoints/state"),
    metrics=Path("metrics/train.json"),
    plots=Path("plots/train.csv"),
)


def main() -> None:
    exit_with_parent()  # dvc killed with -9 must not leave this trainer running
    p = load_params()
    for directory in (PATHS.best_dir, PATHS.state_dir):
        recover_dir(directory)  # a save killed between its two renames left it as .<name>.old

    made = []

    def tracker(run_id, runtime, cfg):
        from gemma3.tracking import start_run

        made.append(
            start_run(
                enabled=p.tracking.enabled,
                experiment=p.tracking.experiment,
                run_id=run_id,
                tags={"preset": cfg.name, "device": str(runtime.device), "stage": "train"},
                registered_model=p.tracking.registered_model or None,
                data_dir=PATHS.data_dir,
                system_metrics=p.tracking.system_metrics,
            )
        )
        return made[-1]

    metrics = train(p, PATHS, tracker_factory=tracker if p.tracking.enabled else None)
    if metrics:
        print(
            f"train: best val loss {metrics['best_val_loss']} at step {metrics['best_step']} "
            f"({metrics['device']}, {metrics['precision']})"
        )
        for line in made[-1].summary() if made else []:
            print(line)  # the MLflow run (id, UI address) and the registered version's aliases


if __name__ == "__main__":
    run_main(main, prog="train")
