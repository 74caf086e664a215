"""The normalised, row-addressable store (04 normalise), checked against scanpy."""

import dataclasses
import io
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse

import lib

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]


def make_spec(name, **kw):
    fields = dict(
        name=name, source="fixture", path=f"{name}.h5ad", cell_type=name.upper(), perturbation_key="gene",
        control_label="non-targeting", batch_key="", gene_index="symbol", gene_id_column="",
        gene_symbol_column="", counts="raw", role="context",
    )  # fmt: skip
    return lib.DatasetSpec(**{**fields, **kw})


def write_dataset(data_root, spec, *, gene_u, n_cells, batches, seed):
    """A small raw-count h5ad in the spec's layout: shuffled cells, perturbations that move genes."""
    import anndata

    rng = np.random.default_rng(seed)
    perts = [spec.control_label] + [f"SYN{u:05d}" for u in rng.choice(gene_u, 5, replace=False)]
    pert_c = rng.choice(perts, n_cells, p=[0.3] + [0.14] * 5)
    effect_pg = np.exp(rng.normal(0, 0.8, (len(perts), len(gene_u))) * (rng.random((len(perts), len(gene_u))) < 0.2))
    effect_pg[0] = 1.0
    lam_cg = rng.gamma(0.6, 3.0, len(gene_u))[None] * effect_pg[[perts.index(p) for p in pert_c]]
    counts_cg = rng.poisson(lam_cg * rng.uniform(0.5, 2.0, n_cells)[:, None]).astype(np.float32)
    obs = pd.DataFrame({spec.perturbation_key: pert_c}, index=[f"cell{i}-{spec.name}" for i in range(n_cells)])
    if spec.batch_key:
        obs[spec.batch_key] = rng.choice(batches, n_cells)
    symbols = [f"SYN{u:05d}" for u in gene_u]
    ids = [f"ENSG9{u:010d}" for u in gene_u]
    if spec.gene_index == "symbol":
        var = pd.DataFrame({spec.gene_id_column: ids} if spec.gene_id_column else {}, index=symbols)
    else:
        var = pd.DataFrame({spec.gene_symbol_column: symbols}, index=[f"{g}.{u % 7 + 1}" for g, u in zip(ids, gene_u)])
    path = lib.get_dataset_path(spec, data_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    anndata.AnnData(scipy.sparse.csr_matrix(counts_cg), obs=obs, var=var).write_h5ad(path)


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory):
    """Two datasets sharing 50 of their genes; the HVG list, then the store in odd-sized chunks."""
    data_root = tmp_path_factory.mktemp("store_root")
    specs = [
        make_spec("fx_target", role="target", batch_key="batch", gene_id_column="gene_id",
                  perturbation_key="target_gene"),
        make_spec("fx_context", batch_key="gem_group", gene_index="ensembl", gene_symbol_column="gene_name",
                  control_label="control"),
    ]  # fmt: skip
    write_dataset(data_root, specs[0], gene_u=np.arange(1, 61), n_cells=300, batches=["b1", "b2"], seed=1)
    write_dataset(data_root, specs[1], gene_u=np.arange(11, 81), n_cells=250, batches=[1, 2, 10], seed=2)
    hvg_cfg = lib.HvgConfig(
        data_root=str(data_root), n_hvg=30, n_hvg_per_dataset=25, max_cells=200, chunk_cells=64, offline=True
    )
    lib.run_hvg(hvg_cfg, specs=specs)
    cfg = lib.NormaliseConfig(data_root=str(data_root), chunk_cells=37)
    lib.run_normalise(cfg, specs=specs)
    return dict(data_root=data_root, specs=specs, cfg=cfg, store=lib.load_store(data_root))


def normalise_whole_with_scanpy(data_root, spec):
    """The whole dataset normalised by scanpy directly, columns keyed by version-less Ensembl id."""
    import anndata
    import scanpy as sc

    adata = anndata.read_h5ad(lib.get_dataset_path(spec, data_root))
    ids = adata.var[spec.gene_id_column] if spec.gene_id_column else adata.var_names.str.split(".").str[0]
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return pd.DataFrame(adata.X.toarray(), index=adata.obs_names, columns=np.asarray(ids)), adata.obs


def test_store_index_tiles_rows_once_and_each_group_is_contiguous(fixture_store):
    store = fixture_store["store"]
    index = store.index
    assert index["start"].iloc[0] == 0 and index["stop"].iloc[-1] == store.x_cg.shape[0]
    assert np.array_equal(index["start"].to_numpy()[1:], index["stop"].to_numpy()[:-1])
    assert (index["stop"] - index["start"] == index["n_cells"]).all()
    keys = ["dataset", "cell_type", "batch", "perturbation"]
    assert not index.duplicated(keys).any()  # one range per group, so a group's rows are contiguous
    for spec in fixture_store["specs"]:
        _, obs = normalise_whole_with_scanpy(fixture_store["data_root"], spec)
        rows = store.obs.loc[store.index.loc[store.obs["group"], "dataset"].to_numpy() == spec.name]
        assert sorted(rows["source_row"]) == list(range(len(obs)))  # every source cell exactly once
        group = store.index.loc[rows["group"]]
        source = obs.iloc[rows["source_row"]]
        assert (group["perturbation"].to_numpy() == source[spec.perturbation_key].astype(str).to_numpy()).all()
        assert (group["batch"].to_numpy() == source[spec.batch_key].astype(str).to_numpy()).all()
        assert (
            group["is_control"].to_numpy() == (source[spec.perturbation_key] == spec.control_label).to_numpy()
        ).all()
        assert (rows["cell_id"].to_numpy() == source.index.to_numpy()).all()
    gem_groups = index.loc[index["dataset"] == "fx_context", "batch"].unique().tolist()
    assert gem_groups == ["1", "2", "10"]  # numeric batches sort as numbers


def test_store_rows_equal_scanpy_normalised_hvg_columns(fixture_store):
    store = fixture_store["store"]
    hvg_ids = store.genes["ensembl_id"].tolist()
    for d, spec in enumerate(fixture_store["specs"]):
        whole_cg, _ = normalise_whole_with_scanpy(fixture_store["data_root"], spec)
        measured_g = np.isin(hvg_ids, whole_cg.columns)
        assert np.array_equal(store.measured_dg[d], measured_g)
        expected_cg = whole_cg.reindex(columns=hvg_ids, fill_value=0.0).to_numpy()
        rows = np.flatnonzero(store.index.loc[store.obs["group"], "dataset"].to_numpy() == spec.name)
        got_cg = np.asarray(store.x_cg[rows])
        np.testing.assert_allclose(got_cg, expected_cg[store.obs["source_row"].to_numpy()[rows]], rtol=1e-6, atol=1e-6)
        assert (got_cg[:, ~measured_g] == 0).all()
    assert not store.measured_dg[1].all()  # the context dataset really misses some shared genes


def test_store_means_are_whole_dataset_means_over_all_genes(fixture_store):
    store = fixture_store["store"]
    for spec in fixture_store["specs"]:
        whole_cg, obs = normalise_whole_with_scanpy(fixture_store["data_root"], spec)
        means = store.means.loc[store.means["dataset"] == spec.name].set_index("ensembl_id")
        assert len(means) == whole_cg.shape[1]
        is_control_c = (obs[spec.perturbation_key] == spec.control_label).to_numpy()
        np.testing.assert_allclose(means.loc[whole_cg.columns, "mean_all"], whole_cg.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(
            means.loc[whole_cg.columns, "mean_control"], whole_cg[is_control_c].mean(axis=0), rtol=1e-5
        )
        assert (means["symbol"].str.startswith("SYN")).all()


def test_store_rerun_is_idempotent(fixture_store):
    data_root, specs, cfg = fixture_store["data_root"], fixture_store["specs"], fixture_store["cfg"]
    store_dir = lib.get_store_dir(data_root, "synthetic")
    files = ["x_cg.npy", "index.csv", "obs.csv", "genes.csv", "means.csv", "measured_dg.npy", "meta.json"]
    before = {name: (store_dir / name).read_bytes() for name in files}
    mtime = (store_dir / "meta.json").stat().st_mtime_ns
    lib.run_normalise(cfg, specs=specs)  # up to date: skipped
    assert (store_dir / "meta.json").stat().st_mtime_ns == mtime
    lib.run_normalise(dataclasses.replace(cfg, force=True), specs=specs)
    assert {name: (store_dir / name).read_bytes() for name in files} == before
    # Another chunk size: the same rows bit for bit; means differ only by float summation order.
    lib.run_normalise(dataclasses.replace(cfg, chunk_cells=100, force=True), specs=specs)
    for name in ["x_cg.npy", "index.csv", "obs.csv", "measured_dg.npy"]:
        assert (store_dir / name).read_bytes() == before[name], name
    means = pd.read_csv(store_dir / "means.csv")
    np.testing.assert_allclose(means["mean_all"], pd.read_csv(io.BytesIO(before["means.csv"]))["mean_all"], rtol=1e-12)
    assert not list(store_dir.parent.glob(".*tmp*")) and not list(store_dir.parent.glob(".*old*"))


MEMORY_PROBE = """
import json, sys
import numpy as np, scipy.sparse
import lib

def status_kib(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])

spec = lib.DatasetSpec(**json.loads(sys.argv[1]))
lib.normalise_log1p(scipy.sparse.csr_matrix(np.ones((4, 4), np.float32)))  # imports and JIT before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS, so import-time peaks do not count
before = status_kib("VmRSS:")
lib.run_normalise(lib.NormaliseConfig(data_root=sys.argv[2], chunk_cells=int(sys.argv[3]), force=True), specs=[spec])
print(json.dumps(dict(before_kib=before, peak_kib=status_kib("VmHWM:"))))
"""


@pytest.mark.slow
def test_store_peak_memory_is_bounded_by_the_chunk_not_the_dataset(tmp_path):
    import anndata

    # 20,000 cells x 4,000 genes, 800 counts a row: X is 128 MB as CSR (float32 data + int32
    # indices); a chunk of 400 cells is ~2.5 MB. Measured here: chunks of 400 cells grow RSS by
    # ~45 MiB (~25 MiB fixed + ~0.35 kB of obs bookkeeping per cell), X in one chunk by ~640 MiB.
    n_cells, n_genes, nnz_row, n_hvg = 20_000, 4_000, 800, 500
    rng = np.random.default_rng(0)
    indices = (np.arange(nnz_row)[None] * 5 + rng.integers(0, 5, n_cells)[:, None]).astype(np.int32)
    data = rng.integers(1, 30, n_cells * nnz_row).astype(np.float32)
    x_cg = scipy.sparse.csr_matrix((data, indices.ravel(), np.arange(n_cells + 1) * nnz_row), shape=(n_cells, n_genes))
    csr_bytes = x_cg.data.nbytes + x_cg.indices.nbytes
    spec = make_spec("fx_big", role="target", gene_id_column="gene_id")
    obs = pd.DataFrame({"gene": rng.choice(["non-targeting", *[f"SYN{i:05d}" for i in range(1, 21)]], n_cells)},
                       index=[f"c{i}" for i in range(n_cells)])  # fmt: skip
    var = pd.DataFrame(
        {"gene_id": [f"ENSG9{i:010d}" for i in range(1, n_genes + 1)]},
        index=[f"SYN{i:05d}" for i in range(1, n_genes + 1)],
    )
    path = lib.get_dataset_path(spec, tmp_path)
    path.parent.mkdir(parents=True)
    anndata.AnnData(x_cg, obs=obs, var=var).write_h5ad(path)
    del x_cg, data, indices
    lib.run_hvg(
        lib.HvgConfig(data_root=str(tmp_path), n_hvg=n_hvg, n_hvg_per_dataset=n_hvg, max_cells=1_000), specs=[spec]
    )

    probe = MEMORY_PROBE.format(repo=str(REPO_DIR))
    out = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(spec.__dict__), str(tmp_path), "400"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    grown_bytes = (rss["peak_kib"] - rss["before_kib"]) * 1024
    # Reading X whole would grow RSS by more than csr_bytes; chunked reads stay far below.
    assert grown_bytes < csr_bytes / 2, (
        f"peak RSS grew {grown_bytes / 2**20:.1f} MiB (X is {csr_bytes / 2**20:.0f} MiB)"
    )
    store = lib.load_store(tmp_path)
    assert store.x_cg.shape == (n_cells, n_hvg)


def test_tiny_world_end_to_end_generation_hvg_store(tiny_store):
    tiny_world_root = tiny_store  # conftest ran 01 -> 03 -> 04 here (03 with unmapped genes as errors)
    hvgs = lib.read_hvgs(tiny_world_root, "synthetic")
    specs = lib.get_datasets("synthetic")
    target_ids = set(lib.read_dataset_genes(tiny_world_root, "synthetic", specs[0].name)["ensembl_id"])
    assert len(hvgs) == 200 and hvgs["ensembl_id"].is_unique and set(hvgs["ensembl_id"]) <= target_ids
    assert hvgs["symbol"].str.startswith("SYN").all()
    assert (hvgs["n_datasets"].diff().dropna() <= 0).all()
    unmapped = pd.read_csv(lib.get_hvg_dir(tiny_world_root, "synthetic") / "unmapped_genes.csv")
    assert len(unmapped) == 0

    store = lib.load_store(tiny_world_root)
    world = json.loads((lib.get_data_root(tiny_world_root) / "raw" / "synthetic" / "world.json").read_text())
    n_cells = sum(world["files"][s.path]["n_cells"] for s in specs)
    assert store.x_cg.shape == (n_cells, 200)
    assert store.datasets == [s.name for s in specs] and store.measured_dg[0].all()
    target = store.index.loc[store.index["dataset"] == "synthetic_h1"]
    assert set(target["perturbation"]) == set(world["splits"]["train"]) | {"non-targeting"}
    x_sample = np.asarray(store.x_cg[:: max(1, n_cells // 500)])
    assert x_sample.min() >= 0 and x_sample.max() < 15


# ---------------------------------------------------------------- no leftovers, no races


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.01)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_kill_9_during_04_leaves_a_temporary_store_that_the_next_04_removes(tiny_store, tmp_path):
    data_root = tmp_path / "data"
    shutil.copytree(tiny_store, data_root)
    store_parent = data_root / "store"
    before = (store_parent / "synthetic" / "x_cg.npy").read_bytes()
    flags = ["--data-root", str(data_root), "--force", "--chunk-cells", "5"]
    proc = subprocess.Popen([sys.executable, str(REPO_DIR / "nb" / "04_normalise.py"), *flags], cwd=REPO_DIR)
    [leftover] = _wait_for(lambda: list(store_parent.glob(".synthetic.tmp-*")))
    proc.kill()  # SIGKILL mid-write: no cleanup code runs
    proc.wait()
    assert leftover.exists() and leftover.name.endswith(f"-{proc.pid}")
    lib.run_normalise(lib.NormaliseConfig(data_root=str(data_root)))  # the next run (its store is up to date)
    assert sorted(p.name for p in store_parent.iterdir() if p.name != ".synthetic.lock") == ["synthetic"]
    assert (store_parent / "synthetic" / "x_cg.npy").read_bytes() == before


def test_leftovers_of_live_writers_and_of_other_hosts_are_kept(tmp_path):
    host = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = [f".x.tmp-{host}-{alive.pid}", f".x.tmp-other-host-{dead.pid}", f".x.old-{host}-{dead.pid}"]
        for name in names:
            (tmp_path / name).mkdir()
        removed = lib.remove_dead_leftovers(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    assert [p.name for p in removed] == [names[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[:2])


# Two writers of one directory. `slow` pauses for a second right after moving the old directory
# away (the window in which the other writer used to find no directory and swap its own in, so the
# slow one's second rename hit a non-empty directory); `fast` swaps inside that window.
SWAPPER = """
import os, pathlib, sys, time
import lib
target, moved, role = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
if role == "slow":
    replace = os.replace
    def paused_replace(src, dst):
        replace(src, dst)
        if pathlib.Path(src) == target:
            moved.touch()
            time.sleep(1.0)
    os.replace = paused_replace
else:
    while not moved.exists():
        time.sleep(0.001)
with lib.atomic_dir(target) as tmp:
    (tmp / "writer").write_text(role)
"""


@pytest.mark.slow
def test_two_processes_swapping_the_same_directory_take_turns(tmp_path):
    target, moved = tmp_path / "store", tmp_path / "moved"
    target.mkdir()
    (target / "writer").write_text("first")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SWAPPER, str(target), str(moved), role],
            cwd=REPO_DIR,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("slow", "fast")
    ]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.lock", "moved", "store"]  # no .old-*/.tmp-* left
    assert (target / "writer").read_text() == "fast"  # the writer that waited for the lock swapped last
