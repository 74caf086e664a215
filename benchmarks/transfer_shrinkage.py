"""Why the raw transfer baseline is hard to beat on every metric at once: shrink its effects and watch.

Not a test: the logbook's study of how DES, PDS and MAE respond when pert_mean_transfer's
predicted effect T_p (the other cell types' mean effect of the same perturbation) is denoised or
rescaled before it becomes cells (EffectPredictor: exact-mean cells, the learned knockdown). Each
variant is scored by the 06 harness (lib.score_predictors) on the fake-val and truth scenarios of
an existing world (run compare_predictors.py first: it generates `<data-root>/<size>_seed<S>` with
its store), normalised against cell-mean:

    pmt                 T_p as it is (the pert_mean_transfer baseline)
    gate_z<k>           T_p where |T_p| > k standard errors of the context means, else 0
    stein_<c>           T_p * z^2 / (z^2 + c): small-z entries shrunk, large ones kept
    gain_<a>            a * T_p
    ls_gain             the least-squares gain of the training effects on T_p (an honest, MSE-fitted scale)

The standard error of T_p per gene comes from each context dataset's control variance and the
perturbation's cell count there (var/n_pert + var/n_control, averaged like T_p over datasets).

    uv run python benchmarks/transfer_shrinkage.py --root /tmp/cmp/small_seed0 --out shrink_seed0.csv
    uv run python benchmarks/transfer_shrinkage.py --summarise shrink_seed0.csv shrink_seed1.csv shrink_seed2.csv
"""

import argparse

import numpy as np
import pandas as pd

import lib


def make_standard_errors(store, transfer: lib.TransferEffects, n_genes: int, hvg_cols_v):
    """perturbation -> standard error of TransferEffects.effect per target gene (inf outside the HVGs)."""
    control_var = {}
    for d in transfer.others:
        index = store.index[(store.index["dataset"] == d) & store.index["is_control"].to_numpy(bool)]
        rows = np.concatenate([np.arange(a, b) for a, b in zip(index["start"], index["stop"])])
        x_cv = np.asarray(store.x_cg[np.sort(rows)], dtype=np.float64)
        control_var[d] = (x_cv.var(axis=0), len(rows))
    cache = {}

    def standard_error(perturbation: str) -> np.ndarray:
        if perturbation not in cache:
            key = lib._perturbation_key(perturbation, transfer.target_id_of_symbol)
            var_sum_v, n_datasets_v = np.zeros(store.x_cg.shape[1]), np.zeros(store.x_cg.shape[1])
            for d in transfer.others:
                index = store.index[store.index["dataset"] == d]
                ids = transfer.id_of_symbol.get(d, {})
                keys = np.array([lib._perturbation_key(q, ids) for q in index["perturbation"]])
                n_pert = index[(keys == key) & ~index["is_control"].to_numpy(bool)]["n_cells"].sum()
                if n_pert == 0:
                    continue
                var_v, n_control = control_var[d]
                measured_v = store.measured_dg[store.datasets.index(d)]
                var_sum_v += np.where(measured_v, var_v / n_pert + var_v / n_control, 0.0)
                n_datasets_v += measured_v
            se_v = np.sqrt(
                np.divide(var_sum_v, n_datasets_v**2, out=np.full_like(var_sum_v, np.inf), where=n_datasets_v > 0)
            )
            se_g = np.full(n_genes, np.inf)
            se_g[hvg_cols_v] = se_v
            cache[perturbation] = se_g
        return cache[perturbation]

    return standard_error


def make_variants(transfer_of, standard_error, fit: lib.FitData) -> dict:
    def z_of(p):
        t_g, se_g = transfer_of(p), standard_error(p)
        return np.divide(np.abs(t_g), se_g, out=np.zeros_like(t_g), where=np.isfinite(se_g) & (se_g > 0))

    y_pg = fit.pert_mean_pg - fit.control_mean_g
    t_pg = np.stack([transfer_of(p) for p in fit.perturbations])
    ls_gain = float((t_pg * y_pg).sum() / (t_pg * t_pg).sum())
    variants = {"pmt": transfer_of, "ls_gain": lambda p: ls_gain * transfer_of(p)}
    for k in (1.0, 2.0, 3.0):
        variants[f"gate_z{k:g}"] = lambda p, k=k: np.where(z_of(p) > k, transfer_of(p), 0.0)
    for c in (1.0, 4.0):
        variants[f"stein_{c:g}"] = lambda p, c=c: transfer_of(p) * z_of(p) ** 2 / (z_of(p) ** 2 + c)
    for a in (0.75, 1.25):
        variants[f"gain_{a:g}"] = lambda p, a=a: a * transfer_of(p)
    return variants, ls_gain


def run(root: str, mode: str, seed: int) -> pd.DataFrame:
    cfg = lib.EvalConfig(data_root=root, mode=mode, checkpoint="none", seed=seed)
    files = lib.get_target_files(root, cfg.world)
    spec = files.spec
    gene_names = lib.read_gene_names(files.gene_names_path)
    data = lib.scan_harness_inputs(cfg, files, gene_names, lib.get_eval_dir(root, cfg.world))
    split, scan = data["split"], data["scan"]
    store = lib.load_store(root, cfg.world)
    target_genes = lib.get_target_gene_table(store, spec.name, gene_names)
    hvg_cols_v = lib.get_hvg_columns(store, target_genes)
    transfer = lib.TransferEffects(store, spec.name, target_genes)
    cache = {}

    def transfer_of(p):
        if p not in cache:
            cache[p] = transfer.effect(p)
        return cache[p]

    standard_error = make_standard_errors(store, transfer, len(gene_names), hvg_cols_v)
    scenarios = [(f"fake_{s}", split["train"], set(split[s])) for s in ("val", "test")]
    scenarios += [(f"truth_{s}", data["training_perts"], path) for s, path in files.truth_paths.items()]
    tables = []
    for scenario, fit_perts, held_out in scenarios:
        fit = lib.make_fit_data(
            gene_names, data["group_labels"], scan.sum_kg, scan.n_k, fit_perts, ["control:pred", "control:rest"]
        )
        knockdown = lib.fit_knockdown_fraction(fit)
        predictors = {"cell_mean": lib.make_baseline_predictor("cell_mean", fit)}
        variants, ls_gain = make_variants(transfer_of, standard_error, fit)
        for name, effect_of in variants.items():
            predictors[name] = lib.EffectPredictor(
                gene_names,
                effect_of,
                control_mean_g=fit.control_mean_g.astype(np.float32),
                knockdown_remaining=knockdown,
            )
        if isinstance(held_out, set):
            real = lib._select(scan.collected_cg, data["collected_labels"], held_out, spec.control_label, gene_names)
        else:
            real = lib._scenario_real_from_truth(held_out, spec, gene_names, cfg)
        summary, _, _ = lib.score_predictors(
            real,
            predictors,
            data["pool"],
            seed=seed,
            fixed_pseudobulk=False,
            mode=mode,
            control_label=spec.control_label,
        )
        summary.insert(0, "scenario", scenario)
        summary["ls_gain"] = ls_gain
        print(summary[["scenario", "predictor", "des", "pds", "mae", "s_des", "s_pds", "s_mae", "score"]].round(4))
        tables.append(summary)
    return pd.concat(tables, ignore_index=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="a world's data root with its store (e.g. /tmp/cmp/small_seed0)")
    parser.add_argument("--mode", default="vcc2025", choices=["vcc2025", "current"])
    parser.add_argument("--seed", type=int, default=0, help="harness seed (split, pools)")
    parser.add_argument("--out", default="", help="write the long table here (csv)")
    parser.add_argument("--summarise", nargs="+", default=[], help="only print the mean ± sd table of these csvs")
    args = parser.parse_args(argv)
    if args.summarise:
        results = pd.concat([pd.read_csv(p).assign(file=p) for p in args.summarise], ignore_index=True)
    else:
        results = run(args.root, args.mode, args.seed).assign(file=args.root)
        if args.out:
            lib.write_csv(args.out, results)
    metrics = ["des", "pds", "mae", "s_des", "s_pds", "s_mae", "score"]
    grouped = results.groupby(["scenario", "predictor"], sort=False)[metrics]
    table = grouped.mean().map("{:.3f}".format) + "±" + grouped.std().fillna(0).map("{:.3f}".format)
    table.insert(0, "n", grouped.size())
    with pd.option_context("display.width", 250, "display.max_rows", 200):
        print(table.to_string())


if __name__ == "__main__":
    main()
