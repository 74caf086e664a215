"""vcell: everything the notebooks share, in pipeline order.

Sections: paths & io · manifest · download · synthetic world · gene ids · HVG ·
normalise & store · (loader · model · losses · metrics · train · infer: later issues).

Shape suffixes on array names: c cell, g gene, p perturbation, b batch, s set,
h hidden, k group. `x_cg` is a cells × genes matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import tomllib
from collections.abc import Iterable, Iterator
import typing
from typing import Any

import numpy as np

REPO_DIR = pathlib.Path(__file__).resolve().parent
MANIFEST_PATH = REPO_DIR / "data_manifest.toml"
DATA_ROOT_ENV = "VCELL_DATA_ROOT"


# ----------------------------------------------------------------------------
# paths & io
# ----------------------------------------------------------------------------


def get_data_root(data_root: str | os.PathLike | None = None) -> pathlib.Path:
    """The one data root: an explicit flag wins, then $VCELL_DATA_ROOT, then ./data.

    Relative paths are taken from the repository, so notebooks behave the same
    from any working directory.
    """
    root = data_root or os.environ.get(DATA_ROOT_ENV) or "data"
    path = pathlib.Path(root).expanduser()
    return path if path.is_absolute() else REPO_DIR / path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only on success.

    Readers never see a half-written file, and a failure leaves the previous
    version of `path` untouched.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp_path:
        tmp_path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_h5ad(path: str | os.PathLike, adata) -> None:
    with atomic_path(path) as tmp_path:
        adata.write_h5ad(tmp_path)


def in_marimo_notebook() -> bool:
    """True inside `marimo edit`/`run` (not in script mode, pytest or nbmake)."""
    if "marimo" not in sys.modules:
        return False
    import marimo as mo

    return mo.running_in_notebook()


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "") -> Iterable:
    """Progress for long loops: a marimo progress bar in the editor, tqdm elsewhere."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if in_marimo_notebook():
        import marimo as mo

        return mo.status.progress_bar(iterable, total=total, title=desc)
    import tqdm

    return tqdm.tqdm(iterable, total=total, desc=desc, mininterval=1.0, file=sys.stderr)


def notebook_argv() -> list[str]:
    """Command-line flags for a notebook: real ones in script mode, none elsewhere.

    Under nbmake/Jupyter `sys.argv` holds the kernel's own flags, under pytest the
    test runner's, and in `marimo edit` flags come after `--` (marimo strips them
    into sys.argv too), so only script mode and `marimo edit nb.py -- ...` pass flags.
    """
    if "ipykernel" in sys.modules or "pytest" in sys.modules:
        return []
    return sys.argv[1:]


def parse_config(config_cls, argv: list[str] | None = None, description: str = ""):
    """Parse a frozen dataclass config from flags (tyro: `--help` shows each field's docstring)."""
    import tyro

    return tyro.cli(config_cls, args=notebook_argv() if argv is None else argv, description=description)


# ----------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One h5ad file of one cell type, and the keys that matter downstream."""

    name: str
    """Unique name, e.g. `vcc2025_h1` or `synthetic_k562`."""
    source: str
    """The manifest source it belongs to."""
    path: str
    """File path relative to the source's directory under `<data_root>/raw/<source>/`."""
    cell_type: str
    """Cell type of every cell in the file (H1, K562, ...)."""
    perturbation_key: str
    """obs column naming the perturbed gene (symbol)."""
    control_label: str
    """Value of `perturbation_key` for control (non-targeting) cells."""
    batch_key: str
    """obs column with the batch (gem group, Flex lane), or "" if none."""
    gene_index: str
    """What `var.index` holds: `symbol` or `ensembl` (version suffixes allowed)."""
    gene_id_column: str
    """var column with Ensembl ids when the index holds symbols, else ""."""
    gene_symbol_column: str
    """var column with symbols when the index holds Ensembl ids, else ""."""
    counts: str
    """`raw` for integer UMI counts, `log1p` for already normalised data."""
    role: str
    """`target` for the cell type we predict, `context` for the others."""


def read_manifest(path: str | os.PathLike = MANIFEST_PATH) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def get_datasets(world: str, manifest: dict[str, Any] | None = None) -> list[DatasetSpec]:
    """The datasets that make up a world: `synthetic`, or `real` (every real source
    that lists datasets). The target dataset comes first."""
    manifest = read_manifest() if manifest is None else manifest
    sources = manifest["sources"]
    if world == "synthetic":
        names = ["synthetic"]
    elif world == "real":
        names = [n for n, s in sources.items() if n != "synthetic" and s.get("datasets")]
    else:
        raise ValueError(f"unknown world {world!r}: use 'synthetic' or 'real'")
    fields = {f.name for f in dataclasses.fields(DatasetSpec)}
    specs = []
    for source in names:
        for entry in sources[source].get("datasets", []):
            unknown = set(entry) - fields
            if unknown:
                raise ValueError(f"manifest source {source!r}: unknown dataset keys {sorted(unknown)}")
            defaults = dict(batch_key="", gene_id_column="", gene_symbol_column="", counts="raw", role="context")
            specs.append(DatasetSpec(source=source, **{**defaults, **entry}))
    specs.sort(key=lambda s: s.role != "target")
    if sum(s.role == "target" for s in specs) != 1:
        raise ValueError(f"world {world!r} must have exactly one dataset with role = 'target'")
    return specs


def get_dataset_path(spec: DatasetSpec, data_root: str | os.PathLike | None = None) -> pathlib.Path:
    return get_data_root(data_root) / "raw" / spec.source / spec.path


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# configs shared by the data notebooks
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Flags every data notebook takes."""

    data_root: str = ""
    """Data root; empty means $VCELL_DATA_ROOT, else ./data (git-ignored)."""
    world: typing.Literal["synthetic", "real"] = "synthetic"
    """`synthetic`: the locally generated world (default); `real`: the downloaded sources."""


# ----------------------------------------------------------------------------
# synthetic world
# ----------------------------------------------------------------------------
# A seeded stand-in for the real sources, written in their on-disk layouts so the
# same code reads both. The biology is simple but has the structure that makes the
# problem real (and that a model can exploit or fail to):
#   log mu_cg = base_g[cell type] + batch_bg + loading_g * z_c[module(g)]
#               + kd_c * effect_pg[cell type] (+ log(1 - kd_c) on the target gene)
#   counts_cg ~ NegBinomial(mean = L_c * softmax(log mu_c)_g, dispersion_g)
# Genes belong to co-expression modules (z_c: per-cell program activity, one of them
# a strong cell-cycle-like program); knocking a gene down moves its own module
# (so co-expression tells you what a gene does) plus a few random edges and, for
# strong perturbations, a generic stress response. Effects are shared across cell
# types up to a cell-type-specific modulation, so other cell types carry signal
# about H1's unseen perturbations.


@dataclasses.dataclass(frozen=True)
class SyntheticSize:
    """How big a synthetic world is."""

    n_genes_universe: int
    """Genes in the shared universe; each dataset measures a subset."""
    n_genes_target: int
    """Genes measured in the target (H1) dataset: the submission's gene list."""
    n_perts_target: tuple[int, int, int]
    """Target perturbations in (train, validation, test), shaped like VCC's 150/50/100."""
    cells_per_pert_target: int
    """Median cells per target perturbation (drawn per perturbation around it)."""
    n_control_target: int
    """Control cells in the target training file (each truth file gets a third)."""
    n_perts_context: int
    """Perturbations per context dataset (K562, RPE1, HepG2, Jurkat)."""
    cells_per_pert_context: int
    """Median cells per context perturbation."""
    n_control_context: int
    """Control cells per context dataset."""
    median_umi: int
    """Median UMIs per cell in the target; context datasets scale it."""
    n_modules: int
    """Co-expression modules (programs) in the gene network."""
    chunk_cells: int = 20_000
    """Cells generated at once: bounds memory for the vcc-scale world."""


SYNTHETIC_SIZES = {
    "tiny": SyntheticSize(800, 600, (24, 8, 16), 30, 240, 60, 20, 160, 6_000, 16),
    "small": SyntheticSize(5_000, 4_000, (150, 50, 100), 30, 1_500, 200, 16, 600, 12_000, 100),
    "vcc": SyntheticSize(20_000, 18_080, (150, 50, 100), 1_220, 38_176, 2_000, 40, 8_000, 50_000, 400),
}

# (dataset name, cell type, relative library size, number of batches); the layout of
# each file (keys, gene id convention, control label) comes from the manifest.
_SYNTHETIC_CELL_TYPES = [
    ("synthetic_h1", "H1", 1.0, 4),
    ("synthetic_k562", "K562", 0.8, 3),
    ("synthetic_rpe1", "RPE1", 0.7, 3),
    ("synthetic_hepg2", "HepG2", 0.6, 2),
    ("synthetic_jurkat", "Jurkat", 0.6, 2),
]


def synthetic_symbol(gene_u: np.ndarray) -> np.ndarray:
    """Symbols of universe genes: `SYN00042`."""
    return np.char.add("SYN", np.char.zfill(np.asarray(gene_u).astype(str), 5))


def synthetic_ensembl_id(gene_u: np.ndarray) -> np.ndarray:
    """Ensembl-like ids (`ENSG9` + 10 digits): cannot clash with real ids."""
    return np.char.add("ENSG9", np.char.zfill(np.asarray(gene_u).astype(str), 10))


def _barcodes(rng: np.random.Generator, n: int, suffixes: np.ndarray) -> np.ndarray:
    """Unique 24-base barcodes with a per-cell suffix, like `AAAC...AGG-Flex_1_01`."""
    codes = np.unique(rng.integers(0, 4**24, size=int(n * 1.01) + 16))
    codes = rng.permutation(codes)[:n]
    digits = (codes[:, None] // (4 ** np.arange(23, -1, -1))) % 4
    bases = np.array(list("ACGT"))[digits]
    return np.char.add(np.char.add(bases.view(f"<U24").ravel(), "-"), suffixes.astype(str))


def _make_gene_network(rng: np.random.Generator, size: SyntheticSize) -> dict[str, np.ndarray]:
    """Universe-level biology shared by every cell type."""
    n_u = size.n_genes_universe
    module_u = rng.integers(0, size.n_modules, n_u)
    loading_u = rng.normal(0.0, 0.6, n_u) * (rng.random(n_u) < 0.6)  # 40% of genes ignore their module
    loading_u[module_u == 0] *= 1.5  # module 0 is the strong cell-cycle-like program
    log_base_u = rng.normal(0.0, 2.0, n_u)
    log_base_u[module_u == 0] += 1.0
    theta_u = np.exp(rng.normal(1.0, 0.7, n_u))  # NB inverse dispersion
    stress_u = rng.normal(0.0, 0.5, n_u) * (rng.random(n_u) < 0.03)  # generic response of strong knockdowns
    return dict(module_u=module_u, loading_u=loading_u, log_base_u=log_base_u, theta_u=theta_u, stress_u=stress_u)


def _make_effects(rng: np.random.Generator, net: dict, targets_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Universe-level downstream effects of knocking down each target: (effect_pu, strength_p).

    Most perturbations are weak, some strong (as in real screens). A target moves its
    own module against its loading (less of a member means less module activity), a
    few random genes, and if strong a shared stress response.
    """
    n_p, n_u = len(targets_p), len(net["module_u"])
    tier_p = rng.choice(3, size=n_p, p=[0.5, 0.35, 0.15])
    strength_p = np.array([0.1, 0.6, 1.5])[tier_p] * np.exp(rng.normal(0, 0.3, n_p))
    effect_pu = np.zeros((n_p, n_u), np.float32)
    for p, target in enumerate(targets_p):
        same_module_u = net["module_u"] == net["module_u"][target]
        sign = np.sign(net["loading_u"][target]) or 1.0
        effect_pu[p] = -1.5 * strength_p[p] * sign * net["loading_u"] * same_module_u
        # Strong knockdowns reach ~3% of all genes beyond their module.
        edges = rng.choice(n_u, size=min(n_u, rng.poisson(2 + 0.02 * n_u * strength_p[p])), replace=False)
        effect_pu[p, edges] += rng.normal(0.0, 0.8 * strength_p[p], len(edges))
        effect_pu[p] += max(strength_p[p] - 0.5, 0.0) * net["stress_u"]
        effect_pu[p, target] = 0.0  # the target's own change is the knockdown itself
    return effect_pu, strength_p


def _cell_type_effects(rng: np.random.Generator, effect_pu: np.ndarray, net: dict) -> np.ndarray:
    """Cell-type-specific modulation of shared effects: per-module gain, per-perturbation
    gain, and 15% of edges that this cell type lacks."""
    module_gain_m = np.exp(rng.normal(0.0, 0.3, net["module_u"].max() + 1))
    pert_gain_p = np.exp(rng.normal(0.0, 0.3, effect_pu.shape[0]))
    kept_pu = rng.random(effect_pu.shape) > 0.15
    return (effect_pu * module_gain_m[net["module_u"]][None] * pert_gain_p[:, None] * kept_pu).astype(np.float32)


def _sample_counts(
    rng: np.random.Generator,
    *,
    log_mu_g: np.ndarray,
    net_g: dict,
    batch_offset_bg: np.ndarray,
    effect_pg: np.ndarray,
    pert_c: np.ndarray,
    target_col_p: np.ndarray,
    kd_p: np.ndarray,
    batch_c: np.ndarray,
    library_c: np.ndarray,
    n_modules: int,
):
    """NB counts for one chunk of cells (pert_c = -1 for control). Returns CSR float32."""
    import scipy.sparse

    n_c = len(pert_c)
    z_cm = rng.normal(0.0, 0.25, (n_c, n_modules))
    z_cm[:, 0] = 1.2 * (rng.random(n_c) < 0.4) + rng.normal(0.0, 0.2, n_c)  # cycling vs not
    logits_cg = log_mu_g[None] + batch_offset_bg[batch_c] + net_g["loading"][None] * z_cm[:, net_g["module"]]
    perturbed_c = pert_c >= 0
    # Knockdown efficiency per cell: the perturbation's efficiency, some cells escape.
    escaped_c = rng.random(n_c) < 0.1
    kd_c = np.where(perturbed_c & ~escaped_c, kd_p[np.maximum(pert_c, 0)] * rng.uniform(0.7, 1.0, n_c), 0.0)
    logits_cg[perturbed_c] += kd_c[perturbed_c, None] * effect_pg[pert_c[perturbed_c]]
    rows = np.flatnonzero(perturbed_c & (target_col_p[np.maximum(pert_c, 0)] >= 0))
    logits_cg[rows, target_col_p[pert_c[rows]]] += np.log1p(-0.98 * kd_c[rows])
    logits_cg -= logits_cg.max(axis=1, keepdims=True)
    prob_cg = np.exp(logits_cg)
    prob_cg /= prob_cg.sum(axis=1, keepdims=True)
    mean_cg = prob_cg * library_c[:, None]
    theta_g = net_g["theta"][None]
    counts_cg = rng.negative_binomial(theta_g, theta_g / (theta_g + mean_cg))
    return scipy.sparse.csr_matrix(counts_cg.astype(np.float32))


def _write_h5ad_chunked(path: pathlib.Path, obs, var, make_chunk, n_cells: int, chunk_cells: int, desc: str) -> None:
    """Write an h5ad whose CSR X is generated chunk by chunk (bounded memory), atomically."""
    import anndata
    import h5py

    starts = list(range(0, n_cells, chunk_cells))
    with atomic_path(path) as tmp_path:
        for i, start in enumerate(progress(starts, desc=desc)):
            x_chunk = make_chunk(start, min(start + chunk_cells, n_cells))
            if i == 0:
                anndata.AnnData(X=x_chunk, obs=obs.iloc[: x_chunk.shape[0]], var=var).write_h5ad(tmp_path)
                continue
            with h5py.File(tmp_path, "a") as f:
                anndata.io.sparse_dataset(f["X"]).append(x_chunk)
        if len(starts) > 1:  # obs was written for the first chunk only
            with h5py.File(tmp_path, "a") as f:
                del f["obs"]
                anndata.io.write_elem(f, "obs", obs)


def write_synthetic_world(data_root: str | os.PathLike | None = None, size: str = "small", seed: int = 0) -> dict:
    """Generate the synthetic world under `<data_root>/raw/synthetic/` (layouts: wip/README.md).

    Deterministic for (size, seed). Returns a summary: files written and their cell counts.
    """
    import pandas as pd

    if size not in SYNTHETIC_SIZES:
        raise ValueError(f"unknown synthetic size {size!r}: choose one of {sorted(SYNTHETIC_SIZES)}")
    sz = SYNTHETIC_SIZES[size]
    out_dir = get_data_root(data_root) / "raw" / "synthetic"
    specs = {s.name: s for s in get_datasets("synthetic")}
    rng = np.random.default_rng(seed)
    net = _make_gene_network(rng, sz)
    n_u = sz.n_genes_universe
    symbol_u, ensembl_u = synthetic_symbol(np.arange(1, n_u + 1)), synthetic_ensembl_id(np.arange(1, n_u + 1))
    version_u = rng.integers(1, 20, n_u)

    # Which genes each dataset measures; the target's list is the submission's gene list.
    target_genes = np.sort(rng.choice(n_u, sz.n_genes_target, replace=False))
    # Perturbations target reasonably expressed genes, as CRISPRi screens of essential genes do.
    expressed = target_genes[net["log_base_u"][target_genes] > np.quantile(net["log_base_u"], 0.4)]
    n_train, n_val, n_test = sz.n_perts_target
    target_perts = rng.choice(expressed, n_train + n_val + n_test, replace=False)
    split_of = dict(zip(target_perts, ["train"] * n_train + ["val"] * n_val + ["test"] * n_test))
    context_perts = {}
    for name, *_ in _SYNTHETIC_CELL_TYPES[1:]:
        shared = rng.choice(target_perts, int(0.4 * len(target_perts)), replace=False)
        others = rng.choice(np.setdiff1d(expressed, shared), sz.n_perts_context - len(shared), replace=False)
        context_perts[name] = np.concatenate([shared, others])
    all_perts = np.unique(np.concatenate([target_perts, *context_perts.values()]))
    effect_pu, strength_p = _make_effects(rng, net, all_perts)
    kd_eff_p = rng.beta(8, 2, len(all_perts))  # per-perturbation knockdown efficiency
    pert_row = {g: i for i, g in enumerate(all_perts)}

    summary = {"size": size, "seed": seed, "files": {}}
    for name, cell_type, library_scale, n_batches in _SYNTHETIC_CELL_TYPES:
        spec = specs[name]
        ds_rng = np.random.default_rng([seed, len(summary["files"])])
        is_target = spec.role == "target"
        if is_target:
            genes_g = target_genes
        else:
            perts = context_perts[name]
            keep = np.sort(rng.choice(n_u, int(n_u * rng.uniform(0.8, 0.95)), replace=False))
            genes_g = np.union1d(keep, perts)  # a screen measures the genes it perturbs
        col_of = {g: j for j, g in enumerate(genes_g)}
        log_mu_g = net["log_base_u"][genes_g] + ds_rng.normal(0.0, 0.4, len(genes_g))
        net_g = dict(module=net["module_u"][genes_g], loading=net["loading_u"][genes_g], theta=net["theta_u"][genes_g])
        effect_pg = _cell_type_effects(ds_rng, effect_pu, net)[:, genes_g]
        target_col_p = np.array([col_of.get(g, -1) for g in all_perts])
        batch_offset_bg = ds_rng.normal(0.0, 0.1, (n_batches, len(genes_g)))
        batch_scale_b = np.exp(ds_rng.normal(0.0, 0.15, n_batches))

        if spec.gene_index == "symbol":
            var = pd.DataFrame(index=pd.Index(symbol_u[genes_g], name=None))
            if spec.gene_id_column:
                var[spec.gene_id_column] = ensembl_u[genes_g]
        else:
            var = pd.DataFrame(index=np.char.add(np.char.add(ensembl_u[genes_g], "."), version_u[genes_g].astype(str)))
            var[spec.gene_symbol_column] = symbol_u[genes_g]

        def make_file(perts_of_file, cells_per_pert, n_control, file_rng, median_umi):
            """Per-cell perturbation rows (-1 control), batches, library sizes; shuffled."""
            n_cells_p = np.maximum(3, file_rng.poisson(cells_per_pert * np.exp(file_rng.normal(0, 0.3, len(perts_of_file)))))
            pert_c = np.concatenate([np.full(n_control, -1), np.repeat([pert_row[g] for g in perts_of_file], n_cells_p)])
            pert_c = file_rng.permutation(pert_c)
            batch_c = file_rng.integers(0, n_batches, len(pert_c))
            library_c = median_umi * batch_scale_b[batch_c] * np.exp(file_rng.normal(0.0, 0.35, len(pert_c)))
            return pert_c, batch_c, library_c

        def write(path, pert_c, batch_c, library_c, file_rng):
            symbols_c = np.where(pert_c >= 0, symbol_u[all_perts[np.maximum(pert_c, 0)]], spec.control_label)
            if is_target:
                batch_names = np.array([f"Flex_{1 + b // 2}_{1 + b % 2:02d}" for b in range(n_batches)])
                guides = np.where(pert_c >= 0, np.char.add(np.char.add(symbols_c, "_P1P2_A|"), np.char.add(symbols_c, "_P1P2_B")),
                                  np.char.add("non-targeting_", np.char.zfill((file_rng.integers(1, 200, len(pert_c))).astype(str), 4)))
                obs = pd.DataFrame({"target_gene": symbols_c, "guide_id": guides, "batch": batch_names[batch_c]},
                                   index=_barcodes(file_rng, len(pert_c), batch_names[batch_c]))
            else:
                obs = pd.DataFrame({"gene": symbols_c, "gem_group": batch_c + 1},
                                   index=_barcodes(file_rng, len(pert_c), (batch_c + 1).astype(str)))
            obs = obs.astype({c: "category" for c in obs.columns if obs[c].dtype == object})

            def make_chunk(start, stop):
                chunk_rng = np.random.default_rng([seed, len(summary["files"]), start])
                return _sample_counts(chunk_rng, log_mu_g=log_mu_g, net_g=net_g, batch_offset_bg=batch_offset_bg,
                                      effect_pg=effect_pg, pert_c=pert_c[start:stop], target_col_p=target_col_p,
                                      kd_p=kd_eff_p, batch_c=batch_c[start:stop], library_c=library_c[start:stop],
                                      n_modules=sz.n_modules)

            _write_h5ad_chunked(path, obs, var, make_chunk, len(pert_c), sz.chunk_cells, desc=f"{name}: {path.name}")
            summary["files"][str(path.relative_to(out_dir))] = {"n_cells": len(pert_c), "n_genes": len(genes_g)}

        median_umi = sz.median_umi * library_scale
        if not is_target:
            pert_c, batch_c, library_c = make_file(perts, sz.cells_per_pert_context, sz.n_control_context, ds_rng, median_umi)
            write(get_dataset_path(spec, data_root), pert_c, batch_c, library_c, ds_rng)
            continue
        vcc_dir = get_dataset_path(spec, data_root).parent
        splits = {"train": "adata_Training.h5ad", "val": "adata_Validation_truth.h5ad", "test": "adata_Test_truth.h5ad"}
        for split, file_name in splits.items():
            perts = np.array([g for g in target_perts if split_of[g] == split])
            n_control = sz.n_control_target if split == "train" else sz.n_control_target // 3
            pert_c, batch_c, library_c = make_file(perts, sz.cells_per_pert_target, n_control, ds_rng, median_umi)
            write(vcc_dir / file_name, pert_c, batch_c, library_c, ds_rng)
            if split != "train":
                # The challenge tells you how many cells to predict and their depth.
                counts = pd.DataFrame({"target_gene": symbol_u[all_perts[pert_c]], "umi": library_c})[pert_c >= 0]
                table = counts.groupby("target_gene", sort=False).agg(n_cells=("umi", "size"), median_umi_per_cell=("umi", "median"))
                table = table.loc[symbol_u[perts]].reset_index()
                table["median_umi_per_cell"] = table["median_umi_per_cell"].round(0)
                csv_name = "pert_counts_Validation.csv" if split == "val" else "pert_counts_Test.csv"
                with atomic_path(vcc_dir / csv_name) as tmp_path:
                    table.to_csv(tmp_path, index=False)
        with atomic_path(vcc_dir / "gene_names.csv") as tmp_path:
            tmp_path.write_text("\n".join(symbol_u[target_genes]) + "\n")

    # Generator internals, for tests and for checking that models find real signal.
    with atomic_path(out_dir / "truth.npz") as tmp_path:
        with open(tmp_path, "wb") as f:
            np.savez_compressed(f, perts_u=all_perts, effect_pu=effect_pu, strength_p=strength_p, kd_efficiency_p=kd_eff_p,
                                module_u=net["module_u"], loading_u=net["loading_u"])
    summary["splits"] = {s: sorted(symbol_u[g] for g in target_perts if split_of[g] == s) for s in ("train", "val", "test")}
    summary["context_perturbations"] = {n: sorted(symbol_u[p]) for n, p in context_perts.items()}
    write_json(out_dir / "world.json", summary)
    return summary
