import numpy as np
import pandas as pd
import pytest

import lib


@pytest.fixture(scope="module")
def store(tiny_store):
    return lib.load_store(tiny_store, "synthetic")


def _first_batches(store, cfg, n, **kw):
    vocab = lib.make_vocab(store.index)
    dataset, _ = lib.make_loader(store, cfg, vocab=vocab, **{"seed": 0, **kw})
    iterator = lib.iter_batches(dataset, cfg)
    return [next(iterator) for _ in range(n)], iterator


def test_vocab_is_stable_across_reloads_and_has_explicit_oov(tiny_store, store):
    vocab = lib.make_vocab(store.index)
    reloaded = lib.make_vocab(lib.load_store(tiny_store, "synthetic").index)
    assert vocab == reloaded
    assert vocab.labels[:2] == (lib.CONTROL_TOKEN, lib.OOV_TOKEN)
    known = vocab.labels[5]
    assert list(vocab.ids([known, "NOT_A_GENE"])) == [5, 1]
    # every dataset's perturbations share the one table
    perturbed = store.index.loc[~store.index["is_control"], "perturbation"]
    assert set(perturbed) == set(vocab.labels[2:])


def test_vocab_round_trips_through_a_file(tmp_path, store):
    vocab = lib.make_vocab(store.index)
    vocab.write(tmp_path / "vocab.json")
    assert lib.PerturbationVocab.read(tmp_path / "vocab.json") == vocab


def test_sets_pair_perturbed_cells_with_controls_of_the_same_batch(store):
    assert store.index.groupby("dataset")["batch"].nunique().max() > 1, "one batch per dataset tests nothing"
    examples = lib.make_example_groups(store.index)
    controls = store.index.loc[examples["control_group"]].reset_index(drop=True)
    assert controls["is_control"].all()
    assert (controls["dataset"].to_numpy() == examples["dataset"].to_numpy()).all()
    # Every synthetic batch has its own controls, so not one set may be paired across batches.
    assert (controls["batch"].to_numpy() == examples["batch"].to_numpy()).all()


def test_a_batch_without_controls_pairs_with_the_largest_control_group():
    index = pd.DataFrame(
        dict(
            dataset="d",
            cell_type="t",
            batch=["b1", "b1", "b2", "b3"],
            perturbation=["non-targeting", "P", "non-targeting", "Q"],
            is_control=[True, False, True, False],
            n_cells=[10, 5, 30, 5],
        )
    )
    examples = lib.make_example_groups(index, control_sets=False).set_index("perturbation")
    assert examples["control_group"].to_dict() == {"P": 0, "Q": 2}  # b1's own controls; b3 has none: b2's (30 > 10)


def test_batches_have_the_documented_shapes_and_upsample_small_groups(store):
    cfg = lib.LoaderConfig(set_size=64, sets_per_batch=4)  # tiny groups have ~30 cells < 64
    (batch,), _ = _first_batches(store, cfg, 1)
    n_genes = store.x_cg.shape[1]
    assert batch["ctrl_bsg"].shape == batch["pert_bsg"].shape == (4, 64, n_genes)
    assert batch["pert_id_b"].shape == (4,) and batch["pert_id_b"].dtype == np.int32


def test_perturbed_set_rows_come_from_their_group(store):
    cfg = lib.LoaderConfig(set_size=8, sets_per_batch=4)
    vocab = lib.make_vocab(store.index)
    dataset, examples = lib.make_loader(store, cfg, vocab=vocab, seed=0)
    batch = next(lib.iter_batches(dataset, cfg))
    for b, k in enumerate(batch["example_b"]):
        start, stop = examples.loc[k, ["start", "stop"]]
        group_rows = np.asarray(store.x_cg[start:stop])
        for cell_g in batch["pert_bsg"][b]:
            assert np.any(np.all(group_rows == cell_g, axis=1))


def test_same_seed_same_batches_other_seed_other_batches(store):
    cfg = lib.LoaderConfig(set_size=8, sets_per_batch=4)
    a, _ = _first_batches(store, cfg, 3, seed=3)
    b, _ = _first_batches(store, cfg, 3, seed=3)
    c, _ = _first_batches(store, cfg, 3, seed=4)
    assert all(np.array_equal(x["pert_bsg"], y["pert_bsg"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["pert_id_b"], y["pert_id_b"]) for x, y in zip(a, c))


def test_resumed_iterator_yields_exactly_the_next_batches(store):
    cfg = lib.LoaderConfig(set_size=8, sets_per_batch=4)
    batches, iterator = _first_batches(store, cfg, 2)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    dataset, _ = lib.make_loader(store, cfg, vocab=lib.make_vocab(store.index), seed=0)
    resumed = lib.iter_batches(dataset, cfg)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(want[k], got[k]) for k in want)


def test_process_shards_partition_the_global_batch(store):
    cfg = lib.LoaderConfig(set_size=8, sets_per_batch=4)
    (whole,), _ = _first_batches(store, cfg, 1)
    shards = [_first_batches(store, cfg, 1, process_index=p, process_count=2)[0][0] for p in range(2)]
    # Process slices stacked in process order are the single-process batch, cells included
    # (train() relies on it: results do not depend on the number of hosts).
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), whole[key])


def test_held_out_perturbations_never_appear(store):
    target = store.datasets[0]
    held_out = sorted(
        store.index.loc[(store.index["dataset"] == target) & ~store.index["is_control"], "perturbation"].unique()
    )[:5]
    examples = lib.make_example_groups(store.index, exclude_perturbations=held_out, target_dataset=target)
    target_examples = examples[examples["dataset"] == target]
    assert not set(held_out) & set(target_examples["perturbation"])


def test_every_example_appears_once_per_epoch(store):
    cfg = lib.LoaderConfig(set_size=8, sets_per_batch=4)
    dataset, examples = lib.make_loader(store, cfg, vocab=lib.make_vocab(store.index), seed=0)
    n_batches = -(-2 * len(examples) // cfg.sets_per_batch)  # two epochs and a bit
    iterator = lib.iter_batches(dataset, cfg)
    stream = np.concatenate([next(iterator)["example_b"] for _ in range(n_batches)])
    first, second = stream[: len(examples)], stream[len(examples) : 2 * len(examples)]
    assert sorted(first) == sorted(second) == list(range(len(examples)))
    assert not np.array_equal(first, second)  # a fresh shuffle every epoch


@pytest.mark.slow
def test_worker_processes_yield_the_same_batches_as_the_thread(store):
    in_thread, _ = _first_batches(store, lib.LoaderConfig(set_size=8, sets_per_batch=4), 2)
    in_worker, _ = _first_batches(store, lib.LoaderConfig(set_size=8, sets_per_batch=4, worker_count=1), 2)
    for want, got in zip(in_thread, in_worker):
        assert all(np.array_equal(want[k], got[k]) for k in want)


def test_set_rows_are_distinct_when_the_group_is_big_enough(store):
    cfg = lib.LoaderConfig(set_size=8, sets_per_batch=4)
    examples = lib.make_example_groups(store.index)
    source = lib.CellSetBatches(store.store_dir, store.index, examples, np.zeros(len(examples)), cfg, seed=0)
    start_k, stop_k = np.array([100, 0, 50, 7]), np.array([105, 1000, 58, 9])  # n = 5, 1000, 8 (= S), 2
    rows_ks = source.sample_rows(start_k, stop_k, np.random.default_rng(0))
    assert ((rows_ks >= start_k[:, None]) & (rows_ks < stop_k[:, None])).all()
    assert len(set(rows_ks[1])) == 8 and sorted(rows_ks[2]) == list(range(50, 58))  # without replacement
    assert set(rows_ks[3]) <= {7, 8} and (np.diff(rows_ks, axis=1) >= 0).all()  # up-sampled; sorted
