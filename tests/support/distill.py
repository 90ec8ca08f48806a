"""Inputs and float64 references (values and gradients) for the divergences from logits."""

from __future__ import annotations

import numpy as np

from support import reference

__all__ = ["distill_logits", "js_rows_and_gradients", "kl_rows_and_gradients"]


def distill_logits(rng, rows, vocab):
    t = rng.normal(scale=3.0, size=(rows, vocab))
    s = rng.normal(scale=3.0, size=(rows, vocab))
    t[:, 5] = -np.inf  # a masked vocabulary entry, in both
    s[:, 5] = -np.inf
    t[0, 9] = -np.inf  # zero teacher probability only
    return t, s


def kl_rows_and_gradients(t, s, temperature):
    """KL per row, and its gradients with respect to s and t, in float64."""
    log_p = reference.log_softmax(t, -1, temperature)
    log_q = reference.log_softmax(s, -1, temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    kl, scale = reference.kl_rows_log(p, log_q, -1)
    with np.errstate(invalid="ignore"):
        inner = np.where(p == 0, 0.0, log_p - log_q - kl[:, None])
    return kl, scale, (q - p) / temperature, p * inner / temperature


def js_rows_and_gradients(t, s, temperature, beta):
    """JS_beta per row and its gradients in float64 (rel_entr for the value)."""
    log_p = reference.log_softmax(t, -1, temperature)
    log_q = reference.log_softmax(s, -1, temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    js = reference.js_rows(p, q, -1, beta)
    m = beta * p + (1 - beta) * q
    with np.errstate(all="ignore"):  # a term of weight 0 (beta p or (1 - beta) q) is 0
        log_m = np.log(m)
        a = np.where((p == 0) | (beta == 0), 0.0, log_p - log_m)
        b = np.where((q == 0) | (beta == 1), 0.0, log_q - log_m)
        kl_pm = np.sum(p * a, -1, keepdims=True)
        kl_qm = np.sum(q * b, -1, keepdims=True)
        gt = beta * p * (a - kl_pm) / temperature
        gs = (1 - beta) * q * (b - kl_qm) / temperature
    return js, gt, gs
