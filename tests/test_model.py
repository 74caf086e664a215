"""Properties of the ST set transformer and its losses (CPU, small shapes, < 60 s in total)."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lib

# STATE's plain head unless a test asks for the residual one, the direct path or the exact-mean
# head (ModelConfig's defaults).
SMALL = dataclasses.replace(
    lib.RESEARCHER_MODEL, n_genes=24, n_pert_features=6, hidden=32, n_layers=1, n_heads=4, mlp_ratio=2
)

# Jitted calls: eager JAX compiles every op on its own, which costs more than these tests.
call_model = eqx.filter_jit(lambda model, ctrl_sg, pert_f: model(ctrl_sg, pert_f))
energy_distance = jax.jit(lib.energy_distance)
rbf_mmd = jax.jit(lib.rbf_mmd, static_argnums=2)


@pytest.fixture(scope="module")
def small_model():
    """One initialised SMALL model for the module. The "unsafe_rbg" key compiles the random
    init several times faster than the default threefry (seconds on this CPU)."""
    return lib.make_model(SMALL, key=jax.random.key(0, impl="unsafe_rbg"))


def make_cells(seed: int, n: int, g: int) -> np.ndarray:
    """Log1p-like cells: non-negative, sparse-ish, several units from the origin."""
    rng = np.random.default_rng(seed)
    return np.log1p(rng.poisson(rng.uniform(0.2, 8.0, size=g), size=(n, g))).astype(np.float32)


def numpy_energy(x_ng: np.ndarray, y_mg: np.ndarray) -> float:
    """geomloss SamplesLoss("energy") written the slow, obvious way, in float64."""
    x_ng, y_mg = x_ng.astype(np.float64), y_mg.astype(np.float64)

    def mean_dist(a, b):
        return np.mean([np.linalg.norm(ai - bj) for ai in a for bj in b])

    return mean_dist(x_ng, y_mg) - 0.5 * mean_dist(x_ng, x_ng) - 0.5 * mean_dist(y_mg, y_mg)


def test_energy_distance_matches_direct_numpy():
    x_ng, y_mg = make_cells(0, 9, 50), make_cells(1, 13, 50)
    got = float(energy_distance(jnp.asarray(x_ng), jnp.asarray(y_mg)))
    want = numpy_energy(x_ng, y_mg)
    assert want > 0.1  # the sets really differ, so the comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_energy_distance_is_zero_for_identical_sets():
    x_ng = jnp.asarray(make_cells(2, 16, 200))
    assert abs(float(energy_distance(x_ng, x_ng))) < 1e-4
    # A reordered copy is the same set.
    assert abs(float(energy_distance(x_ng, x_ng[::-1]))) < 1e-4


def test_mmd_is_nonnegative_and_zero_for_identical_sets():
    bandwidths = (1.0, 5.0)
    x_ng = jnp.asarray(make_cells(3, 12, 40))
    for seed in range(4, 9):
        y_mg = jnp.asarray(make_cells(seed, 10, 40))
        assert float(rbf_mmd(x_ng, y_mg, bandwidths)) >= 0.0
    assert abs(float(rbf_mmd(x_ng, x_ng, bandwidths))) < 1e-6
    shifted = float(rbf_mmd(x_ng, x_ng + 1.0, bandwidths))
    assert shifted > 1e-3  # and not zero when the sets differ


def test_set_loss_gradients_are_finite_for_identical_sets():
    # Duplicate cells inside a set too: ||x_i - x_j|| at 0 has a NaN gradient without the safe norm.
    x_ng = jnp.asarray(make_cells(10, 8, 30))
    x_ng = x_ng.at[1].set(x_ng[0])
    cfg = lib.LossConfig(energy_weight=1.0, mmd_weight=1.0, pseudobulk_mse_weight=1.0, mmd_bandwidths=(2.0,))

    def total(pred_ng):
        return sum(lib.set_losses(pred_ng, x_ng, cfg).values())

    grad_ng = jax.jit(jax.grad(total))(x_ng)
    assert np.isfinite(np.asarray(grad_ng)).all()
    np.testing.assert_allclose(np.asarray(grad_ng), 0.0, atol=1e-4)  # a minimum: gradient ~ 0


def test_set_model_is_permutation_equivariant(small_model):
    model = small_model
    ctrl_sg = jnp.asarray(make_cells(11, 10, SMALL.n_genes))
    pert_f = jax.random.normal(jax.random.key(1), (SMALL.n_pert_features,))
    perm_s = np.random.default_rng(0).permutation(10)
    pred_sg = call_model(model, ctrl_sg, pert_f)
    assert float(jnp.std(pred_sg)) > 0.1  # outputs vary, so the comparison is not vacuous
    np.testing.assert_allclose(call_model(model, ctrl_sg[perm_s], pert_f), pred_sg[perm_s], atol=1e-5)


def test_set_model_mixes_cells_of_a_set(small_model):
    # Attention must make each output depend on the other cells (else it is a per-cell MLP).
    model = small_model
    ctrl_sg = jnp.asarray(make_cells(12, 10, SMALL.n_genes))
    pert_f = jnp.ones(SMALL.n_pert_features)
    changed_sg = ctrl_sg.at[5].add(3.0)
    diff_sg = np.abs(np.asarray(call_model(model, changed_sg, pert_f) - call_model(model, ctrl_sg, pert_f)))
    assert diff_sg[0].max() > 1e-4


def hand_param_count(cfg: lib.ModelConfig) -> int:
    """Parameters from the layer shapes, by hand (weights + biases of each Linear)."""
    g, f, h, k = cfg.n_genes, cfg.n_pert_features, cfg.hidden, cfg.n_encoder_layers

    def mlp(n_in, n_out):  # k Linear layers with biases: n_in -> h -> ... -> h -> n_out
        widths = [n_in] + [h] * (k - 1) + [n_out]
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))

    inner = cfg.mlp_ratio * h
    block = 2 * h + 4 * h * h + 3 * h * inner  # two RMSNorm weights, q/k/v/o, SwiGLU gate/up/down
    transformer = cfg.n_layers * block + h  # + final RMSNorm
    return mlp(g, h) + mlp(f, h) + transformer + mlp(h, g)


def test_researcher_config_param_count_is_about_2_5_million():
    cfg = lib.RESEARCHER_MODEL
    model = eqx.filter_eval_shape(lib.make_model, cfg, key=jax.random.key(0))  # shapes only, no init
    n_params = lib.count_params(model)
    assert n_params == hand_param_count(cfg)
    assert 2.3e6 < n_params < 2.7e6  # the researcher's config: ~2.5M
    n_transformer = lib.count_params(model.blocks) + lib.count_params(model.final_norm)
    assert abs(n_transformer - 1.84e6) < 0.01e6  # the researcher's transformer: ~1.84M


# One optimiser and loss config for every make_step call here: filter_jit keys its cache on
# them, so the tests share one compilation.
OPTIMIZER = lib.make_optimizer(learning_rate=3e-3)
PSEUDOBULK_LOSS = lib.LossConfig(energy_weight=0.0, pseudobulk_mse_weight=1.0)


def make_overfit_batch(b: int = 4, s: int = 8):
    ctrl_bsg = jnp.asarray(make_cells(13, b * s, SMALL.n_genes).reshape(b, s, -1))
    pert_bf = jnp.asarray(np.eye(b, SMALL.n_pert_features, dtype=np.float32))
    # Each perturbation moves every gene by its own amount, some up and some down.
    effect_bg = jax.random.normal(jax.random.key(2), (b, SMALL.n_genes))
    return ctrl_bsg, pert_bf, jax.nn.relu(ctrl_bsg + effect_bg[:, None, :])


def test_one_batch_overfits_to_zero_pseudobulk_mse(small_model):
    model = small_model  # no gene-mean init: the harder start
    ctrl_bsg, pert_bf, target_bsg = make_overfit_batch()
    opt_state = lib.init_opt_state(model, OPTIMIZER)
    first = None
    for _ in range(200):
        model, opt_state, metrics = lib.make_step(
            model, opt_state, OPTIMIZER, ctrl_bsg, pert_bf, target_bsg, PSEUDOBULK_LOSS
        )
        first = float(metrics["pseudobulk_mse"]) if first is None else first
    last = float(metrics["pseudobulk_mse"])
    assert first > 0.3
    assert last < 1e-3, (first, last)


def test_make_step_reports_loss_terms_and_norms(small_model):
    ctrl_bsg, pert_bf, target_bsg = make_overfit_batch()
    opt_state = lib.init_opt_state(small_model, OPTIMIZER)
    new_model, _, metrics = lib.make_step(
        small_model, opt_state, OPTIMIZER, ctrl_bsg, pert_bf, target_bsg, PSEUDOBULK_LOSS
    )
    assert set(metrics) == {"loss", "pseudobulk_mse", "grad_norm", "update_norm"}
    assert float(metrics["loss"]) == float(metrics["pseudobulk_mse"])
    assert float(metrics["grad_norm"]) > 0 and float(metrics["update_norm"]) > 0
    # The update norm is the distance the parameters moved.
    moved = jax.tree.map(lambda a, b: a - b, eqx.filter(new_model, eqx.is_array), eqx.filter(small_model, eqx.is_array))
    np.testing.assert_allclose(float(optax.tree.norm(moved)), float(metrics["update_norm"]), rtol=1e-3)


def test_compute_loss_is_the_weighted_sum_of_its_terms(small_model):
    ctrl_bsg, pert_bf, target_bsg = make_overfit_batch()
    cfg = lib.LossConfig(energy_weight=2.0, mmd_weight=3.0, pseudobulk_mse_weight=5.0, mmd_bandwidths=(1.0, 4.0))
    loss, terms = eqx.filter_jit(lib.compute_loss)(small_model, ctrl_bsg, pert_bf, target_bsg, cfg)
    assert set(terms) == {"energy", "mmd", "pseudobulk_mse"}
    want = 2.0 * terms["energy"] + 3.0 * terms["mmd"] + 5.0 * terms["pseudobulk_mse"]
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    assert all(float(t) > 0 for t in terms.values())


def test_discrimination_loss_is_lower_on_own_targets_than_swapped_and_matches_numpy():
    """Sets whose predicted pseudobulk sits on their own table row score lower than the same sets
    with their rows swapped; the value is the softmax cross-entropy over -mean|diff| / temperature
    among the rows of the set's own cell type, written here in numpy; sets without a row (-1) do
    not count."""
    rng = np.random.default_rng(0)
    table_tg = rng.uniform(0.0, 2.0, (5, 24)).astype(np.float32)
    row_b = np.array([3, 0, 4, -1], np.int32)
    pred_bsg = (table_tg[np.maximum(row_b, 0)][:, None, :] + rng.normal(0, 0.05, (4, 8, 24))).astype(np.float32)
    dataset_t = np.array([0, 0, 0, 0, 1], np.int32)  # row 4 is another cell type's
    loss = jax.jit(lib.discrimination_loss, static_argnums=4)
    own = float(loss(*map(jnp.asarray, (pred_bsg, table_tg, dataset_t, row_b)), 0.3))
    swapped = float(loss(*map(jnp.asarray, (pred_bsg, table_tg, dataset_t, row_b[[1, 0, 2, 3]])), 0.3))
    assert own < 1.0 < swapped
    logits_bt = -np.abs(pred_bsg.astype(np.float64).mean(1)[:, None] - table_tg[None]).mean(2) / 0.3
    ce_b = [  # the softmax over the rows of the set's own cell type only
        np.log(np.exp(logits_bt[b, dataset_t == dataset_t[r]]).sum()) - logits_bt[b, r] for b, r in enumerate(row_b[:3])
    ]
    np.testing.assert_allclose(own, np.mean(ce_b), rtol=1e-5)


def test_out_of_range_perturbation_id_raises():
    n_perts = 5  # a vocabulary of 5 entries: control, OOV and three genes
    onehot_bf = lib.make_onehot_features(np.array([0, 1, 4]), n_perts)
    assert onehot_bf.shape == (3, 5) and onehot_bf[1, 1] == 1.0 and onehot_bf.sum() == 3
    with pytest.raises(IndexError):
        lib.make_onehot_features(np.array([0, 5]), n_perts)
    with pytest.raises(IndexError):
        lib.make_onehot_features(np.array([-1]), n_perts)
    with pytest.raises(IndexError):
        lib.get_pert_features(np.zeros((5, 3), np.float32), np.array([5]))


def test_model_rejects_wrong_feature_and_gene_widths(small_model):
    pert_f = jnp.zeros(SMALL.n_pert_features)
    with pytest.raises(AssertionError, match=r"perturbation features \(7,\) != \(6,\)"):
        call_model(small_model, jnp.zeros((4, SMALL.n_genes)), jnp.zeros(SMALL.n_pert_features + 1))
    with pytest.raises(AssertionError, match="control cells have 25 genes, model 24"):
        call_model(small_model, jnp.zeros((4, SMALL.n_genes + 1)), pert_f)


def test_predict_sets_clips_to_max_expression(small_model):
    ctrl_bsg = jnp.asarray(make_cells(15, 2 * 5, SMALL.n_genes).reshape(2, 5, -1)) * 10
    pert_bf = jnp.ones((2, SMALL.n_pert_features))
    raw_bsg = np.asarray(lib.predict_sets(small_model, ctrl_bsg, pert_bf, max_expression=np.inf))
    pred_bsg = np.asarray(lib.predict_sets(small_model, ctrl_bsg, pert_bf, max_expression=0.5))
    assert raw_bsg.max() > 0.5  # the clip has something to do
    assert pred_bsg.min() >= 0.0 and pred_bsg.max() <= 0.5
    np.testing.assert_array_equal(pred_bsg, np.clip(raw_bsg, 0.0, 0.5))


def test_gene_mean_init_starts_at_the_mean():
    ctrl_bsg = jnp.asarray(make_cells(16, 3 * 6, SMALL.n_genes).reshape(3, 6, -1))
    mean_g = np.asarray(ctrl_bsg.mean((0, 1)))
    model = lib.make_model(SMALL, key=jax.random.key(1, impl="unsafe_rbg"), gene_mean_g=mean_g)  # compiled already
    pred_bsg = lib.predict_sets(model, ctrl_bsg, jnp.zeros((3, SMALL.n_pert_features)))
    # Only the decoder's last bias moves, so predictions are the mean plus the random-init spread.
    assert np.abs(np.asarray(pred_bsg.mean((0, 1))) - mean_g).mean() < 0.5 * mean_g.mean()
    with pytest.raises(ValueError):
        lib.make_model(SMALL, key=jax.random.key(1, impl="unsafe_rbg"), gene_mean_g=mean_g[:-1])


@pytest.mark.slow
def test_residual_output_starts_at_the_control_cells():
    """residual_output: a fresh model predicts "no effect" exactly (the control baseline); with
    center_control the pseudobulk starts at gene_mean_g and every cell keeps its own deviation."""
    ctrl_bsg = jnp.asarray(make_cells(17, 2 * 6, SMALL.n_genes).reshape(2, 6, -1))
    pert_bf = jnp.ones((2, SMALL.n_pert_features))
    key = jax.random.key(3, impl="unsafe_rbg")
    residual = lib.make_model(
        dataclasses.replace(SMALL, residual_output=True), key=key, gene_mean_g=np.ones(SMALL.n_genes, np.float32)
    )
    np.testing.assert_allclose(
        np.asarray(lib.predict_sets(residual, ctrl_bsg, pert_bf)), np.asarray(ctrl_bsg), atol=1e-6
    )
    mean_g = np.asarray(ctrl_bsg.mean((0, 1)))
    centred = lib.make_model(
        dataclasses.replace(SMALL, residual_output=True, center_control=True), key=key, gene_mean_g=mean_g
    )
    raw_bsg = np.asarray(lib.predict_sets(centred, ctrl_bsg, pert_bf, max_expression=np.inf))
    want_bsg = np.maximum(np.asarray(ctrl_bsg - ctrl_bsg.mean(1, keepdims=True)) + mean_g, 0.0)
    np.testing.assert_allclose(raw_bsg, want_bsg, atol=1e-5)
    # Same parameter count as STATE's head: the option changes the wiring, not the shapes.
    assert lib.count_params(residual) == lib.count_params(centred) == hand_param_count(SMALL)


def test_residual_model_overfits_one_batch():
    model = lib.make_model(dataclasses.replace(SMALL, residual_output=True), key=jax.random.key(4, impl="unsafe_rbg"))
    ctrl_bsg, pert_bf, target_bsg = make_overfit_batch()
    opt_state = lib.init_opt_state(model, OPTIMIZER)
    for _ in range(200):
        model, opt_state, metrics = lib.make_step(
            model, opt_state, OPTIMIZER, ctrl_bsg, pert_bf, target_bsg, PSEUDOBULK_LOSS
        )
    assert float(metrics["pseudobulk_mse"]) < 1e-3, float(metrics["pseudobulk_mse"])


@pytest.mark.slow
def test_direct_path_starts_at_zero_and_learns_transfer_and_knockdown():
    """direct_effect: the feature tail (a gene-space effect, then the knocked-down gene's
    indicator) enters through a per-gene gain and a shared knockdown fraction, both 0 at init here
    (effect_gain_init=0: a fresh model is the control baseline) and learned: here the target is the
    control shifted by exactly that effect, with the indicated gene at half its value."""
    cfg = dataclasses.replace(SMALL, residual_output=True, direct_effect=True, effect_gain_init=0.0)
    model = lib.make_model(cfg, key=jax.random.key(5, impl="unsafe_rbg"))
    b, g = 4, SMALL.n_genes
    ctrl_bsg = jnp.asarray(make_cells(18, b * 6, g).reshape(b, 6, -1)) + 1.0
    effect_bg = jnp.asarray(np.random.default_rng(0).normal(0, 1.0, (b, g)), jnp.float32)
    target_bg = jnp.eye(g)[jnp.arange(b)]
    pert_bf = jnp.concatenate([jnp.zeros((b, SMALL.n_pert_features)), effect_bg, target_bg], axis=1)
    np.testing.assert_allclose(np.asarray(lib.predict_sets(model, ctrl_bsg, pert_bf)), np.asarray(ctrl_bsg), atol=1e-6)
    want_bsg = jnp.maximum(ctrl_bsg + effect_bg[:, None, :] - 0.5 * target_bg[:, None, :] * ctrl_bsg, 0.0)
    optimizer = lib.make_optimizer(learning_rate=3e-2)
    opt_state = lib.init_opt_state(model, optimizer)
    for _ in range(150):
        model, opt_state, _ = lib.make_step(model, opt_state, optimizer, ctrl_bsg, pert_bf, want_bsg, PSEUDOBULK_LOSS)
    assert float(jnp.median(model.effect_gain_g)) > 0.5, model.effect_gain_g
    assert 0.25 < float(model.knockdown) < 0.75, model.knockdown
    assert lib.count_params(model) == hand_param_count(SMALL) + g + 1


def test_fresh_direct_model_starts_at_the_transfer_effect_with_exact_means():
    """effect_gain_init=1 + exact_mean (the defaults): a fresh residual model (decoder bias at the
    control mean) predicts a set whose mean is exactly max(control mean + fed effect, 0) per gene:
    the pert_mean_transfer pseudobulk; cells >= 0."""
    cfg = dataclasses.replace(SMALL, residual_output=True, direct_effect=True, effect_gain_init=1.0, exact_mean=True)
    g = SMALL.n_genes
    ctrl_sg = jnp.asarray(make_cells(19, 16, g))
    model = lib.make_model(cfg, key=jax.random.key(6, impl="unsafe_rbg"), gene_mean_g=np.asarray(ctrl_sg).mean(0))
    effect_g = jnp.asarray(np.random.default_rng(1).normal(0, 1.0, g), jnp.float32)
    pert_f = jnp.concatenate([jnp.zeros(SMALL.n_pert_features), effect_g, jnp.zeros(g)])
    pred_sg = np.asarray(call_model(model, ctrl_sg, pert_f))
    want_g = np.maximum(np.asarray(ctrl_sg).mean(0) + np.asarray(effect_g), 0.0)
    np.testing.assert_allclose(pred_sg.mean(0), want_g, atol=1e-5)
    assert pred_sg.min() >= 0.0


def test_shift_to_mean_jax_matches_numpy_and_has_finite_gradients():
    rng = np.random.default_rng(0)
    x_sg = np.maximum(rng.normal(0.3, 1.0, (32, 200)), 0.0).astype(np.float32)
    t_g = (x_sg.mean(0) + rng.normal(0, 0.3, 200)).astype(np.float32)
    got = np.asarray(lib.shift_to_mean_jax(jnp.asarray(x_sg), jnp.asarray(t_g)))
    np.testing.assert_allclose(got, lib.shift_to_mean(x_sg, t_g), atol=1e-5)
    grad_g = jax.grad(lambda t: lib.shift_to_mean_jax(jnp.asarray(x_sg), t).sum())(jnp.asarray(t_g))
    assert np.isfinite(np.asarray(grad_g)).all()
