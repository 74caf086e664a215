"""Peak RSS of streaming a 100,000-cell × 18,080-gene submission (not a test).

    uv run python benchmarks/bench_submission.py                 # 100,000 cells, chunks of 1,024
    uv run python benchmarks/bench_submission.py --cells 20000   # quicker

The predictor is cheap (control cell + a fixed effect on 2,000 genes) so the number measures
the writer: control-pool reads (pread), prediction chunks, CSR conversion, the h5ad append and
the .vcc packing. The reference is the peak RSS right after `import lib` in the same process.
Goal: writing peak ≤ 1 GB.
"""

import argparse
import pathlib
import resource
import tempfile
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=18_080)
    parser.add_argument("--pool", type=int, default=4_000, help="control cells in the pool")
    parser.add_argument("--chunk-cells", type=int, default=1_024)
    parser.add_argument("--density", type=float, default=0.35, help="fraction of non-zero genes per control cell")
    args = parser.parse_args()

    import lib  # the reference: what importing the project costs

    rss_import = peak_rss_mb()
    import numpy as np
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        genes = [f"G{i:05d}" for i in range(args.genes)]
        # The pool, written a block at a time (a real pool comes from scan_h5ad the same way).
        pool_path, offset = lib.write_dense_rows_npy(tmp / "pool.npy", args.pool, args.genes)
        rng = np.random.default_rng(0)
        with open(pool_path, "r+b") as fh:
            for start in range(0, args.pool, 256):
                n = min(256, args.pool - start)
                block = (rng.random((n, args.genes), dtype=np.float32) < args.density) * rng.uniform(
                    0.5, 4, (n, args.genes)
                ).astype(np.float32)
                # log1p CP10K rows, as real control cells are (the submission check reads row sums)
                cp10k = np.expm1(block)
                block = np.log1p(cp10k * (lib.TARGET_SUM / cp10k.sum(1, keepdims=True)))
                fh.seek(offset + start * args.genes * 4)
                fh.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        del block
        n_perts = 100
        n_control = min(args.pool, args.cells // 10)
        per_pert = (args.cells - n_control) // n_perts
        perts = genes[:n_perts]
        pert_counts = pd.DataFrame({"target_gene": perts, "n_cells": per_pert})
        n_control = args.cells - per_pert * n_perts
        effect_g = np.zeros(args.genes, np.float32)
        effect_g[:2_000] = rng.normal(0, 0.3, 2_000)
        predictor = lib.EffectPredictor(genes, lambda p: effect_g)
        rss_before = peak_rss_mb()
        t0 = time.perf_counter()
        h5ad = lib.write_predictor_submission(
            tmp / "sub.h5ad",
            predictor,
            gene_names=genes,
            pert_counts=pert_counts,
            pool=lib.ControlPool(pool_path),
            n_control=n_control,
            chunk_cells=args.chunk_cells,
            max_cells=max(args.cells, lib.MAX_SUBMISSION_CELLS),
        )
        t_write = time.perf_counter() - t0
        rss_write = peak_rss_mb()
        t0 = time.perf_counter()
        vcc = lib.pack_vcc(h5ad)
        t_pack = time.perf_counter() - t0
        rss_pack = peak_rss_mb()
        print(
            f"cells {args.cells:,} × genes {args.genes:,} (pool {args.pool:,}, chunk {args.chunk_cells:,}, density {args.density})"
        )
        print(
            f"h5ad {h5ad.stat().st_size / 1e9:.2f} GB in {t_write:.0f} s; .vcc {vcc.stat().st_size / 1e9:.2f} GB in {t_pack:.0f} s"
        )
        print(f"peak RSS after import lib : {rss_import:8.0f} MB")
        print(f"peak RSS before writing   : {rss_before:8.0f} MB")
        print(
            f"peak RSS after writing    : {rss_write:8.0f} MB  (ratio to import {rss_write / rss_import:.2f}; goal ≤ 1024 MB: "
            f"{'met' if rss_write <= 1024 else 'NOT met'})"
        )
        print(f"peak RSS after packing    : {rss_pack:8.0f} MB")


if __name__ == "__main__":
    main()
