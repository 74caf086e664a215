"""Cell sets per second from the store (grain loader) vs from in-memory arrays, and one train step
fed by the loader vs fed from memory. Not a test: a measurement.

    .venv/bin/python benchmarks/bench_loader.py --data-root /tmp/vsmall --repeats 5

Both sides run interleaved in one process (A B A B ...), so machine load hits both alike; each
repeat times `--batches` batches. Prints the median with min/max per side, the ratio of medians,
and /proc/loadavg. "Fed from memory" steps through `--batches` distinct batches drawn by the
loader beforehand and held in RAM (not one batch reused: that one would sit in the CPU caches).
The loader is first run through `--warm-batches` batches so the store's pages are mapped in this
process, as they are after the first minutes of training. The store must exist (nb/04_normalise.py).
"""

import argparse
import dataclasses
import pathlib
import statistics
import time

import numpy as np


def load_avg() -> str:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def summary(name: str, values: list[float], unit: str) -> str:
    return f"{name}: median {statistics.median(values):.1f} {unit} (min {min(values):.1f}, max {max(values):.1f}, n={len(values)})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="")
    parser.add_argument("--world", default="synthetic")
    parser.add_argument("--set-size", type=int, default=32)
    parser.add_argument("--sets-per-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=50, help="batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-batches", type=int, default=300)
    parser.add_argument("--worker-count", type=int, default=0, help="LoaderConfig.worker_count")
    parser.add_argument("--prefetch-batches", type=int, default=2, help="LoaderConfig.prefetch_batches")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import lib

    store = lib.load_store(args.data_root or None, args.world)
    vocab = lib.make_vocab(store.index)
    loader_cfg = lib.LoaderConfig(
        set_size=args.set_size,
        sets_per_batch=args.sets_per_batch,
        worker_count=args.worker_count,
        prefetch_batches=args.prefetch_batches,
    )
    dataset, examples = lib.make_loader(store, loader_cfg, vocab=vocab, seed=0)
    iterator = lib.iter_batches(dataset, loader_cfg)
    # In memory: the whole matrix as one numpy array and the same sampling rule (uniform rows of
    # the group, sorted), with no grain, no memmap.
    x_cg = np.asarray(store.x_cg)
    rows_k2 = examples[["start", "stop"]].to_numpy()
    ctrl_k2 = store.index.loc[examples["control_group"], ["start", "stop"]].to_numpy()
    rng = np.random.default_rng(0)

    def memory_batch():
        ks = rng.integers(len(rows_k2), size=args.sets_per_batch)

        def draw(a, b):
            return np.sort(rng.choice(b - a, args.set_size, replace=b - a < args.set_size)) + a

        return {
            "ctrl_bsg": np.stack([x_cg[draw(*ctrl_k2[k])] for k in ks]),
            "pert_bsg": np.stack([x_cg[draw(*rows_k2[k])] for k in ks]),
            "pert_id_b": vocab.ids(
                examples["perturbation"].to_numpy()[ks], is_control=examples["is_control"].to_numpy()[ks]
            ),
        }

    print(f"store {store.x_cg.shape}, B={args.sets_per_batch} S={args.set_size}; loadavg before: {load_avg()}")
    for _ in range(args.warm_batches):
        next(iterator)  # map the store's pages and warm grain's pipeline
    memory_batch()
    loader_rate, memory_rate = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        loader_rate.append(args.batches * args.sets_per_batch / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(args.batches):
            memory_batch()
        memory_rate.append(args.batches * args.sets_per_batch / (time.perf_counter() - t))
    print(summary("loader (store memmap, grain)", loader_rate, "sets/s"))
    print(summary("in-memory numpy gather     ", memory_rate, "sets/s"))
    print(
        f"ratio loader / memory (medians): {statistics.median(loader_rate) / statistics.median(memory_rate):.2f}; loadavg: {load_avg()}"
    )

    # A train step (the defaults' model) fed by the loader vs fed from batches held in memory.
    cfg = lib.make_config(lib.TrainConfig, set_size=args.set_size, sets_per_batch=args.sets_per_batch)
    features = lib.make_pert_features(store, vocab, "onehot")
    model = lib.make_model(
        dataclasses.replace(cfg.model, n_genes=store.x_cg.shape[1], n_pert_features=features.width),
        key=jax.random.key(0),
    )
    optimizer = lib.make_train_optimizer(cfg)
    opt_state = lib.init_opt_state(model, optimizer)
    loss_cfg = cfg.loss
    oov_f, dropout = jnp.asarray(features.get_target(np.array([1]))[0]), jnp.float32(cfg.oov_dropout)
    in_memory = [next(iterator) for _ in range(args.batches)]

    def step(batch, i):
        nonlocal model, opt_state
        pert_bf = features.get_target(batch["pert_id_b"])
        model, opt_state, metrics = lib.train_step(
            model,
            opt_state,
            optimizer,
            jnp.asarray(batch["ctrl_bsg"]),
            jnp.asarray(pert_bf),
            jnp.asarray(batch["pert_bsg"]),
            jnp.asarray(batch["pert_id_b"] != 0),
            oov_f,
            dropout,
            jax.random.key(i),
            loss_cfg,
        )
        return metrics

    jax.block_until_ready(step(in_memory[0], 0))  # compile
    fed, memory = [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        for i in range(args.batches):
            metrics = step(next(iterator), i)
        jax.block_until_ready(metrics)
        fed.append((time.perf_counter() - t) / args.batches * 1e3)
        t = time.perf_counter()
        for i in range(args.batches):
            metrics = step(in_memory[i], i)
        jax.block_until_ready(metrics)
        memory.append((time.perf_counter() - t) / args.batches * 1e3)
    print(summary("train step fed by the loader", fed, "ms"))
    print(summary("train step, in-memory batch ", memory, "ms"))
    print(
        f"ratio loader-fed / in-memory (medians): {statistics.median(fed) / statistics.median(memory):.3f}; loadavg after: {load_avg()}"
    )


if __name__ == "__main__":
    main()
