import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Trained:
    """The shared trained baseline (read-only: copy it with `repo_copy` to change anything)."""

    repo: Path
    run_commit: str  # the commit the baseline trained at (MLflow's git tags point here)


def shared_build(
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    name: str,
    build: Callable[[Path], object],
) -> Path:
    """`build(root)` once per test session, shared by all xdist workers through a file lock
    (a module/session fixture alone is built once per worker). A build that raised (or skipped)
    is not marked done, and the next caller starts it again from an empty directory."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: share the build with the others
        base = base.parent
    root = base / name
    with FileLock(str(base / f"{name}.lock")):
        if not (base / f"{name}.done").is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed half way
            root.mkdir()
            build(root)
            (base / f"{name}.done").touch()
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Trained:
    """One tiny pipeline, trained and committed once per test session (one build shared by all
    xdist workers), for the pipeline, sharing and tracking tests."""
    from tests.dvcrepo import build_trained_repo

    root = shared_build(tmp_path_factory, request, "trained-baseline", build_trained_repo)
    return Trained(root / "repo", (root / "run_commit").read_text(encoding="utf-8"))


@pytest.fixture
def repo_copy(trained: Trained, tmp_path: Path) -> Path:
    """A private, writable copy of the trained baseline."""
    from tests.dvcrepo import copy_repo

    return copy_repo(trained.repo, tmp_path / "repo")


# The experiments the `queued` repo ran (train.lr; the baseline's is 0.003).
QUEUED = {"lr-high": 0.004, "lr-low": 0.001}


@pytest.fixture(scope="session")
def queued(
    trained: Trained, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Path:
    """The baseline with QUEUED run as DVC's queue runs them (`dvc exp run --queue`, then
    `--run-all -j 2`: two temporary copies training at once), built once per session for the
    tests that read what a queue leaves. Read-only: `copy_repo` it first (dvc takes its lock
    even to read)."""
    from tests.dvcrepo import copy_repo, sh

    def build(root: Path) -> None:
        repo = copy_repo(trained.repo, root / "repo")
        for name, lr in QUEUED.items():
            sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], repo)
        sh(["dvc", "exp", "run", "--run-all", "-j", "2"], repo)

    return shared_build(tmp_path_factory, request, "queued", build) / "repo"


# Measured wall times (s) of the slowest tests, all cases of a parametrized test together,
# `pytest -n 3 --durations=80` on 2026-12-01 (a quiet 2-core machine, one torch thread per
# worker; setup included where a test builds a shared fixture; the queued tests as they share
# the `queued` build since). Used only to order the run, never to select or skip: a name that no
# longer matches just loses its place.
SLOW_FIRST = {
    "tests/test_engine_precision.py::test_compiled_training_step_matches_eager": 134,
    "tests/test_pipeline.py::test_queued_experiments_plots_and_leaderboard": 110,
    "tests/test_sharing.py::test_readme_walkthrough_replayed_verbatim": 83,
    "tests/test_repro_failures.py::test_failed_repro_leaves_previous_outputs_intact": 82,
    "tests/test_bench_gpu.py::test_dry_run_without_git_and_out_of_time_writes_the_table_to_out": 66,
    "tests/test_registry.py::test_a_queued_grid_records_the_md5_of_the_tokens_each_run_trained_on": 50,
    "tests/test_serving.py::test_served_champion_is_bounded_like_the_cli": 48,
    "tests/test_live_metrics.py::test_dvc_exp_run_with_new_params_reads_as_a_new_run_and_exp_show_is_namespaced": 48,
    "tests/test_install.py::test_library_install_loads_a_checkpoint_and_generates": 48,
    "tests/test_resume_padding.py::test_state_resumes_across_vocab_padding_and_ends_where_an_uninterrupted_run_ends": 47,
    "tests/test_faults.py::test_kill_during_the_state_write_keeps_the_previous_state_and_resumes": 46,
    "tests/test_faults.py::test_kill_during_the_best_checkpoint_write_keeps_the_previous_one": 44,
    "tests/test_data_dvc.py::test_editing_a_local_source_reruns_download_and_clones_agree": 44,
    "tests/test_tracking.py::test_a_locked_store_mid_run_still_ends_the_run_finished_with_its_model": 40,
    "tests/test_train.py::test_resume_after_sigkill_equals_uninterrupted_run": 38,
    "tests/test_bad_input.py::test_temperature_below_fp32_range_decodes_greedily_in_cli_and_stage": 34,
    "tests/test_tracking.py::test_hung_tracking_server_costs_one_short_timeout_per_stage": 31,
    "tests/test_engine_inputs.py::test_fresh_run_failing_under_dvc_repro_keeps_previous_checkpoints": 31,
    "tests/test_engine_ddp.py::test_resume_with_state_only_on_rank0_disk_after_a_stop_on_rank1": 31,
    "tests/test_train.py::test_params_change_after_crash_starts_fresh": 30,
    "tests/test_bad_input.py::test_bad_input_fails_in_one_line_and_changes_nothing": 30,
    "tests/test_faults.py::test_out_of_memory_is_one_line_naming_a_split_that_resumes": 30,
    "tests/test_train.py::test_ddp_two_processes_match_single_process_accumulation": 29,
    "tests/test_data_dvc.py::test_eot_false_and_bad_data_params_through_the_stages": 28,
    "tests/test_bench_gpu.py::test_dvc_failing_before_training_falls_back_to_the_stage_command": 28,
    "tests/test_cli.py::test_generate_flags_are_one_line_and_say_what_happened": 26,
    "tests/test_sharing.py::test_push_pull_through_s3": 25,
    "tests/test_bad_input.py::test_ctrl_c_during_training_saves_state_and_resumes": 23,
    "tests/test_cli.py::test_export_hf_writes_new_dirs_and_replaces_only_its_own_exports": 22,
    "tests/test_tracking.py::test_dead_tracking_server_warns_once_and_training_completes": 21,
    "tests/test_engine_ddp.py::test_logged_loss_is_the_mean_over_ranks": 20,
    "tests/test_tracking.py::test_a_full_artifact_store_leaves_no_partial_model_and_the_run_finished": 19,
    "tests/test_decode.py::test_cli_int8_loads_any_checkpoint": 19,
    "tests/test_pipeline.py::test_eval_param_change_reruns_evaluate_only_into_the_same_run": 17,
    "tests/test_install.py::test_library_install_console_script": 17,
    "tests/test_decode.py::test_sample_stage_generates_in_the_params_dtype": 17,
    "tests/test_engine_inputs.py::test_fresh_run_that_fails_early_keeps_previous_best_and_state": 16,
    "tests/test_bench_gpu.py::test_hard_limit_writes_the_table_and_stops_the_stage": 16,
    "tests/test_tracking.py::test_a_failed_training_ends_its_run_failed": 15,
    "tests/test_generate.py::test_cli_reads_prompt_from_stdin_and_errors_are_one_line": 14,
}  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal delivers it. A runner that starts pytest in the background (POSIX:
    `cmd &` in a script ignores SIGINT) passes SIG_IGN down to every stage a test starts, and
    Python then installs no KeyboardInterrupt handler there, so the Ctrl-C tests would see the
    stage run on. A handler here becomes SIG_DFL in each child at exec."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # One thread per xdist worker (before any test imports torch): the workers, not torch's
    # threads, share the cores, so an in-process training test never spins against another.
    if hasattr(config, "workerinput"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the slowest tests first, spread over the xdist workers.

    `--dist worksteal` gives each worker a contiguous slice of this order and lets an idle
    worker take tests from the END of another's queue. A slow test that starts last keeps one
    core busy alone at the end; all slow tests in one slice would load one worker alone. So
    each worker's slice starts with its share of the slow tests (longest first; the cases of
    one test stay together, to share their module fixtures) and ends with quick ones. Only the
    order changes: every collected test still runs."""
    groups: dict[str, list[pytest.Item]] = {}
    rest = []
    for it in items:
        name = it.nodeid.split("[")[0]
        (groups.setdefault(name, []) if name in SLOW_FIRST else rest).append(it)
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    slices: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0] * workers
    for name in sorted(groups, key=lambda n: -SLOW_FIRST[n]):
        w = load.index(min(load))  # longest processing time first, onto the least loaded
        slices[w] += groups[name]
        load[w] += SLOW_FIRST[name]
    left, sizes = len(items), []
    for w in range(workers):  # the slice sizes xdist's worksteal gives each worker
        sizes.append(left // (workers - w))
        left -= sizes[-1]
    for w in range(workers):
        take = max(0, sizes[w] - len(slices[w]))
        slices[w] += rest[:take]
        rest = rest[take:]
    items[:] = [it for s in slices for it in s] + rest
