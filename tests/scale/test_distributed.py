"""Beyond one machine: a dask.distributed cluster, and JAX arrays sharded over devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import klx
from support import reference


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit="400MiB",
        dashboard_address=None,
        silence_logs=40,
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.mark.slow
@pytest.mark.backends("dask", reason="a Dask cluster")
def test_local_cluster_matches_reference_with_chunks_along_the_axis(backend, cluster_client):
    import dask.array as da

    rng = np.random.default_rng(0)
    t = rng.normal(size=(64, 300))
    s = rng.normal(size=(64, 300))
    t[:, 7] = -np.inf  # a masked vocabulary entry
    keep = rng.uniform(size=64) > 0.2
    # chunked along both axes: partial sums and the log-sum-exp combine across chunks
    ta, sa = da.from_array(t, chunks=(16, 64)), da.from_array(s, chunks=(16, 64))
    kl = klx.kl_divergence(
        ta,
        sa,
        p_form="logits",
        q_form="logits",
        temperature=2.0,
        where=da.from_array(keep, chunks=16),
    )
    js = klx.js_divergence(ta, sa, p_form="logits", q_form="logits", reduction="batchmean")
    div = klx.kl_div(ta, sa, reduction="sum", log_target=False)
    assert all(isinstance(r, da.Array) for r in (kl, js, div)), "results stay lazy"
    kl_v, js_v, div_v = cluster_client.compute([kl, js, div], sync=True)
    pt = np.exp(reference.log_softmax(t, -1, 2.0))
    ps = np.exp(reference.log_softmax(s, -1, 2.0))
    rows, _ = reference.kl_rows_log(pt, reference.log_softmax(s, -1, 2.0), -1)
    np.testing.assert_allclose(kl_v, np.where(keep, rows, 0.0), rtol=1e-12)
    pt1, ps1 = np.exp(reference.log_softmax(t, -1)), np.exp(reference.log_softmax(s, -1))
    np.testing.assert_allclose(js_v, np.mean(reference.js_rows(pt1, ps1, -1, 0.5)), rtol=1e-12)
    # `s` holds negative "probabilities": their terms are +inf, as in scipy.special.rel_entr
    # (docs/numerics.md; torch gives NaN)
    assert np.any(s < 0) and div_v == np.inf
    del ps


@pytest.mark.slow
@pytest.mark.backends("dask", reason="a Dask cluster")
def test_local_cluster_memory_is_bounded_by_the_chunks(backend, cluster_client):
    """Inputs of 2 x 256 MiB, workers limited to 400 MiB each: only chunk-wise work fits."""
    import dask.array as da

    rows, vocab, chunk = 16384, 4096, 512
    rng = da.random.default_rng(1)
    p = rng.random((rows, vocab), chunks=(chunk, vocab), dtype=np.float32) + np.float32(1e-3)
    p = p / p.sum(axis=-1, keepdims=True)
    logits = rng.standard_normal((rows, vocab), chunks=(chunk, vocab), dtype=np.float32)
    kl = klx.kl_divergence(p, logits, q_form="logits", reduction="batchmean")
    # an independent lazy reference: the bare formula (no zeros here), in float64
    p64 = p.astype(np.float64)
    l64 = logits.astype(np.float64)
    log_q = (
        l64
        - da.log(da.exp(l64 - l64.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - l64.max(-1, keepdims=True)
    )
    ref = (p64 * (da.log(p64) - log_q)).sum(-1).mean()
    got, want = cluster_client.compute([kl, ref], sync=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.backends("jax", reason="sharded JAX arrays")
def test_sharded_jax_arrays_keep_their_sharding_without_gathering(backend):
    script = textwrap.dedent(
        """
        import os
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from scipy.special import log_softmax, rel_entr
        import klx

        assert len(jax.devices()) == 8, jax.devices()
        mesh = Mesh(np.array(jax.devices()), ("d",))
        rng = np.random.default_rng(0)
        t, s = rng.normal(size=(64, 40)), rng.normal(size=(64, 40))
        ref = rel_entr(np.exp(log_softmax(t / 2, -1)), np.exp(log_softmax(s / 2, -1))).sum(-1)
        fns = {
            "kl": jax.jit(lambda a, b: klx.kl_divergence(a, b, p_form="logits",
                                                         q_form="logits", temperature=2.0)),
            "kl_div": jax.jit(lambda a, b: klx.kl_div(a, b, reduction="none")),
        }
        for spec in (P("d", None), P(None, "d")):
            a = jax.device_put(t, NamedSharding(mesh, spec))
            b = jax.device_put(s, NamedSharding(mesh, spec))
            hlo = fns["kl"].lower(a, b).compile().as_text()
            out = fns["kl"](a, b)
            np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12)
            assert "all-gather" not in hlo, "an input was gathered onto one device"
            if spec == P("d", None):  # batch-sharded: no communication, output stays sharded
                assert "all-reduce" not in hlo and "all-to-all" not in hlo
                assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("d")), 1), out.sharding
            else:  # vocabulary-sharded: collectives on per-row partial results only
                assert "all-reduce" in hlo
            terms = fns["kl_div"](a, b)
            assert terms.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)
        print("ok")
        """
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.backends("dask", reason="Dask arrays of unknown length (after boolean indexing)")
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_where_of_unknown_length(backend, reduction):
    """`where=` of unknown length raised 'cannot convert float NaN to integer' though p and
    q share its shape (a reshape and a broadcast_to needed the sizes)."""
    import dask.array as da

    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(4), size=10), rng.dirichlet(np.ones(4), size=10)
    chosen = p[:, 0] > 0.1
    keep = np.array([True, False] * 5)
    sel = da.from_array(chosen, chunks=5)
    where = (sel & da.from_array(keep, chunks=5))[sel]
    a, b = da.from_array(p, chunks=(5, 4))[sel], da.from_array(q, chunks=(5, 4))[sel]
    assert np.isnan(a.shape[0]) and np.isnan(where.shape[0])
    got = klx.kl_divergence(a, b, where=where, reduction=reduction).compute()
    rows = reference.kl_rows(p[chosen], q[chosen], -1)[0]
    want = reference.reduce(rows, reduction, keep[chosen])
    np.testing.assert_allclose(got, want, rtol=1e-13)
