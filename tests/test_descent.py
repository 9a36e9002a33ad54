"""GD and Adam: the seed's training loop at batch scale, against the naive vmap(grad) loop."""

import numpy as np
import pytest
import torch
from zoo import SEED_TRUTH, naive_descent, polyfit_rows, seed_data

import batchfit


@pytest.mark.parametrize("solver,lr", [("gd", 1e-2), ("adam", 1e-2)])
def test_moment_loop_follows_the_naive_raw_data_loop(solver, lr, rng):
    """Same trajectory as vmap(grad) over the raw points, epoch by epoch."""
    x, y = seed_data(8, 30, rng)
    epochs = 300
    p0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fit = batchfit.fit(x, y, solver=solver, lr=lr, epochs=epochs, init=p0, tol=0.0,
                       dtype="float64", history_every=10, track=range(8), compile=False)
    p_naive, curve = naive_descent(torch.as_tensor(x), torch.as_tensor(y), p0, lr, epochs,
                                   adam=solver == "adam")
    np.testing.assert_allclose(fit.params, p_naive, rtol=1e-9, atol=1e-10)
    history = fit.history
    assert history.epochs.tolist() == list(range(0, epochs + 1, 10))
    np.testing.assert_allclose(history.tracked_loss, curve[history.epochs].numpy(), rtol=1e-9)
    np.testing.assert_allclose(history.tracked_initial_params, p0, rtol=0)
    assert (fit.iterations == epochs).all()


@pytest.mark.slow  # (compiles kernels: minutes on 2 cores with a cold cache)
def test_seed_protocol_reports_not_converged_honestly(rng):
    """lr 1e-3 for 15,000 epochs on x in [0, 1] cannot converge: a ends near 13, not 20."""
    x, y = seed_data(64, 100, rng)
    fit = batchfit.fit(x, y, solver="gd", compile=True)
    assert (fit.status_labels() == "not_converged").all()
    assert (fit.iterations == 15000).all()
    a = fit.params[:, 0].numpy()
    assert 10 < np.median(a) < 16  # far from the true 20: the loop is just too slow
    exact = batchfit.fit(x, y)
    assert (fit.loss > exact.loss).all()
    q = fit.history.loss_quantiles
    assert q.shape[1] == 5 and (np.diff(q[:, 2].numpy()) <= 1e-6).all()  # the median falls


@pytest.mark.slow  # (compiles kernels: minutes on 2 cores with a cold cache)
def test_adam_reaches_the_exact_answer(rng):
    x, y = seed_data(64, 100, rng)
    exact, _ = polyfit_rows(x, y, 2)
    # tol bounds the excess loss (relative), so coefficients land within ~sqrt(tol)
    fit = batchfit.fit(x, y, solver="adam", lr=0.01, epochs=30000, tol=1e-10, compile=True)
    assert (fit.status_labels() == "ok").all()
    assert np.abs(fit.params.numpy() - exact).max() < 1e-3
    assert (fit.iterations < 30000).all()  # converged series stop early


def test_gd_converges_with_enough_epochs_and_freezes(rng):
    x, y = seed_data(16, 50, rng)
    fit = batchfit.fit(x, y, solver="gd", lr=0.5, epochs=30000, tol=1e-10, dtype="float64",
                       compile=False)
    exact, _ = polyfit_rows(x, y, 2)
    assert (fit.status_labels() == "ok").all()
    assert np.abs(fit.params.numpy() - exact).max() < 1e-3
    assert (fit.iterations < 30000).all()


@pytest.mark.slow  # (compiles kernels: minutes on 2 cores with a cold cache)
def test_float32_gd_stall_is_reported_not_hidden(rng):
    """Float32 GD updates fall below float32 resolution near the minimum: it must say so.

    A float32 iterate may still land within ``tol`` of the minimum by chance (which ones do
    depends on the CPU's rounding), so each status is checked against the float64 excess loss.
    """
    x, y = seed_data(16, 50, rng)
    tol, epochs = 1e-10, 30000
    fit = batchfit.fit(x, y, solver="gd", lr=0.5, epochs=epochs, tol=tol, compile=True)
    labels = fit.status_labels()
    params = fit.params.numpy().astype(np.float64)
    vander = np.stack([x**2, x, x**0], axis=-1)  # (a, b, c)
    loss = ((np.einsum("bnk,bk->bn", vander, params) - y) ** 2).mean(axis=1)
    best = ((np.einsum("bnk,bk->bn", vander, polyfit_rows(x, y, 2)[0]) - y) ** 2).mean(axis=1)
    excess = (loss - best) / best
    assert (labels == "not_converged").sum() >= 12  # the stall is the rule, and said
    assert (fit.iterations.numpy()[labels == "not_converged"] == epochs).all()
    assert (excess[labels == "ok"] <= 2 * tol).all()  # an ok is a true ok
    assert set(labels) <= {"ok", "not_converged"}


def test_too_large_lr_diverges(rng):
    x, y = seed_data(4, 20, rng)
    fit = batchfit.fit(x, y, solver="gd", lr=10.0, epochs=2000, compile=False)
    assert (fit.status_labels() == "diverged").all()


@pytest.mark.slow  # (compiles kernels: minutes on 2 cores with a cold cache)
def test_compiled_and_eager_give_the_same_numbers(rng):
    x, y = seed_data(32, 40, rng)
    kwargs = dict(solver="gd", lr=0.05, epochs=500, init="zeros", dtype="float64")
    eager = batchfit.fit(x, y, compile=False, **kwargs)
    compiled = batchfit.fit(x, y, compile=True, **kwargs)
    np.testing.assert_allclose(compiled.params, eager.params, rtol=1e-9)
    np.testing.assert_allclose(compiled.history.loss_quantiles, eager.history.loss_quantiles,
                               rtol=1e-9)


def test_structural_failures_are_frozen_and_reported(rng):
    x, y = seed_data(5, 12, rng)
    x[1] = 0.5
    y[2, 1:] = np.nan
    fit = batchfit.fit(x, y, solver="adam", lr=0.05, epochs=3000, compile=False)
    assert list(fit.status_labels()[1:3]) == ["singular", "too_few_points"]
    assert (fit.iterations[1:3] == 0).all()
    assert torch.isnan(fit.params[1:3]).all()
    assert np.isfinite(fit.history.loss_quantiles.numpy()).all()


def test_random_init_is_seeded():
    x = np.linspace(0, 1, 20)
    y = np.stack([2 * x**2, x + 1])
    one = batchfit.fit(x, y, solver="gd", epochs=10, seed=3, compile=False)
    two = batchfit.fit(x, y, solver="gd", epochs=10, seed=3, compile=False)
    other = batchfit.fit(x, y, solver="gd", epochs=10, seed=4, compile=False)
    torch.testing.assert_close(one.params, two.params)
    assert not torch.allclose(one.params, other.params)


def test_descent_on_device(device, rng):
    x, y = seed_data(8, 20, rng)
    kwargs = dict(solver="adam", lr=0.01, epochs=200, dtype="float64", compile=False)
    cpu = batchfit.fit(x, y, device="cpu", **kwargs)
    here = batchfit.fit(x, y, device=device, **kwargs)
    np.testing.assert_allclose(here.params.cpu(), cpu.params, rtol=1e-9)


def test_truth_is_what_the_seed_generated(rng):
    x, y = seed_data(2000, 100, rng)
    fit = batchfit.fit(x, y)
    assert np.abs(np.median(fit.params.numpy(), axis=0) - SEED_TRUTH).max() < 0.05


def test_continuing_on_the_active_rows_changes_nothing(rng, monkeypatch):
    """The loop narrows to the still-moving series once most have stopped: same results."""
    from batchfit.fitting import loop

    x, y = seed_data(40, 30, rng, noise=0.3)
    y[:5] += rng.standard_cauchy((5, 30)) * 5  # a few slow, heavy-tailed series
    narrowed = batchfit.fit(x, y, loss="cauchy", dtype="float64", compile=False)
    monkeypatch.setattr(loop, "COMPACT_BELOW", 0.0)
    full = batchfit.fit(x, y, loss="cauchy", dtype="float64", compile=False)
    np.testing.assert_array_equal(narrowed.params.numpy(), full.params.numpy())
    np.testing.assert_array_equal(narrowed.iterations.numpy(), full.iterations.numpy())
    np.testing.assert_array_equal(narrowed.history.tracked_loss.numpy(),
                                  full.history.tracked_loss.numpy())
    assert narrowed.iterations.max() > 3 * np.median(narrowed.iterations.numpy())


def test_small_steps_run_on_one_thread_and_the_count_is_restored(rng, monkeypatch):
    """Steps with little work run on one CPU thread (waking sleeping OpenMP threads would
    cost more): the same numbers, and torch's thread count is as it was afterwards."""
    from batchfit.fitting import loop

    seen = []

    def decay(x, p):
        seen.append(torch.get_num_threads())
        return p[..., 0:1] * torch.exp(-p[..., 1:2] * x)

    x = np.linspace(0, 3, 20)
    y = 2 * np.exp(-1.3 * x) + 0.01 * rng.normal(size=(30, 20))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one = batchfit.fit(x, y, model=decay, p0=[1, 1], dtype="float64", compile=False)
        # (the setup's calls before the loop and the final one after it run on two)
        steps = seen[seen.index(1):-1]
        assert len(steps) >= 10 and set(steps) == {1} and seen[-1] == 2
        assert torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(loop, "ONE_THREAD_BELOW", 0)
        both = batchfit.fit(x, y, model=decay, p0=[1, 1], dtype="float64", compile=False)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(one.params.numpy(), both.params.numpy(), rtol=1e-12)
    np.testing.assert_array_equal(one.iterations.numpy(), both.iterations.numpy())
    np.testing.assert_allclose(one.params.numpy().mean(0), [2, 1.3], rtol=1e-2)
