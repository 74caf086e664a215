"""Bad input never loses data and always ends in one clear error: every flag is range-checked by the
parser, every input file is opened through one place that names the file and the fix, writers
refuse outputs that are not valid, and a notebook run as a script prints a user error as one line."""

import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_train import TINY  # the tiny model shapes, so the jitted step compiles once per session

import lib

NB_DIR = lib.REPO_DIR / "nb"

# Every notebook's config, found in the notebooks themselves (`lib.parse_config(lib.XConfig, ...)`).
NOTEBOOK_CONFIGS = {
    path.stem: getattr(lib, re.search(r"lib\.parse_config\(\s*lib\.(\w+)", path.read_text()).group(1))
    for path in sorted(NB_DIR.glob("0*.py"))
}

# The probes of the sweep: 0, a negative and absurd values (NaN too, for floats).
INT_PROBES = (0, -5, 10**12)
FLOAT_PROBES = (0.0, -5.0, 1e12, math.nan)

# (flag, probe) pairs that are legitimate values, and why; every other probe must be refused.
ALLOWED = {
    ("seed", 0): "any seed in [0, 2**32) is a seed",
    ("fake_val_seed", 0): "a seed",
    ("n_null_groups", 0): "documented: 0 turns the null groups off",
    ("worker_count", 0): "documented: 0 reads batches in a thread",
    ("effect_gain_init", 0.0): "documented: a fresh model predicts no effect",
    ("energy_weight", 0.0): "a loss left out (the pseudobulk MSE keeps its default weight 10)",
    ("mmd_weight", 0.0): "the default: MMD left out",
    ("pseudobulk_mse_weight", 0.0): "a loss left out (energy keeps weight 1)",
    ("effect_corr_weight", 0.0): "the default: left out",
    ("discrimination_weight", 0.0): "the default: left out",
    ("weight_decay", 0.0): "no decay",
    ("warmup_steps", 0): "no warmup",
    ("min_lr_ratio", 0.0): "cosine down to 0",
    ("grad_clip", 0.0): "documented: 0 disables clipping",
    ("eval_every", 0): "documented: 0 = never",
    ("ckpt_every", 0): "documented: 0 = only at the end and on SIGTERM",
    ("oov_dropout", 0.0): "no dropout",
    ("num_processes", 0): "documented: 0 = not given",
    ("process_id", 0): "process 0; the address and process count may come from $JAX_* (checked first thing in 05)",
    ("max_cells_per_pert", 0): "documented: 0 = every cell",
    ("n_control", 0): "07: documented, 0 = every control that fits (06 needs >= 1)",
}


def numeric_flags(config_cls) -> list[tuple[str, type]]:
    return [(name, hint) for name, (_, hint) in lib.get_flag_hints(config_cls).items() if hint in (int, float)]


@pytest.mark.parametrize("notebook", list(NOTEBOOK_CONFIGS))
def test_every_numeric_flag_refuses_zero_negative_and_absurd_values(notebook):
    config_cls = NOTEBOOK_CONFIGS[notebook]
    flags = numeric_flags(config_cls)
    assert flags, f"{notebook}: no numeric flags found"
    for name, hint in flags:
        flag = "--" + name.replace("_", "-")
        for probe in INT_PROBES if hint is int else FLOAT_PROBES:
            allowed = (name, probe) in ALLOWED and not (notebook == "06_eval" and name == "n_control")
            if allowed:
                cfg = lib.parse_config(config_cls, [flag, str(probe)])
                assert lib.flatten_config(cfg)[name] == probe
                continue
            with pytest.raises(lib.UserError) as err:
                lib.parse_config(config_cls, [flag, str(probe)])
            message = str(err.value)
            assert message.startswith(f"{flag} ") and "\n" not in message, (notebook, flag, probe, message)


def test_bad_value_in_a_config_file_is_refused_like_a_flag(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("n_hvg = -5\n")
    with pytest.raises(lib.UserError, match="^--n-hvg -5: must be >= 1"):
        lib.parse_config(lib.HvgConfig, ["--config", str(toml)])


@pytest.mark.parametrize(
    "config_cls, argv, flag",
    [
        (lib.TrainConfig, ["--hidden", "30", "--n-heads", "4"], "--n-heads"),
        (lib.TrainConfig, ["--set-size", "64", "--val-control-cells", "32"], "--val-control-cells"),
        (lib.TrainConfig, ["--num-processes", "2", "--process-id", "2"], "--process-id"),
        (lib.TrainConfig, ["--mmd-weight", "1", "--mmd-bandwidths", "0"], "--mmd-bandwidths"),
        (lib.SubmitConfig, ["--predictor", "cel_mean"], "--predictor"),
        (lib.SubmitConfig, ["--predictor", "linear", "--checkpoint", "x"], "--checkpoint"),
        (lib.SubmitConfig, ["--n-control", "50", "--max-cells", "40"], "--n-control"),
        (lib.EvalConfig, ["--predictors", "control", "lnear"], "--predictors"),
        (lib.DownloadConfig, ["--sources", "replogle_k562"], "--sources"),
    ],
)
def test_flag_combinations_and_choices_are_refused_at_parse(config_cls, argv, flag):
    with pytest.raises(lib.UserError, match=f"^{flag} "):
        lib.parse_config(config_cls, argv)


# -------------------- one-line errors -------------------------------------------------------------


class _App:
    """Stands in for a marimo App whose run raises `error`."""

    def __init__(self, error):
        self.error = error

    def run(self):
        raise self.error


def test_run_notebook_prints_a_user_error_as_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nb.py"])
    monkeypatch.delenv(lib.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        lib.run_notebook(_App(lib.UserError("x is wrong,\n because y: do z")))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: x is wrong, because y: do z\n"


def test_run_notebook_keeps_the_traceback_of_bugs_and_with_debug(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nb.py"])
    monkeypatch.delenv(lib.DEBUG_ENV, raising=False)
    with pytest.raises(KeyError):  # not a user error: a bug, its traceback stays
        lib.run_notebook(_App(KeyError("gem_group")))
    monkeypatch.setattr(sys, "argv", ["nb.py", "--debug"])
    with pytest.raises(lib.UserError):
        lib.run_notebook(_App(lib.UserError("bad")))
    monkeypatch.setattr(sys, "argv", ["nb.py"])
    monkeypatch.setenv(lib.DEBUG_ENV, "1")
    with pytest.raises(lib.UserError):
        lib.run_notebook(_App(lib.UserError("bad")))


def _run_script(*args, env=None):
    env = {k: v for k, v in os.environ.items() if k != lib.DEBUG_ENV} | (env or {})
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # two fresh interpreters importing the whole stack (~15 s each; 40 s on a loaded machine)
def test_notebook_script_prints_one_line_for_a_bad_flag_and_a_traceback_with_debug(tmp_path):
    """marimo's script runner re-raises the cell's own exception, so run_notebook sees it."""
    result = _run_script(NB_DIR / "03_hvg.py", "--n-hvg", "0", "--data-root", tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --n-hvg 0: must be >= 1 and <= 100,000; pass an allowed value (see --help)"
    ]
    debug = _run_script(NB_DIR / "03_hvg.py", "--n-hvg", "0", "--data-root", tmp_path, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "UserError: --n-hvg 0" in debug.stderr


# -------------------- input files: one error naming the file and the fix -------------------------


@pytest.fixture
def world_copy(tiny_store, tmp_path):
    """A private copy of the tiny world with its HVGs and store (tests here damage files)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_store, root)
    return root


def _k562_path(root) -> pathlib.Path:
    spec = next(s for s in lib.get_datasets("synthetic") if s.name == "synthetic_k562")
    return lib.get_dataset_path(spec, root)


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda p: os.truncate(p, p.stat().st_size // 2), "is truncated"),
        (lambda p: os.truncate(p, 0), "is empty (0 bytes)"),
        (lambda p: p.write_text("<html>Not Found</html>\n" * 100), "is not HDF5"),
    ],
    ids=["truncated", "empty", "not_hdf5"],
)
def test_damaged_h5ad_is_one_error_naming_the_file_and_the_fix(world_copy, damage, says):
    path = _k562_path(world_copy)
    damage(path)
    with pytest.raises(lib.UserError) as err:
        lib.run_hvg(lib.HvgConfig(data_root=str(world_copy), n_hvg=200, n_hvg_per_dataset=200, offline=True))
    message = str(err.value)
    assert message.startswith(f"{path} cannot be opened: the file {says}"), message
    assert "run nb/01_download.py again" in message


def test_missing_batch_column_in_03_names_the_column_the_file_and_the_manifest_key(world_copy):
    import h5py

    path = _k562_path(world_copy)
    with h5py.File(path, "a") as f:  # the file loses its batch column, as a hand-edited file might
        del f["obs"]["gem_group"]
        order = [c for c in f["obs"].attrs["column-order"] if c != "gem_group"]
        f["obs"].attrs["column-order"] = np.array(order, dtype=object)
    spec = next(s for s in lib.get_datasets("synthetic") if s.name == "synthetic_k562")
    where = re.escape(f"synthetic_k562 ({spec.source}/{spec.path})")
    with pytest.raises(
        lib.UserError, match=f"^{where}: obs has no column 'gem_group' \\(batch_key in data_manifest.toml\\)"
    ):
        lib.run_hvg(lib.HvgConfig(data_root=str(world_copy), n_hvg=200, n_hvg_per_dataset=200, offline=True))


@pytest.mark.parametrize("name", ["pert_counts_Validation.csv", "gene_names.csv"])
def test_empty_target_csv_is_one_error_naming_the_file(world_copy, name):
    files = lib.get_target_files(world_copy, "synthetic")
    path = files.gene_names_path.parent / name
    path.write_text("")
    with pytest.raises(lib.UserError, match=f"^{re.escape(str(path))} is empty .*run nb/01_download.py again"):
        lib.run_submit(lib.SubmitConfig(data_root=str(world_copy), predictor="cell_mean", score=False))


def test_pert_counts_without_its_columns_or_rows_is_refused(tmp_path):
    path = tmp_path / "pert_counts_Validation.csv"
    path.write_text("gene,cells\nSYN00001,10\n")
    with pytest.raises(lib.UserError, match=r"has no column \['target_gene', 'n_cells'\]"):
        lib.read_pert_counts(path)
    path.write_text("target_gene,n_cells,median_umi_per_cell\n")
    with pytest.raises(lib.UserError, match="has 0 rows"):
        lib.read_pert_counts(path)


@pytest.mark.slow  # trains 3 steps (~30 s with compilation)
def test_damaged_checkpoint_on_resume_is_one_error_naming_the_step(tiny_store, tmp_path):
    kw = dict(TINY, data_root=str(tiny_store), checkpoint_dir=str(tmp_path), run_name="r")
    lib.run_train(lib.make_config(lib.TrainConfig, steps=3, **kw))
    step_dir = pathlib.Path(lib.resolve_checkpoint(tmp_path / "r", "latest"))
    os.truncate(step_dir / "model.eqx", 100)
    with pytest.raises(lib.UserError, match=f"^checkpoint {re.escape(str(step_dir))} is damaged or incomplete"):
        lib.run_train(lib.make_config(lib.TrainConfig, steps=6, resume=True, **kw))


# -------------------- outputs replaced only by valid outputs --------------------------------------


def _sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_hvg_writer_refuses_a_gene_list_of_the_wrong_size_and_keeps_the_old_file(world_copy, monkeypatch):
    hvg_path = lib.get_hvg_dir(world_copy, "synthetic") / "hvg.csv"
    before = _sha256(hvg_path)
    real_select = lib.select_shared_hvgs
    monkeypatch.setattr(lib, "select_shared_hvgs", lambda *a, **k: real_select(*a, **k).iloc[:0])
    with pytest.raises(
        lib.UserError, match="refusing to replace .*hvg.csv: the new gene list has 0 genes, not --n-hvg 200"
    ):
        lib.run_hvg(lib.HvgConfig(data_root=str(world_copy), n_hvg=200, n_hvg_per_dataset=200, offline=True))
    assert _sha256(hvg_path) == before


def test_store_writer_refuses_a_store_with_rows_never_written_and_keeps_the_old_one(world_copy, monkeypatch):
    """What `--chunk-cells -5` did on the old code: no chunk read, an all-zero store swapped in."""
    x_path = lib.get_store_dir(world_copy, "synthetic") / "x_cg.npy"
    before = _sha256(x_path)
    real_chunks = lib.iter_log1p_chunks
    monkeypatch.setattr(lib, "iter_log1p_chunks", lambda *a, **k: iter(list(real_chunks(*a, **k))[:1]))
    with pytest.raises(lib.UserError, match="refusing to replace .* of .* cells x 200 genes were written"):
        lib.run_normalise(lib.NormaliseConfig(data_root=str(world_copy), chunk_cells=100, force=True))
    assert _sha256(x_path) == before
    leftovers = [*x_path.parent.parent.glob(".synthetic.tmp-*"), *x_path.parent.parent.glob(".synthetic.old-*")]
    assert not leftovers, "a temporary store was left behind"


def test_store_writer_refuses_values_that_are_not_log1p():
    rows_cg = np.zeros((3, 4), dtype=np.float32)
    lib.check_store_rows(rows_cg, "x")
    for bad in (np.nan, -0.5, math.log1p(lib.TARGET_SUM) + 1):
        rows_cg[1, 2] = bad
        with pytest.raises(lib.UserError, match="refusing to write the store: x holds values outside"):
            lib.check_store_rows(rows_cg, "x")


def test_store_with_a_damaged_matrix_or_other_normalisation_is_not_up_to_date(world_copy, capsys):
    store_dir = lib.get_store_dir(world_copy, "synthetic")
    good = lib.load_store(world_copy, "synthetic").x_cg.copy()
    cfg = lib.NormaliseConfig(data_root=str(world_copy), chunk_cells=500)
    lib.run_normalise(cfg)
    assert "up to date" in capsys.readouterr().out
    os.truncate(store_dir / "x_cg.npy", 1000)  # e.g. a copy cut short
    lib.run_normalise(cfg)
    assert "up to date" not in capsys.readouterr().out
    np.testing.assert_array_equal(lib.load_store(world_copy, "synthetic").x_cg, good)
    meta = json.loads((store_dir / "meta.json").read_text())
    assert meta["inputs"]["target_sum"] == lib.TARGET_SUM  # a store of another normalisation is not up to date


def test_chunk_size_does_not_shape_the_store(world_copy):
    """--chunk-cells only bounds memory, which is why it is not part of the up-to-date check."""
    x_500 = lib.load_store(world_copy, "synthetic").x_cg.copy()
    lib.run_normalise(lib.NormaliseConfig(data_root=str(world_copy), chunk_cells=97, force=True))
    np.testing.assert_array_equal(lib.load_store(world_copy, "synthetic").x_cg, x_500)
