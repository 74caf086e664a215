"""The sources you have: a real-layout data root with some files missing or bad, dataset selections
that the store and checkpoints remember, h5mu sources, dense and odd files."""

import json
import pathlib
import shutil
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

import lib

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]

# The tiny synthetic world's files, placed where the real sources' files go (same layouts).
REAL_HOMES = {
    "synthetic_h1": ("vcc2025", "vcc2025_h1", "adata_Training.h5ad"),
    "synthetic_k562": ("replogle2022", "replogle2022_k562", "K562_essential_raw_singlecell_01.h5ad"),
    "synthetic_rpe1": ("replogle2022", "replogle2022_rpe1", "rpe1_raw_singlecell_01.h5ad"),
    "synthetic_hepg2": ("nadig2025", "nadig2025_hepg2", "GSE264667_hepg2_raw_singlecell_01.h5ad"),
    "synthetic_jurkat": ("nadig2025", "nadig2025_jurkat", "GSE264667_jurkat_raw_singlecell_01.h5ad"),
}
KEYS = ("cell_type", "perturbation_key", "control_label", "batch_key", "gene_index", "gene_id_column",
        "gene_symbol_column", "counts", "role")  # fmt: skip


def toml_value(v) -> str:
    return json.dumps(v)  # strings and ints: TOML's syntax is JSON's here


def write_manifest(path: pathlib.Path, sources: dict[str, dict]) -> pathlib.Path:
    """A manifest of `{source: {"files": [{...}], "datasets": [{...}]}}`."""
    lines = []
    for source, parts in sources.items():
        lines.append(f"[sources.{source}]\nfetch_by_default = true\n")
        for kind in ("files", "datasets"):
            for entry in parts.get(kind, []):
                lines.append(f"[[sources.{source}.{kind}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
                lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture()
def real_root(tiny_world, tmp_path, monkeypatch):
    """A data root in the real sources' layout (the tiny world's files under the real names) and a
    manifest of them with their true sizes and sha256, given through $VCELL_MANIFEST."""
    synthetic_root, _ = tiny_world
    specs = {s.name: s for s in lib.get_datasets("synthetic")}
    sources: dict[str, dict] = {}
    for synthetic_name, (source, name, file_name) in REAL_HOMES.items():
        spec = specs[synthetic_name]
        src = lib.get_dataset_path(spec, synthetic_root)
        dest = tmp_path / "data" / "raw" / source / file_name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        if spec.role == "target":  # the VCC download's other files sit next to the training file
            for extra in ("gene_names.csv", "pert_counts_Validation.csv", "pert_counts_Test.csv"):
                shutil.copyfile(src.parent / extra, dest.parent / extra)
        entry = {"name": file_name, "url": f"https://example.invalid/{file_name}", "size": dest.stat().st_size}
        entry["sha256"] = lib.sha256_file(dest)
        dataset = {"name": name, "path": file_name, **{k: getattr(spec, k) for k in KEYS}}
        sources.setdefault(source, {"files": [], "datasets": []})
        sources[source]["files"].append(entry)
        sources[source]["datasets"].append(dataset)
    manifest_path = write_manifest(tmp_path / "manifest.toml", sources)
    monkeypatch.setenv(lib.MANIFEST_ENV, str(manifest_path))
    return tmp_path / "data"


def run_03_04(data_root, **kw):
    hvg_cfg = lib.HvgConfig(data_root=str(data_root), world="real", n_hvg=100, n_hvg_per_dataset=100, offline=True)
    lib.run_hvg(lib.make_config(lib.HvgConfig, hvg_cfg, **kw))
    lib.run_normalise(lib.make_config(lib.NormaliseConfig, data_root=str(data_root), world="real", **kw))
    return lib.load_store(data_root, "real")


def test_missing_or_corrupt_context_sources_are_skipped_and_named(real_root, capsys):
    (real_root / "raw" / "nadig2025" / "GSE264667_jurkat_raw_singlecell_01.h5ad").unlink()
    with open(real_root / "raw" / "replogle2022" / "rpe1_raw_singlecell_01.h5ad", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))  # same size, other bytes: only the sha256 can tell

    store = run_03_04(real_root)

    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("skipping ")]
    assert len(skipped) == 4  # two datasets, once in 03 and once in 04
    assert any(line.startswith("skipping nadig2025_jurkat: ") and "missing" in line for line in skipped)
    assert any(line.startswith("skipping replogle2022_rpe1: ") and "sha256" in line for line in skipped)
    assert store.datasets == ["vcc2025_h1", "replogle2022_k562", "nadig2025_hepg2"]
    meta = json.loads((lib.get_hvg_dir(real_root, "real") / "hvg.json").read_text())
    assert meta["datasets"] == store.datasets


def test_missing_target_is_one_clear_error(real_root):
    (real_root / "raw" / "vcc2025" / "adata_Training.h5ad").unlink()
    with pytest.raises(lib.UserError, match=r"target dataset vcc2025_h1 .*--sources vcc2025"):
        lib.select_datasets("real", real_root)


def test_a_selection_names_datasets_of_the_world_and_may_be_the_target_alone(real_root):
    selected = lib.select_datasets("real", real_root, ["vcc2025_h1"])
    assert [s.name for s in selected] == ["vcc2025_h1"]  # allowed: the transfer baselines refuse it later
    with pytest.raises(lib.UserError, match=r"not datasets of world 'real'"):
        lib.select_datasets("real", real_root, ["vcc2025_h1", "replogle2022_k56"])
    with pytest.raises(lib.UserError, match=r"target dataset vcc2025_h1 cannot be used: not in --datasets"):
        lib.select_datasets("real", real_root, ["replogle2022_k562"])
    eda_cfg = lib.EdaConfig(data_root=str(real_root), world="real", datasets=("replogle2022_k562",))
    assert [e.spec.name for e in lib.run_eda(eda_cfg)] == ["replogle2022_k562"]  # 02 looks at any dataset


@pytest.mark.slow
def test_03_on_the_real_world_runs_with_only_some_files(real_root):
    """The issue's command: nb/03 --world real --offline with the Nadig files absent."""
    for name in ("GSE264667_hepg2_raw_singlecell_01.h5ad", "GSE264667_jurkat_raw_singlecell_01.h5ad"):
        (real_root / "raw" / "nadig2025" / name).unlink()
    cmd = [sys.executable, "nb/03_hvg.py", "--world", "real", "--offline", "--data-root", str(real_root)]
    out = subprocess.run([*cmd, "--n-hvg", "100"], cwd=REPO_DIR, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipping nadig2025_hepg2: " in out.stdout and "skipping nadig2025_jurkat: " in out.stdout
    assert json.loads((lib.get_hvg_dir(real_root, "real") / "hvg.json").read_text())["datasets"] == [
        "vcc2025_h1",
        "replogle2022_k562",
        "replogle2022_rpe1",
    ]


@pytest.mark.slow
def test_store_and_checkpoint_refuse_other_datasets_and_name_the_rerun(real_root, tmp_path):
    run_03_04(real_root)
    # 04 with another selection than 03 made the genes from.
    with pytest.raises(lib.UserError, match=r"re-run python nb/03_hvg.py --world real --datasets vcc2025_h1 replogle"):
        lib.run_normalise(
            lib.NormaliseConfig(data_root=str(real_root), world="real", datasets=("vcc2025_h1", "replogle2022_k562"))
        )
    train_kw = dict(hidden=16, n_layers=1, n_heads=2, mlp_ratio=2, set_size=8, sets_per_batch=2, steps=2)
    train_kw |= dict(eval_every=0, ckpt_every=0, val_perturbations=2, val_cells=8, val_control_cells=16)
    train_kw |= dict(n_coexpr_components=2, n_effect_components=2, wandb_mode="disabled", log_every=1)
    train_cfg = lib.make_config(
        lib.TrainConfig, data_root=str(real_root), world="real", checkpoint_dir=str(tmp_path / "ckpt"), **train_kw
    )
    with pytest.raises(lib.UserError, match=r"nb/04_normalise.py --world real --datasets vcc2025_h1 other"):
        lib.run_train(lib.make_config(lib.TrainConfig, train_cfg, datasets=("vcc2025_h1", "other")))
    result = lib.run_train(train_cfg)

    run_03_04(real_root, datasets=("vcc2025_h1", "replogle2022_k562"))  # the store now holds fewer datasets
    eval_cfg = lib.EvalConfig(
        data_root=str(real_root), world="real", checkpoint=result["run_dir"], predictors=("cell_mean",)
    )
    with pytest.raises(lib.UserError, match=r"trained on a store built from .*nb/05_train.py --world real"):
        lib.run_eval(eval_cfg)
    submit_cfg = lib.SubmitConfig(data_root=str(real_root), world="real", checkpoint=result["run_dir"], score=False)
    with pytest.raises(lib.UserError, match=r"retrain on this store .*--datasets vcc2025_h1 replogle2022_k562 "):
        lib.run_submit(submit_cfg)
    with pytest.raises(lib.UserError, match=r"--datasets \['vcc2025_h1'\] but the store"):
        lib.run_eval(
            lib.EvalConfig(data_root=str(real_root), world="real", checkpoint="none", datasets=("vcc2025_h1",))
        )

    run_03_04(real_root, datasets=("vcc2025_h1",))  # a target-only store: allowed, until context is needed
    eval_cfg = lib.EvalConfig(data_root=str(real_root), world="real", checkpoint="none")
    with pytest.raises(lib.UserError, match=r"pert_mean_transfer learns from other cell types.*holds only vcc2025_h1"):
        lib.run_eval(lib.make_config(lib.EvalConfig, eval_cfg, predictors=("cell_mean", "pert_mean_transfer")))


# ---------------------------------------------------------------- h5mu sources


def write_h5mu(path: pathlib.Path, dense: bool, seed: int = 0) -> anndata.AnnData:
    """A small MuData file: an `rna` modality (raw counts, obs guide_target, var symbols with a
    gene_ids column) and a `prot` one; the gem group lives in MuData's global obs."""
    import mudata

    rng = np.random.default_rng(seed)
    n_cells, n_genes = 120, 40
    counts = rng.poisson(2.0, (n_cells, n_genes)).astype(np.float32)
    cells = [f"cell{i}" for i in range(n_cells)]
    obs = pd.DataFrame({"guide_target": rng.choice(["NTC", "SYN00003", "SYN00007"], n_cells)}, index=cells)
    var = pd.DataFrame(
        {"gene_ids": [f"ENSG9{j:010d}" for j in range(1, n_genes + 1)]},
        index=[f"SYN{j:05d}" for j in range(1, n_genes + 1)],
    )
    rna = anndata.AnnData(X=counts if dense else scipy.sparse.csr_matrix(counts), obs=obs, var=var)
    prot = anndata.AnnData(X=rng.normal(size=(n_cells, 3)).astype(np.float32), obs=pd.DataFrame(index=cells))
    prot.obs["guide_target"] = "not-this-one"  # same column name in another modality: must not leak in
    mdata = mudata.MuData({"rna": rna, "prot": prot})
    mdata.obs["gem_group"] = rng.integers(1, 4, n_cells)
    mdata.write(path)
    return rna


@pytest.mark.filterwarnings("ignore:From 0.4 .update:FutureWarning")  # mudata's, when writing the test file
@pytest.mark.parametrize("dense", [False, True])
def test_h5mu_rna_modality_becomes_an_h5ad_once(tmp_path, monkeypatch, dense):
    source_dir = tmp_path / "data" / "raw" / "screen"
    source_dir.mkdir(parents=True)
    rna = write_h5mu(source_dir / "screen.h5mu", dense)
    h5mu_path = source_dir / "screen.h5mu"
    h5mu_entry = {"name": h5mu_path.name, "url": "https://example.invalid/screen.h5mu"}
    h5mu_entry |= {"size": h5mu_path.stat().st_size, "sha256": lib.sha256_file(h5mu_path)}
    dataset = dict(name="screen_ipsc", path="screen_rna.h5ad", cell_type="iPSC", perturbation_key="guide_target",
                   control_label="NTC", batch_key="gem_group", gene_index="symbol", gene_id_column="gene_ids",
                   role="target", h5mu_file="screen.h5mu", h5mu_modality="rna")  # fmt: skip
    manifest = write_manifest(tmp_path / "m.toml", {"screen": {"files": [h5mu_entry], "datasets": [dataset]}})
    monkeypatch.setenv(lib.MANIFEST_ENV, str(manifest))
    with pytest.raises(lib.UserError, match="not converted from the current screen.h5mu"):
        lib.select_datasets("real", tmp_path / "data")

    cfg = lib.DownloadConfig(data_root=str(tmp_path / "data"), world="real", sources=("screen",))
    lib.run_download(cfg)  # present and verified, so nothing is fetched; then converted
    h5ad_path = source_dir / "screen_rna.h5ad"
    got = anndata.read_h5ad(h5ad_path)
    expected_x = rna.X if dense else rna.X.toarray()
    assert isinstance(got.X, np.ndarray) == dense
    np.testing.assert_array_equal(got.X if dense else got.X.toarray(), expected_x)
    assert got.obs_names.tolist() == rna.obs_names.tolist() and got.var_names.tolist() == rna.var_names.tolist()
    assert got.obs["guide_target"].tolist() == rna.obs["guide_target"].tolist()
    assert got.var["gene_ids"].tolist() == rna.var["gene_ids"].tolist()
    import mudata

    assert got.obs["gem_group"].tolist() == mudata.read_h5mu(source_dir / "screen.h5mu").obs["gem_group"].tolist()

    mtime = h5ad_path.stat().st_mtime_ns
    assert not lib.convert_h5mu(source_dir / "screen.h5mu", h5ad_path, "rna")  # up to date: skipped
    assert h5ad_path.stat().st_mtime_ns == mtime
    assert [s.name for s in lib.select_datasets("real", tmp_path / "data")] == ["screen_ipsc"]
    with pytest.raises(lib.UserError, match=r"no modality 'atac' \(it has \['prot', 'rna'\]\)"):
        lib.convert_h5mu(source_dir / "screen.h5mu", tmp_path / "other.h5ad", "atac")
    assert not (tmp_path / "other.h5ad").exists()


# ---------------------------------------------------------------- dense and odd files


def test_wrong_manifest_keys_are_refused_with_what_the_file_has(tiny_world):
    data_root, _ = tiny_world
    spec = lib.get_datasets("synthetic")[1]
    cases = [
        (dict(perturbation_key="target"), r"obs has no column 'target' \(perturbation_key .*\['gene', 'gem_group'\]"),
        (dict(batch_key="batch"), r"obs has no column 'batch' \(batch_key"),
        (dict(gene_symbol_column="symbol"), r"var has no column 'symbol' \(gene_symbol_column.*\['gene_name'\]"),
        (dict(control_label="NTC"), r"no cells with gene == 'NTC' .*'non-targeting'"),
    ]
    import dataclasses

    with lib.open_h5ad_backed(lib.get_dataset_path(spec, data_root)) as (obs, var, _x):
        lib.check_dataset_keys(spec, obs, var)  # the manifest's own keys pass
        for change, message in cases:
            with pytest.raises(lib.UserError, match=message):
                lib.check_dataset_keys(dataclasses.replace(spec, **change), obs, var)


def test_duplicate_symbols_in_var_keep_the_first_and_are_reported(tmp_path):
    from test_store import make_spec, write_dataset

    specs = [
        make_spec("dup_target", role="target", gene_id_column="gene_id"),
        make_spec("dup_context", batch_key="gem_group"),  # var indexed by symbol, no id column
    ]
    write_dataset(tmp_path, specs[0], gene_u=np.arange(1, 41), n_cells=200, batches=[], seed=1)
    write_dataset(tmp_path, specs[1], gene_u=np.arange(1, 41), n_cells=200, batches=[1, 2], seed=2)
    path = lib.get_dataset_path(specs[1], tmp_path)
    adata = anndata.read_h5ad(path)
    names = adata.var_names.tolist()
    names[30] = names[5]  # SYN00006 twice: var entries 5 and 30
    adata.var_names = names
    adata.write_h5ad(path)
    with lib.open_h5ad_backed(path) as (_obs, var, _x):
        assert var.index.tolist().count("SYN00006") == 2
    # Symbols map to ids through the committed synthetic cache; all 40 target genes are shared.
    with pytest.warns(UserWarning, match="outside the shared gene space"):
        lib.run_hvg(lib.HvgConfig(data_root=str(tmp_path), n_hvg=40, n_hvg_per_dataset=20, offline=True), specs)
    lib.run_normalise(lib.NormaliseConfig(data_root=str(tmp_path), chunk_cells=50), specs=specs)

    unmapped = pd.read_csv(lib.get_hvg_dir(tmp_path, "synthetic") / "unmapped_genes.csv")
    assert unmapped[["dataset", "var_name", "id_source"]].values.tolist() == [["dup_context", "SYN00006", "duplicate"]]
    store = lib.load_store(tmp_path)
    col = store.genes["ensembl_id"].tolist().index("ENSG90000000006")
    # The store's column holds var entry 5 (the first), normalised over the whole cell (both entries).
    x = adata.X.toarray()
    expected = np.log1p(x[:, 5] / x.sum(1) * 1e4)
    rows = np.flatnonzero(store.index.loc[store.obs["group"], "dataset"].to_numpy() == "dup_context")
    got = np.asarray(store.x_cg[rows, col])
    np.testing.assert_allclose(got, expected[store.obs["source_row"].to_numpy()[rows]], rtol=1e-5, atol=1e-6)


DENSE_PROBE = """
import json, sys
import numpy as np, scipy.sparse
import lib

def status_kib(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts at the current RSS: earlier peaks do not count

spec = lib.DatasetSpec(**json.loads(sys.argv[1]))
root = sys.argv[2]
lib.normalise_log1p(scipy.sparse.csr_matrix(np.ones((4, 4), np.float32)))  # imports and JIT first
import scanpy  # noqa: F401
grown = {}
reset_peak()
before = status_kib("VmRSS:")
hvg = lib.HvgConfig(data_root=root, n_hvg=500, n_hvg_per_dataset=500, max_cells=20_000, chunk_cells=10_000, offline=True)
lib.run_hvg(hvg, specs=[spec])
grown["hvg"] = status_kib("VmHWM:") - before
reset_peak()
before = status_kib("VmRSS:")
lib.run_normalise(lib.NormaliseConfig(data_root=root, chunk_cells=2_000, force=True), specs=[spec])
grown["store"] = status_kib("VmHWM:") - before
print(json.dumps(grown))
"""


DENSE_SPEC = dict(name="fx_dense", source="fixture", path="fx.h5ad", cell_type="X", perturbation_key="gene",
                  control_label="non-targeting", batch_key="", gene_index="symbol", gene_id_column="gene_id",
                  gene_symbol_column="", counts="raw", role="target")  # fmt: skip


def write_counts_h5ad(path: pathlib.Path, spec, n_cells: int, n_genes: int, dense: bool, seed: int = 0) -> int:
    """Poisson counts (~10% non-zero) written in row blocks, X dense or CSR; returns X's bytes on disk."""
    rng = np.random.default_rng(seed)
    lam_g = rng.gamma(0.3, 0.4, n_genes)
    perts = ["non-targeting", *[f"SYN{u:05d}" for u in range(1, 21)]]
    obs = pd.DataFrame({spec.perturbation_key: rng.choice(perts, n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(
        {"gene_id": [f"ENSG9{u:010d}" for u in range(1, n_genes + 1)]},
        index=[f"SYN{u:05d}" for u in range(1, n_genes + 1)],
    )
    blocks = (np.random.default_rng([seed, a]).poisson(lam_g, (2_000, n_genes)) for a in range(0, n_cells, 2_000))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not dense:
        x = scipy.sparse.vstack([scipy.sparse.csr_matrix(b.astype(np.float32)) for b in blocks], format="csr")
        anndata.AnnData(x[:n_cells], obs=obs, var=var).write_h5ad(path)
        return x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    import h5py

    anndata.AnnData(obs=obs, var=var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        x = f.create_dataset("X", shape=(n_cells, n_genes), dtype=np.float32)
        x.attrs["encoding-type"], x.attrs["encoding-version"] = "array", "0.2.0"
        for a, block in zip(range(0, n_cells, 2_000), blocks):
            x[a : a + 2_000] = block[: n_cells - a].astype(np.float32)
    return n_cells * n_genes * 4


@pytest.mark.slow
def test_dense_x_goes_through_03_and_04_in_the_memory_of_sparse(tmp_path):
    """24,000 cells x 8,000 genes (Replogle's ~8.5k genes), ~10% non-zero: X is 768 MB dense, one
    HVG chunk of 10,000 dense rows 320 MB (> DENSE_READ_BYTES). Peak RSS growth of 03 and 04 on the
    dense file is compared with the same counts stored sparse, in fresh processes."""
    spec = DENSE_SPEC
    grown, x_bytes = {}, {}
    for kind in ("sparse", "dense"):
        root = tmp_path / kind
        x_bytes[kind] = write_counts_h5ad(
            root / "raw" / "fixture" / "fx.h5ad", lib.DatasetSpec(**spec), 24_000, 8_000, kind == "dense"
        )
        out = subprocess.run(
            [sys.executable, "-c", DENSE_PROBE, json.dumps(spec), str(root)],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO_DIR,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        grown[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    store_x = [np.load(tmp_path / kind / "store" / "synthetic" / "x_cg.npy", mmap_mode="r") for kind in grown]
    np.testing.assert_array_equal(store_x[0], store_x[1])  # the same cells, whatever X's layout
    print(f"X bytes {x_bytes}; peak RSS growth (KiB) {grown}")
    for stage in ("hvg", "store"):
        dense_mib, sparse_mib = grown["dense"][stage] / 1024, grown["sparse"][stage] / 1024
        assert dense_mib < 1.25 * sparse_mib + 16, f"{stage}: dense grew {dense_mib:.0f} MiB, sparse {sparse_mib:.0f}"
    # 03 keeps its max_cells subsample (sparse) by design; 04 keeps only a chunk, far below X.
    assert grown["dense"]["store"] * 1024 < x_bytes["dense"] / 4
