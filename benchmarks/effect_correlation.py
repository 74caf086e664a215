"""How well a trained model's predicted effects match the real ones on the fake-val split.

Not a test: a diagnostic behind the logbook's "effect correlation" numbers. For up to
`--max-perts` perturbations of each part of the target's fake-val split (train / val / test),
predicts the canonical control pool with the checkpoint, and reports on the model's genes
(the store's HVGs): the MAE of the pseudobulk against the real one for the control mean, the
mean over perturbations (≈ cell-mean baseline) and the model, and the mean correlation of the
predicted effect (pred - control mean) with the real effect (real - control mean).

    uv run python benchmarks/effect_correlation.py --data-root data --run <run name>
"""

import argparse
import warnings

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="")
    parser.add_argument("--world", default="synthetic")
    parser.add_argument("--run", required=True, help="run directory name under <data_root>/checkpoints")
    parser.add_argument("--max-perts", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0, help="fake-val split seed (TrainConfig.fake_val_seed)")
    args = parser.parse_args(argv)

    import lib

    store = lib.load_store(args.data_root or None, args.world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not in the vocabulary" never happens for the split's own perturbations
        predictor = lib.load_model_predictor(lib.get_data_root(args.data_root or None) / "checkpoints" / args.run)
    assert predictor.genes["ensembl_id"].tolist() == store.genes["ensembl_id"].tolist(), (
        "checkpoint and store genes differ"
    )
    index = store.index[store.index["dataset"] == store.datasets[0]]

    def pseudobulk(groups) -> np.ndarray:
        return np.concatenate([np.asarray(store.x_cg[a:b]) for a, b in groups[["start", "stop"]].to_numpy()]).mean(0)

    control_g = pseudobulk(index[index["is_control"]])
    split = lib.make_fake_val_split(sorted(index.loc[~index["is_control"], "perturbation"].unique()), seed=args.seed)
    real = {p: pseudobulk(index[index["perturbation"] == p]) for part in split.values() for p in part}
    mean_effect_g = np.mean([real[p] for p in split["train"]], 0)
    for part, perts in split.items():
        perts = perts[: args.max_perts]
        pred = {p: predictor.predict(p, predictor.control_pool_cg).mean(0) for p in perts}
        mae = {
            name: np.mean([np.abs(guess(p) - real[p]).mean() for p in perts])
            for name, guess in [
                ("control", lambda p: control_g),
                ("cell_mean", lambda p: mean_effect_g),
                ("model", lambda p: pred[p]),
            ]
        }
        corr = np.mean([np.corrcoef(pred[p] - control_g, real[p] - control_g)[0, 1] for p in perts])
        print(
            f"{part}: {len(perts)} perts, MAE "
            + ", ".join(f"{k} {v:.4f}" for k, v in mae.items())
            + f"; effect correlation {corr:.3f}"
        )
    model = predictor.model
    if model.effect_gain_g is not None:
        gain = np.percentile(np.asarray(model.effect_gain_g), [10, 50, 90])
        print(f"transfer gain 10/50/90%: {gain.round(4).tolist()}; knockdown fraction {float(model.knockdown):.3f}")


if __name__ == "__main__":
    main()
