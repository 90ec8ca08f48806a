"""kl_estimate as the sampler drew the tokens: `tokens=`, `sampling_mask=`, `temperature=`.

The references are float64 NumPy/SciPy: the truncated, tempered distributions
``log_softmax(where(mask, x / T, -inf))``, the exact KL between them, and the gradients
of each option's target in closed form. The estimates are checked by sampling tokens
from the truncated, tempered policy (fixed seeds), as tests/api/test_estimators.py does
for the per-token form. Field bugs: TRL #4159 (raw sampler log-probabilities at T = 1
against a sampler at T = 0.6: a ratio of 2.0), verl #6240 / TRL #6789 (a sampling mask:
the ratio off by the kept mass), TRL #6594 (a sequence's ratio broadcast over its tokens).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import log_softmax

import klx
from support.asserts import check_array
from support.reference import k_values

ESTIMATORS = ("k1", "k2", "k3")


def truncated(logits, mask, temperature):
    """log p~ over the vocabulary (last axis): -inf outside `mask`."""
    with np.errstate(invalid="ignore"):
        return log_softmax(np.where(mask, logits / temperature, -np.inf), axis=-1)


def top_k(logits, k):
    """The top-k support of `logits` (last axis), as a sampler keeps it."""
    kth = np.sort(logits, axis=-1)[..., -k][..., None]
    return logits >= kth


def gather(x, tokens):
    return np.take_along_axis(x, tokens[..., None], axis=-1)[..., 0]


def draw(rng, log_probs, n):
    return rng.choice(log_probs.shape[-1], size=n, p=np.exp(log_probs))


def exact_kl(lp, lq):
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        return float(np.sum(np.where(p > 0, p * (lp - lq), 0.0)))


# ------------------------------------------------------------------------ values


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_values_match_the_truncated_tempered_reference(backend, dtype):
    """Each estimator of the per-token log-probabilities on the sampler's support, with
    the vocabulary on axis -1 and on axis 0, and a mask shared by the batch."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(40)
    batch, seq, vocab, t = 3, 4, 7, 0.6
    x_p, x_q = rng.normal(size=(batch, seq, vocab)), rng.normal(size=(batch, seq, vocab))
    mask = top_k(x_p, 4)
    lp_all = truncated(x_p, mask, t)
    tokens = np.array([[draw(rng, lp_all[b, s], 1)[0] for s in range(seq)] for b in range(batch)])
    a_p, a_q = backend.asarray(x_p, dtype), backend.asarray(x_q, dtype)
    # the reference from the inputs as the backend holds them (rounded to `dtype`)
    r_p, r_q = backend.to_numpy(a_p), backend.to_numpy(a_q)
    lp, lq = gather(truncated(r_p, mask, t), tokens), gather(truncated(r_q, mask, t), tokens)
    ref = k_values(lp, lq)
    tol = 1e-12 if dtype == "float64" else 2e-5
    scale = {
        "k1": np.abs(lp) + np.abs(lq) + 1,
        "k2": np.abs(lp - lq) * (np.abs(lp) + np.abs(lq) + 1),
        "k3": (np.abs(ref["k3"]) + np.abs(lp - lq)) * (np.abs(lp) + np.abs(lq) + 1),
    }
    toks, m = backend.asarray(tokens), backend.asarray(mask)
    for est in ESTIMATORS:
        got = klx.kl_estimate(a_p, a_q, estimator=est, tokens=toks, sampling_mask=m, temperature=t)
        check_array(backend, got, a_p, dtype, (batch, seq))
        err = np.abs(backend.to_numpy(got) - ref[est]) / scale[est]
        assert err.max() <= tol, (est, err.max())
    # the vocabulary on axis 0; the mask given as (V, 1, S): broadcast over the batch
    first = klx.kl_estimate(
        backend.asarray(np.moveaxis(r_p, -1, 0), dtype),
        backend.asarray(np.moveaxis(r_q, -1, 0), dtype),
        tokens=toks,
        sampling_mask=backend.asarray(np.moveaxis(mask[:1], -1, 0)),
        temperature=t,
        axis=0,
    )
    shared_lp = gather(truncated(r_p, mask[:1], t), tokens)
    shared_lq = gather(truncated(r_q, mask[:1], t), tokens)
    with np.errstate(invalid="ignore"):  # -inf - (-inf) outside the shared mask
        want = k_values(shared_lp, shared_lq)["k3"]
    inside = np.isfinite(want)
    got = backend.to_numpy(first)
    assert np.all(np.isnan(got[~inside]))  # a token outside the shared mask: NaN
    np.testing.assert_allclose(got[inside], want[inside], rtol=1e-10 if tol < 1e-6 else 1e-4)


def test_token_outside_the_mask_is_nan_and_validation_raises(backend):
    """Both policies give such a token probability 0: -inf - (-inf); validation refuses it."""
    x_p = np.array([[2.0, 1.0, 0.0, -1.0], [0.5, 1.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    x_q = np.array([[1.5, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)  # last: empty
    tokens = np.array([0, 3, 1])
    args = (backend.asarray(x_p), backend.asarray(x_q))
    kw = {"tokens": backend.asarray(tokens), "sampling_mask": backend.asarray(mask)}
    got = backend.to_numpy(klx.kl_estimate(*args, temperature=0.5, **kw))
    lp, lq = truncated(x_p[0], mask[0], 0.5)[0], truncated(x_q[0], mask[0], 0.5)[0]
    np.testing.assert_allclose(got[0], k_values(lp, lq)["k3"], rtol=1e-14)
    assert np.isnan(got[1]) and np.isnan(got[2])
    with pytest.raises(ValueError, match=r"`tokens` holds 2 sampled id\(s\) outside"):
        klx.kl_estimate(*args, temperature=0.5, validate=True, **kw)
    keep = backend.asarray(np.array([True, False, False]))  # dropped: neither read nor NaN
    klx.kl_estimate(*args, temperature=0.5, validate=True, where=keep, **kw)
    total = klx.kl_estimate(*args, temperature=0.5, where=keep, reduction="sum", **kw)
    np.testing.assert_allclose(backend.to_numpy(total), got[0], rtol=1e-14)


def test_padding_ids_are_dropped_and_ids_out_of_range_refused(backend):
    rng = np.random.default_rng(41)
    x = rng.normal(size=(2, 3, 5))
    tokens = np.array([[1, 4, -100], [0, -100, -100]])
    keep = tokens >= 0
    lp, lq = log_softmax(x, -1), log_softmax(x[::-1], -1)
    safe = np.where(keep, tokens, 0)
    want = np.where(keep, k_values(gather(lp, safe), gather(lq, safe))["k3"], 0.0)
    got = klx.kl_estimate(
        backend.asarray(x),
        backend.asarray(x[::-1].copy()),
        tokens=backend.asarray(tokens),
        where=backend.asarray(keep),
    )
    check_array(backend, got, backend.asarray(x), "float64", (2, 3))
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-14, atol=1e-300)
    bad = backend.asarray(np.where(keep, tokens, 5))
    if backend.name == "dask":  # lazy: not read; such a token's estimate is NaN
        got = backend.to_numpy(klx.kl_estimate(backend.asarray(x), backend.asarray(x), tokens=bad))
        assert np.all(np.isnan(got[~keep])) and np.all(got[keep] == 0)
    else:
        with pytest.raises(ValueError, match=r"`tokens` holds 3 id\(s\) outside \[0, 5\)"):
            klx.kl_estimate(backend.asarray(x), backend.asarray(x), tokens=bad)


# ------------------------------------------------------------------------ by sampling


def _setup(seed, vocab=6, k=4, t=0.7):
    rng = np.random.default_rng(seed)
    theta, ref = rng.normal(size=vocab), rng.normal(size=vocab)
    mask = top_k(theta, k)
    return rng, theta, ref, mask, t, truncated(theta, mask, t), truncated(ref, mask, t)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimates_converge_to_the_truncated_kl(backend, estimator):
    """Tokens drawn from P~: k1 and k3 average to KL(P~ || Q~), k2 to E[r^2] / 2, which
    differ from the untruncated KL(P || Q) at T = 1 by many standard errors."""
    rng, theta, ref, mask, t, lp_all, lq_all = _setup(42)
    n = 20000
    x = draw(rng, lp_all, n)
    per_token = backend.to_numpy(
        klx.kl_estimate(
            backend.asarray(theta[None]),  # (1, V): one policy for every sampled token
            backend.asarray(ref[None]),
            estimator=estimator,
            tokens=backend.asarray(x),
            sampling_mask=backend.asarray(mask),
            temperature=t,
        )
    )
    target = exact_kl(lp_all, lq_all)
    if estimator == "k2":
        p = np.exp(lp_all)
        with np.errstate(invalid="ignore"):  # -inf - (-inf) outside the mask
            target = float(np.sum(np.where(p > 0, p * (lp_all - lq_all) ** 2 / 2, 0.0)))
    stderr = per_token.std() / math.sqrt(n)
    assert abs(per_token.mean() - target) <= 5 * stderr, (per_token.mean(), target, stderr)
    untruncated = exact_kl(log_softmax(theta), log_softmax(ref))
    assert abs(untruncated - target) > 20 * stderr  # the test sees the support


def _closed_form_gradients(lp_all, lq_all, t):
    """E[gradient] w.r.t. the policy's logits theta of each (estimator, gradient), for
    P~ = softmax over the mask of theta / T: p~ (h - <p~, h>) / T with h = f(d) + f'(d)
    for the gradient of E_{P~}[f(d)], d = log p~ - log q~; KL(Q~ || P~)'s is (p~ - q~) / T."""
    p, q = np.exp(lp_all), np.exp(lq_all)
    with np.errstate(invalid="ignore"):
        d = np.where(p > 0, lp_all - lq_all, 0.0)

    def of_mean(h):
        return p * (h - np.sum(p * h)) / t

    kl, mean_k2 = of_mean(d + 1), of_mean(d * d / 2 + d)
    return {
        ("k1", "estimator"): np.zeros_like(p),
        ("k2", "estimator"): kl,
        ("k3", "estimator"): (p - q) / t,
        ("k1", "straight_through"): kl,
        ("k2", "straight_through"): kl,
        ("k3", "straight_through"): kl,
        ("k1", "importance"): kl,
        ("k2", "importance"): mean_k2,
        ("k3", "importance"): kl,
    }


def _per_sample_grads(backend, theta, ref, x, mask, t, estimator, gradient, old=None):
    """Gradients w.r.t. one copy of the full logits theta per sample, summed loss."""
    thetas = np.broadcast_to(theta, (len(x), theta.size)).copy()
    kw = {
        "estimator": estimator,
        "gradient": gradient,
        "tokens": backend.asarray(x),
        "sampling_mask": backend.asarray(mask),
        "temperature": t,
        "log_p_old": None if old is None else backend.asarray(old),
        "reduction": "sum",
    }
    if backend.name == "torch":
        th = backend.asarray(thetas).requires_grad_(True)
        klx.kl_estimate(th, backend.asarray(ref[None]), **kw).backward()
        return backend.to_numpy(th.grad)
    import jax

    g = jax.jit(jax.grad(lambda th: klx.kl_estimate(th, backend.asarray(ref[None]), **kw)))
    return np.asarray(g(backend.asarray(thetas)))


@pytest.mark.parametrize("gradient", ["estimator", "straight_through", "importance"])
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_gradient_options_estimate_their_targets_on_the_support(backend, gradient):
    rng, theta, ref, mask, t, lp_all, lq_all = _setup(43)
    n = 20000
    x = draw(rng, lp_all, n)
    targets = _closed_form_gradients(lp_all, lq_all, t)
    for estimator in ESTIMATORS:
        g = _per_sample_grads(backend, theta, ref, x, mask, t, estimator, gradient)
        assert np.all(g[:, ~mask] == 0)  # nothing reaches logits the sampler excluded
        mean, stderr = g.mean(0), g.std(0) / math.sqrt(n)
        target = targets[(estimator, gradient)]
        assert np.all(np.abs(mean - target) <= 5 * stderr + 1e-12), (estimator, mean, target)


@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_importance_off_policy_on_the_support(backend):
    """Tokens drawn from the old policy's P~_old: rho k averages to KL(P~ || Q~) and its
    gradient to the KL's, with `log_p_old` as the old logits (put on the support) or as
    the sampler's processed log-probabilities of the tokens (used as given)."""
    rng, theta, ref, mask, t, lp_all, lq_all = _setup(44)
    theta_old = theta + rng.normal(scale=0.3, size=theta.size)
    lp_old_all = truncated(theta_old, mask, t)
    n = 20000
    x = draw(rng, lp_old_all, n)
    kl = exact_kl(lp_all, lq_all)
    for old in (np.broadcast_to(theta_old, (n, theta.size)), lp_old_all[x]):
        for estimator in ("k1", "k3"):
            values = backend.to_numpy(
                klx.kl_estimate(
                    backend.asarray(theta[None]),
                    backend.asarray(ref[None]),
                    estimator=estimator,
                    gradient="importance",
                    log_p_old=backend.asarray(old),
                    tokens=backend.asarray(x),
                    sampling_mask=backend.asarray(mask),
                    temperature=t,
                )
            )
            assert abs(values.mean() - kl) <= 5 * values.std() / math.sqrt(n)
            g = _per_sample_grads(backend, theta, ref, x, mask, t, estimator, "importance", old)
            target = _closed_form_gradients(lp_all, lq_all, t)[(estimator, "importance")]
            mean, stderr = g.mean(0), g.std(0) / math.sqrt(n)
            assert np.all(np.abs(mean - target) <= 5 * stderr + 1e-12), (estimator, mean)


# ------------------------------------------------------------------------ field bugs


def _ratio(backend, value, lp, lq):
    """rho from the value rho * k1 and the float64 k1 = log p - log q."""
    return backend.to_numpy(value) / (lp - lq)


def test_trl_4159_temperature_ratio_is_one_on_policy(backend):
    """vLLM's raw log-probability (T = 1) against the trainer's at T = 0.6 gave a ratio
    of 2.0 on the first token; on the sampler's support klx's ratio is 1."""
    vocab, t = 1001, 0.6
    x = np.full((1, vocab), -math.log(1000.0))
    x[0, 0] = 0.0  # p = 1/2 at T = 1, 0.985 at T = 0.6
    ref = np.linspace(-1.0, 1.0, vocab)[None]
    token = np.array([0])
    lp = gather(log_softmax(x / t, -1), token)  # the trainer, at the sampler's temperature
    lq = gather(log_softmax(ref / t, -1), token)
    raw = gather(log_softmax(x, -1), token)  # what the sampler reported
    naive = klx.kl_estimate(
        backend.asarray(lp),
        backend.asarray(lq),
        estimator="k1",
        gradient="importance",
        log_p_old=backend.asarray(raw),
    )
    assert 1.9 < float(_ratio(backend, naive, lp, lq)[0]) < 2.0
    for old in (x, lp):  # the old logits, or the sampler's tempered log-probability
        got = klx.kl_estimate(
            backend.asarray(x),
            backend.asarray(ref),
            estimator="k1",
            gradient="importance",
            log_p_old=backend.asarray(old),
            tokens=backend.asarray(token),
            temperature=t,
        )
        np.testing.assert_allclose(_ratio(backend, got, lp, lq), [1.0], rtol=1e-13)


def test_verl_6240_sampling_mask_keeps_the_ratio_at_one(backend):
    """A top-k sampler reports log p / S (renormalised on its support); the trainer's
    full-vocabulary log p then gives the ratio S (the kept mass) on every token (TRL
    #6789). With the sampling mask both are on the support: the ratio is 1."""
    rng = np.random.default_rng(45)
    n, vocab, t = 8, 50, 0.8
    logits = rng.normal(scale=2.0, size=(n, vocab))
    ref = rng.normal(scale=2.0, size=(n, vocab))
    mask = top_k(logits, 5)
    tokens = np.array([draw(rng, truncated(logits[i], mask[i], t), 1)[0] for i in range(n)])
    processed = gather(truncated(logits, mask, t), tokens)  # the sampler's log-probabilities
    full_lp = gather(log_softmax(logits / t, -1), tokens)  # the trainer's, on the vocabulary
    kept = np.exp(log_softmax(logits / t, -1))[mask].reshape(n, -1).sum(-1)
    naive = klx.kl_estimate(
        backend.asarray(full_lp),
        backend.asarray(gather(log_softmax(ref / t, -1), tokens)),
        estimator="k1",
        gradient="importance",
        log_p_old=backend.asarray(processed),
    )
    lq_full = gather(log_softmax(ref / t, -1), tokens)
    np.testing.assert_allclose(_ratio(backend, naive, full_lp, lq_full), kept, rtol=1e-10)
    assert np.all(kept < 0.99)
    got = klx.kl_estimate(
        backend.asarray(logits),
        backend.asarray(ref),
        estimator="k1",
        gradient="importance",
        log_p_old=backend.asarray(processed),
        tokens=backend.asarray(tokens),
        sampling_mask=backend.asarray(mask),
        temperature=t,
    )
    lq = gather(truncated(ref, mask, t), tokens)
    np.testing.assert_allclose(_ratio(backend, got, processed, lq), np.ones(n), rtol=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.backends("torch", "jax", reason="gradients need autograd")
def test_trl_6594_ratio_is_per_token(backend, estimator):
    """On-policy rho k over sequences of 5 tokens: the gradient at each position is that
    token's own, d(rho_t k_t)/d log p~_t = k_t + dk_t/d log p~_t, times
    (onehot - p~) / T on the mask; a sequence's ratio broadcast over its tokens adds
    the other tokens' k_s to every position."""
    rng = np.random.default_rng(46)
    batch, seq, vocab, t = 2, 5, 6, 0.8
    theta, ref = rng.normal(size=(batch, seq, vocab)), rng.normal(size=(batch, seq, vocab))
    mask = top_k(theta, 4)
    lp_all, lq_all = truncated(theta, mask, t), truncated(ref, mask, t)
    tokens = np.array([[draw(rng, lp_all[b, s], 1)[0] for s in range(seq)] for b in range(batch)])
    lp, lq = gather(lp_all, tokens), gather(lq_all, tokens)
    r = lq - lp
    k = k_values(lp, lq)[estimator]
    dk = np.ones_like(r) if estimator == "k1" else -np.expm1(r)  # dk / d log p~
    dlogp = (np.eye(vocab)[tokens] - np.exp(lp_all)) / t * mask  # d log p~_t / d theta_t
    per_token = (k + dk)[..., None] * dlogp
    per_sequence = (k.sum(-1, keepdims=True) + dk)[..., None] * dlogp

    def loss(th):
        return klx.kl_estimate(
            th,
            backend.asarray(ref),
            estimator=estimator,
            gradient="importance",
            tokens=backend.asarray(tokens),
            sampling_mask=backend.asarray(mask),
            temperature=t,
            reduction="sum",
        )

    if backend.name == "torch":
        th = backend.asarray(theta).requires_grad_(True)
        loss(th).backward()
        g = backend.to_numpy(th.grad)
    else:
        import jax

        g = np.asarray(jax.jit(jax.grad(loss))(backend.asarray(theta)))
    np.testing.assert_allclose(g, per_token, rtol=1e-12, atol=1e-15)
    assert np.abs(g - per_sequence).max() > 0.1


# ------------------------------------------------------------------------ transforms, errors


@pytest.mark.backends("jax", reason="jax.jit, jax.grad and jax.vmap")
def test_jit_grad_vmap_with_a_traced_temperature(backend):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(47)
    theta, ref = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4, 6))
    mask = top_k(theta, 3)
    tokens = np.argmax(theta, -1)
    want = k_values(
        gather(truncated(theta, mask, 0.7), tokens), gather(truncated(ref, mask, 0.7), tokens)
    )
    m, toks = jnp.asarray(mask), jnp.asarray(tokens)
    theta, ref = jnp.asarray(theta), jnp.asarray(ref)

    def f(th, temperature):
        return klx.kl_estimate(th, ref, tokens=toks, sampling_mask=m, temperature=temperature)

    got = jax.jit(f)(theta, jnp.asarray(0.7))
    np.testing.assert_allclose(np.asarray(got), want["k3"], rtol=1e-13)
    rows = jax.vmap(
        lambda th, rf, tk, mk: klx.kl_estimate(
            th, rf, tokens=tk, sampling_mask=mk, temperature=0.7, reduction="sum"
        )
    )(theta, ref, toks, m)
    np.testing.assert_allclose(np.asarray(rows), want["k3"].sum(-1), rtol=1e-13)
    g = jax.jit(jax.grad(lambda th: f(th, 0.7).sum()))(theta)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[~mask] == 0)
    bad = jnp.asarray(np.where(np.arange(3)[:, None] == 0, 9, tokens))  # traced: NaN, no error
    out = np.asarray(jax.jit(lambda tk: klx.kl_estimate(theta, ref, tokens=tk))(bad))
    assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1:]))


@pytest.mark.backends("torch", reason="autograd through an impossible token")
def test_gradient_finite_where_a_token_is_outside_the_mask(backend):
    import torch

    theta = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for gradient in ("estimator", "straight_through", "importance"):
        theta.grad = None
        out = klx.kl_estimate(
            theta,
            torch.zeros(2, 3),
            gradient=gradient,
            tokens=torch.tensor([2, 0]),
            sampling_mask=mask,
            temperature=0.5,
        )
        assert torch.isnan(out[0]) and torch.isfinite(out[1])
        out[1].backward()
        assert torch.isfinite(theta.grad).all() and (theta.grad[0] == 0).all()


def test_sampling_options_errors(backend):
    a = backend.asarray(np.zeros((2, 3)))
    tok = backend.asarray(np.array([0, 1]))
    with pytest.raises(ValueError, match=r"`sampling_mask` describe\(s\) the vocabulary"):
        klx.kl_estimate(a, a, sampling_mask=backend.asarray(np.ones((2, 3), dtype=bool)))
    with pytest.raises(ValueError, match="`temperature`=0.6 describe"):
        klx.kl_estimate(a, a, temperature=0.6)
    with pytest.raises(TypeError, match="`tokens` must have an integer dtype"):
        klx.kl_estimate(a, a, tokens=backend.asarray(np.array([0.0, 1.0])))
    with pytest.raises(ValueError, match="one dimension more than `tokens`"):
        klx.kl_estimate(a, a, tokens=backend.asarray(np.array([[0, 1]])))
    with pytest.raises(ValueError, match="`log_q` has 4"):
        klx.kl_estimate(a, backend.asarray(np.zeros((2, 4))), tokens=tok)
    with pytest.raises(TypeError, match="`sampling_mask` must be a boolean array"):
        klx.kl_estimate(a, a, tokens=tok, sampling_mask=backend.asarray(np.ones((2, 3))))
    with pytest.raises(ValueError, match="give either the old policy's logits"):
        klx.kl_estimate(
            a, a, tokens=tok, gradient="importance", log_p_old=backend.asarray(np.zeros((1, 2, 3)))
        )
    with pytest.raises(ValueError, match="`temperature` must be positive"):
        klx.kl_estimate(a, a, tokens=tok, temperature=0.0)
