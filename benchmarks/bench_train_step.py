"""Train-step time of our ST model (JAX) and, for reference, Arc's arc-state ST (torch).

Not a test: a measurement. Same shape on both sides: S cells per set, B sets per step,
G genes, a one-hot-width perturbation feature, energy loss, Adam lr 1e-4, grad-norm clip
10, hidden 128 x 4 layers x 8 heads, SwiGLU inner 1024, 2-layer encoders and decoder.
Random log1p-like data; the time is the median over steps after compilation/warm-up.

    # ours only (project venv)
    .venv/bin/python benchmarks/bench_train_step.py --engine jax --steps 20
    # ours, then arc-state in its own venv (python3.11 -m venv V; V/bin/pip install torch==2.13.0 arc-state), then ours again: a ratio
    .venv/bin/python benchmarks/bench_train_step.py --engine both --steps 20 \
        --state-python /tmp/statevenv/bin/python

The machine is shared: the script prints /proc/loadavg next to each block; compare
numbers from one run only.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import time

REPO_DIR = pathlib.Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["jax", "state", "both"], default="jax")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    parser.add_argument("--set-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="sets per step")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--pert-features", type=int, default=301)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--state-python", default="/tmp/statevenv/bin/python")
    return parser.parse_args(argv)


def load_avg() -> str:
    return pathlib.Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def summarise(engine: str, n_params: int, times_s: list[float], args) -> dict:
    return {
        "engine": engine,
        "params": n_params,
        "median_s": statistics.median(times_s),
        "min_s": min(times_s),
        "max_s": max(times_s),
        "steps": len(times_s),
        "shape": f"B={args.batch} S={args.set_size} G={args.genes} F={args.pert_features}",
        "loadavg_after": load_avg(),
    }


def make_data_np(args, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    rate_g = rng.uniform(0.05, 5.0, size=args.genes)
    shape = (args.batch, args.set_size, args.genes)
    ctrl_bsg = np.log1p(rng.poisson(rate_g, size=shape)).astype(np.float32)
    target_bsg = np.log1p(rng.poisson(rate_g * rng.uniform(0.5, 1.5, size=args.genes), size=shape)).astype(np.float32)
    pert_bf = np.eye(args.pert_features, dtype=np.float32)[rng.integers(0, args.pert_features, size=args.batch)]
    return ctrl_bsg, pert_bf, target_bsg


def bench_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    import lib

    cfg = dataclasses.replace(lib.RESEARCHER_MODEL, n_genes=args.genes, n_pert_features=args.pert_features)
    model = lib.make_model(cfg, key=jax.random.key(0))
    optimizer = lib.make_optimizer(learning_rate=1e-4, grad_clip=10.0)
    opt_state = lib.init_opt_state(model, optimizer)
    loss_cfg = lib.LossConfig(energy_weight=1.0, pseudobulk_mse_weight=0.0)  # STATE's loss: energy only
    ctrl_bsg, pert_bf, target_bsg = (jnp.asarray(a) for a in make_data_np(args))
    times_s = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        model, opt_state, metrics = lib.make_step(model, opt_state, optimizer, ctrl_bsg, pert_bf, target_bsg, loss_cfg)
        jax.block_until_ready((model, metrics))
        if step >= args.warmup:
            times_s.append(time.perf_counter() - start)
    return summarise("jax", lib.count_params(model), times_s, args)


def bench_state(args) -> dict:
    import torch
    from state.tx.models.state_transition import StateTransitionPerturbationModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = 128
    model = StateTransitionPerturbationModel(
        input_dim=args.genes,
        hidden_dim=hidden,
        output_dim=args.genes,
        pert_dim=args.pert_features,
        gene_dim=args.genes,
        output_space="gene",
        embed_key="X_hvg",
        cell_set_len=args.set_size,
        n_encoder_layers=2,
        n_decoder_layers=2,
        use_basal_projection=True,
        loss="energy",
        distributional_loss="energy",
        transformer_backbone_key="llama",
        transformer_backbone_kwargs=dict(
            bidirectional_attention=True,
            max_position_embeddings=args.set_size,
            hidden_size=hidden,
            intermediate_size=8 * hidden,  # same as ours (ModelConfig.mlp_ratio = 8)
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=hidden // 8,
            use_cache=False,
            vocab_size=32,  # the backbone gets inputs_embeds; keep its unused token table small
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            rotary_dim=0,
            use_rotary_embeddings=False,
        ),
    )
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    ctrl_bsg, pert_bf, target_bsg = (torch.from_numpy(a) for a in make_data_np(args))
    b, s, g = ctrl_bsg.shape
    batch = {
        "ctrl_cell_emb": ctrl_bsg.reshape(b * s, g),
        "pert_emb": pert_bf[:, None, :].expand(b, s, -1).reshape(b * s, -1),
        "pert_cell_emb": target_bsg.reshape(b * s, g),
    }
    times_s = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        pred_bsg = model(batch).reshape(b, s, g)
        # training_step's main path without Lightning's logging: per-set energy, nanmean.
        loss = torch.nanmean(model._compute_distribution_loss(pred_bsg, target_bsg))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if step >= args.warmup:
            times_s.append(time.perf_counter() - start)
    return summarise("state", n_params, times_s, args)


def run_state_subprocess(args) -> dict:
    flags = [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--set-size={args.set_size}",
        f"--batch={args.batch}",
        f"--genes={args.genes}",
        f"--pert-features={args.pert_features}",
        f"--threads={args.threads}",
    ]
    out = subprocess.run(
        [args.state_python, __file__, "--engine", "state", *flags],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.engine == "jax":
        print(json.dumps(bench_jax(args)))
    elif args.engine == "state":
        print(json.dumps(bench_state(args)))
    else:
        # jax, state, jax: two jax blocks bracket the torch one, so drift in load shows up.
        first = bench_jax(args)
        print(json.dumps(first), flush=True)
        state = run_state_subprocess(args)
        print(json.dumps(state), flush=True)
        args_again = argparse.Namespace(**{**vars(args), "warmup": 1})
        second = bench_jax(args_again)
        print(json.dumps(second), flush=True)
        jax_median = statistics.median([first["median_s"], second["median_s"]])
        print(json.dumps({"jax_over_state": jax_median / state["median_s"]}))


if __name__ == "__main__":
    main()
