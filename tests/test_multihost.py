"""Training across processes: 2 CPU processes x 2 devices == 1 process x 4 devices.

The processes run the real entry point (nb/05_train.py) on 127.0.0.1 with gloo collectives; a
peer that never connects makes jax.distributed.initialize abort (SIGABRT) after its timeout, so
every launch has a timeout and a fresh port. Also: checkpoints through fsspec (`memory://`
stands in for gs://), and when jax.distributed.initialize is called at all.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

import lib

TRAIN_PY = str(lib.REPO_DIR / "nb" / "05_train.py")
# Tiny shapes; 8 sets per global batch = 2 per device in both layouts.
TINY = dict(
    hidden=32,
    n_layers=1,
    n_heads=2,
    mlp_ratio=2,
    set_size=8,
    sets_per_batch=8,
    log_every=1,
    eval_every=0,
    val_perturbations=4,
    val_cells=16,
    val_control_cells=32,
    n_coexpr_components=4,
    n_effect_components=4,
    warmup_steps=2,
    schedule="constant",
    learning_rate=3e-3,
    seed=0,
)
TIMEOUT_S = 420


def _flags(**kw) -> list[str]:
    return [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in {**TINY, **kw}.items()]


def _launch(n_devices: int, flags: list[str], cwd: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
    # A compilation cache shared by the launches: phase 2 reuses phase 1's compiled step (~20 s each on 2 cores).
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}",
        "WANDB_MODE": "offline",
        "JAX_COMPILATION_CACHE_DIR": str(log.parent / "jax_cache"),
    }
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, TRAIN_PY, *flags], cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT
    )


def _wait(procs: dict[str, subprocess.Popen], logs: dict[str, pathlib.Path]) -> None:
    deadline = time.time() + TIMEOUT_S
    try:
        for name, proc in procs.items():
            proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{logs[name].read_text()[-4000:]}"


def _two_processes(tmp: pathlib.Path, phase: str, flags_of: dict[int, list[str]]) -> dict[int, str]:
    port = portpicker.pick_unused_port()
    logs = {f"p{i}": tmp / f"{phase}_p{i}.log" for i in range(2)}
    procs = {
        f"p{i}": _launch(
            2,
            [*flags_of[i], f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2", f"--process-id={i}"],
            tmp / f"cwd_p{i}",
            logs[f"p{i}"],
        )
        for i in range(2)
    }
    _wait(procs, logs)
    return {i: logs[f"p{i}"].read_text() for i in range(2)}


def _mirror_data_root(data_root: pathlib.Path, path: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    """A data root whose entries are symlinks to `data_root`'s: anything a process writes into
    it (runs/, figures/, checkpoints/) shows up as a new entry."""
    path.mkdir()
    for entry in data_root.iterdir():
        (path / entry.name).symlink_to(entry)
    return path, sorted(p.name for p in path.iterdir())


def _losses(run_dir: pathlib.Path) -> np.ndarray:
    history = lib.read_history(run_dir)
    return history.set_index("step")["train/loss"]


@pytest.mark.slow
def test_two_processes_train_exactly_like_one_and_only_process_0_writes(tiny_store, tmp_path):
    ckpt = tmp_path / "ckpt_2x2"
    common = dict(run_name="mh", steps=4, ckpt_every=4)
    p1_root, p1_entries = _mirror_data_root(pathlib.Path(tiny_store), tmp_path / "root_p1")
    t0 = time.time()
    # The reference, 1 process x 4 devices, runs alongside phase 1 (it is independent).
    single_log = tmp_path / "single.log"
    single = _launch(
        4,
        [
            *_flags(
                data_root=tiny_store,
                checkpoint_dir=tmp_path / "ckpt_1x4",
                wandb_mode="disabled",
                **{**common, "steps": 8},
            )
        ],
        tmp_path / "cwd_single",
        single_log,
    )
    # Phase 1, steps 1-4 with wandb on: process 1 gets its own (empty) checkpoint dir and data root,
    # which must stay empty. Everything process 0 owns lands under `ckpt`.
    outs = _two_processes(
        tmp_path,
        "phase1",
        {
            0: _flags(data_root=tiny_store, checkpoint_dir=ckpt, wandb_mode="offline", **common),
            1: _flags(data_root=p1_root, checkpoint_dir=tmp_path / "ckpt_p1", wandb_mode="offline", **common),
        },
    )
    assert not (tmp_path / "ckpt_p1").exists()
    assert sorted(p.name for p in p1_root.iterdir()) == p1_entries
    assert not list((tmp_path / "cwd_p1").iterdir())
    assert len(list(ckpt.glob("mh/wandb/offline-run-*"))) == 1  # one wandb run: process 0's
    assert "step 4: loss" in outs[0] and "step 4: loss" not in outs[1] and "wandb:" not in outs[1]
    # Phase 2, steps 5-8: both processes resume from process 0's checkpoint (process 1 reads it too:
    # a process starting fresh would hold other parameters and the losses below would differ).
    outs = _two_processes(
        tmp_path,
        "phase2",
        {
            i: _flags(
                data_root=tiny_store if i == 0 else p1_root,
                checkpoint_dir=ckpt,
                wandb_mode="disabled",
                resume=True,
                **{**common, "steps": 8},
            )
            for i in range(2)
        },
    )
    assert "resuming mh from step_00000004" in outs[0]
    assert sorted(p.name for p in p1_root.iterdir()) == p1_entries
    _wait({"single": single}, {"single": single_log})
    print(f"2 phases of 2 processes + 1 process of 4 devices: {time.time() - t0:.0f} s")

    one, two = _losses(tmp_path / "ckpt_1x4" / "mh"), _losses(ckpt / "mh")
    assert list(one.index) == list(two.index) == list(range(1, 9))
    diff = float(np.abs(one.to_numpy() - two.to_numpy()).max())
    print(f"max |loss(1x4) - loss(2x2)| over 8 steps = {diff:.3g}")
    assert diff <= 1e-5, (one, two)
    assert one.iloc[-1] < one.iloc[0]  # it trained


# ---------------------------------------------------------------- checkpoints on a bucket URL


@pytest.mark.slow
def test_training_checkpoints_and_resumes_through_a_bucket_url(tiny_store):
    """memory:// stands in for gs:// (same fsspec calls: no rename, no append); the run resumes
    from it and every run file is there, local staging directories are not."""
    root = "memory://bucket/ckpt"
    cfg = lib.make_config(
        lib.TrainConfig,
        data_root=str(tiny_store),
        checkpoint_dir=root,
        run_name="gcs",
        wandb_mode="disabled",
        **{**TINY, "sets_per_batch": 4, "steps": 4, "ckpt_every": 2, "keep_last_n": 1},
    )
    first = lib.run_train(cfg)
    assert first["run_dir"] == f"{root}/gcs"
    fs, path = lib.get_fs(root)
    names = sorted(lib.url_name(p) for p in fs.ls(f"{path}/gcs", detail=False))
    assert names == ["config.toml", "history.jsonl", "latest", "status.json", "step_00000004"], names
    assert lib.read_text_url(f"{root}/latest") == "gcs" and lib.read_text_url(f"{root}/gcs/latest") == "step_00000004"
    resumed = lib.run_train(dataclasses.replace(cfg, steps=6, resume=True))
    assert resumed["step"] == 6 and json.loads(lib.read_text_url(f"{root}/gcs/status.json"))["status"] == "done"
    assert lib.read_history(f"{root}/gcs")["step"].tolist() == [1, 2, 3, 4, 5, 6]
    step_dir = lib.resolve_checkpoint(root)  # the root's latest run, its latest (no best: no validation)
    assert step_dir == f"{root}/gcs/step_00000006"
    ckpt = lib.load_checkpoint(step_dir)
    assert ckpt["state"]["step"] == 6 and ckpt["cfg"].steps == 6
    predictor = lib.load_model_predictor(f"{root}/gcs")
    assert predictor.predict("<control>", ckpt["control_pool_cg"][:8]).shape == (8, ckpt["control_pool_cg"].shape[1])
    fs.rm(path, recursive=True)


def test_pointer_writes_replace_whole_files_and_leave_no_temporaries(tmp_path, monkeypatch):
    # A plain write opens the pointer itself for writing, so a reader (another host) can see it
    # empty or half-written; an atomic replace writes a temporary sibling and moves it onto the name.
    opened_for_write = []
    for fs_class in {type(lib.get_fs(str(tmp_path))[0]), type(lib.get_fs("memory://x")[0])}:
        monkeypatch.setattr(fs_class, "_open", _recording_writes(fs_class._open, opened_for_write))
    for root in [str(tmp_path), "memory://bucket/pointers"]:
        lib.write_text_url(f"{root}/run/latest", "step_00000001")
        lib.write_text_url(f"{root}/run/latest", "step_00000002")
        assert lib.read_text_url(f"{root}/run/latest") == "step_00000002"
        fs, path = lib.get_fs(f"{root}/run")
        assert [lib.url_name(p) for p in fs.ls(path, detail=False)] == ["latest"]
        assert lib.read_text_url(f"{root}/run/missing") == ""
    assert len(opened_for_write) == 4 and all(name.startswith(".latest.tmp-") for name in opened_for_write)
    # A reader that opened the old local pointer keeps reading the whole old file (a new inode replaced it).
    with open(tmp_path / "run" / "latest") as reader:
        lib.write_text_url(f"{tmp_path}/run/latest", "step_00000003")
        assert reader.read() == "step_00000002"


def _recording_writes(open_, names):
    def _open(self, path, mode="rb", *args, **kwargs):
        if set(mode) & set("wax+"):
            names.append(lib.url_name(path))
        return open_(self, path, mode, *args, **kwargs)

    return _open


# ---------------------------------------------------------------- when to call jax.distributed.initialize


def test_distributed_args_from_flags_env_or_nothing(monkeypatch):
    for var in [
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
    ]:
        monkeypatch.delenv(var, raising=False)
    cfg = lib.TrainConfig()
    assert lib.get_distributed_args(cfg) is None  # one process: no flag, no initialize
    flags = dataclasses.replace(cfg, coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert lib.get_distributed_args(flags) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
    }
    assert lib.get_distributed_args(dataclasses.replace(flags, num_processes=1, process_id=0)) is None
    with pytest.raises(lib.UserError, match="--process-id"):
        lib.get_distributed_args(dataclasses.replace(cfg, coordinator_address="10.0.0.1:1234", num_processes=2))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:99")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert lib.get_distributed_args(cfg) == {"coordinator_address": "10.0.0.2:99", "num_processes": 2, "process_id": 1}
    assert lib.get_distributed_args(dataclasses.replace(cfg, process_id=0))["process_id"] == 0  # a flag beats the env
    for var in ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t-w-0,t-w-1,t-w-2,t-w-3")  # a 4-host slice: jax detects the rest
    assert lib.get_distributed_args(cfg) == {}
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # one TPU host
    assert lib.get_distributed_args(cfg) is None


def test_launch_flags_are_not_written_to_the_run_config(tmp_path):
    cfg = lib.TrainConfig(coordinator_address="127.0.0.1:1", num_processes=2, process_id=1)
    lib.write_train_toml(tmp_path / "c.toml", cfg)
    assert (
        lib.read_config_toml(lib.TrainConfig, tmp_path / "c.toml").process_id == -1
    )  # process 1 never becomes process 0's twin
