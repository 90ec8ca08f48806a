"""klx where users trace it: inside ``jax.jit`` and ``torch.compile(fullgraph=True)``,
against the plain formula traced the same way (issue 24).

    python -m benchmarks.traced                    # every backend that traces (JAX, torch)
    python -m benchmarks.traced --quick            # smaller shapes
    python -m benchmarks.traced --smoke            # tiny shapes: does every row trace?
    python -m benchmarks.traced --backends jax --load 1
    python -m benchmarks.traced --rows "JS from" mixture     # only these rows
    python -m benchmarks.traced --device cuda      # on the GPU (torch's and JAX's first)

Each row is one traced call, values alone and values with gradients (with respect to the
student's input), timed in one process after compiling (compile time is not counted),
klx and the formula in alternation (so that both see the same machine): klx against the
plain formula a user would write without klx, on dense inputs, targets with 1/8 exact
zeros, masks (``where=``) and a temperature, for kl_div, KL of probabilities, KL, JS,
skew KL and TV from logits, the divergence family (the KL mixture, alpha, Rényi,
cross-entropy, entropy), the k3 estimator, a top-k sparse teacher and the fused-linear
KL (whose torch call runs eagerly by design: compiled without ``fullgraph``). The ratio
is klx's median over the formula's; the issue's targets are at most 1.15 for values and
1.2 with gradients. The formula has no guard (it is NaN at exact zeros against ``-inf``,
and loses every digit near P = Q), so a ratio below 1 is not expected. Prints a Markdown
table and writes traced.json to --out. ``--smoke``: tiny shapes, one timing each (a
check that every row traces, not a measurement). ``--device cuda`` times the same calls
on the first CUDA device (torch's, and JAX's GPU; the issue's GPU targets are the same);
``python -m benchmarks.gpu_check`` runs it so on a GPU machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import importlib.util
import json
import warnings
from collections.abc import Callable
from typing import Any

import benchmarks
import klx
from benchmarks.cli import parser
from benchmarks.timing import busy, interleaved, load_average

#: kl_div's shape, the logits' shape, (tokens, hidden, vocab) of the fused-linear rows, the
#: top-k of the sparse rows and the sampled tokens of the estimator rows, per size.
SIZES = {
    "default": ((1024, 4096), (512, 32000), (512, 512, 8192), 64, 1 << 21),
    "quick": ((256, 4096), (64, 32000), (128, 256, 4096), 16, 1 << 18),
    "smoke": ((16, 64), (8, 256), (16, 16, 64), 4, 512),
}
#: Seconds of timing per call, and the most runs, per size (the smoke run checks the
#: table and the JSON, not the figures).
BUDGET = {"default": (4.0, 60), "quick": (2.0, 30), "smoke": (0.01, 2)}
#: The targets: klx / formula at most this, for values and for values with gradients.
TARGETS = {"value": 1.15, "grad": 1.2}
#: Where a run can time the calls: the CPU, or the first CUDA device.
DEVICES = ("cpu", "cuda")


def _inputs(np: Any, size: str) -> dict[str, Any]:
    """float32 NumPy inputs: kl_div's (log q, p), p with 1/8 zeros, two logits, a top-k
    teacher, per-token log-probabilities and the fused-linear rows' hidden states."""
    kl_shape, logit_shape, (n, h, v), k, tokens = SIZES[size]
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(kl_shape[1]), size=kl_shape[0])
    p = rng.dirichlet(np.ones(kl_shape[1]), size=kl_shape[0])
    p0 = p.copy()
    p0[:, ::8] = 0.0
    p0 /= p0.sum(-1, keepdims=True)
    t = 2.0 * rng.normal(size=logit_shape)
    s = t + 0.5 * rng.normal(size=logit_shape)
    keep = rng.random(logit_shape[0]) > 0.125
    top = np.argsort(-t, axis=-1)[:, :k]
    lt = t - t.max(-1, keepdims=True)
    lt -= np.log(np.exp(lt).sum(-1, keepdims=True))
    lp_tok = -np.abs(rng.normal(size=tokens)) - 0.1
    f32 = np.float32
    return {
        "x": np.log(q).astype(f32),
        "q": q.astype(f32),
        "y": p.astype(f32),
        "y0": p0.astype(f32),
        "t": t.astype(f32),
        "s": s.astype(f32),
        "keep": keep,
        "idx": top.astype(np.int64),
        "lpv": np.take_along_axis(lt, top, -1).astype(f32),
        "lq_tok": (lp_tok + 0.1 * rng.normal(size=tokens)).astype(f32),
        "lp_tok": lp_tok.astype(f32),
        "hs": rng.normal(size=(n, h)).astype(f32),
        "ht": rng.normal(size=(n, h)).astype(f32),
        "ws": (rng.normal(size=(v, h)) / np.sqrt(h)).astype(f32),
        "wt": (rng.normal(size=(v, h)) / np.sqrt(h)).astype(f32),
    }


# ---------------------------------------------------------------- klx's calls, one code


def k_kl_div(x: Any, y: Any) -> Any:
    """klx's call: the same code for every library."""
    return klx.kl_div(x, y, reduction="batchmean")


def k_probs(q: Any, p: Any) -> Any:
    """KL(P || Q) of two probability arrays by the math-first call, Q first (its gradient)."""
    return klx.kl_divergence(p, q, reduction="batchmean")


def k_logits(s: Any, t: Any, temperature: float = 1.0, mask: Any = None) -> Any:
    """KL(softmax(t / T) || softmax(s / T)) by klx, the student `s` first (its gradient)."""
    return klx.kl_divergence(
        t,
        s,
        p_form="logits",
        q_form="logits",
        temperature=temperature,
        where=mask,
        reduction="batchmean",
    )


def k_js(s: Any, t: Any) -> Any:
    """JS(P, Q) from logits (each its own function: torch.compile counts recompiles per
    code object, and one closure for three divergences passed its limit of 8)."""
    return klx.js_divergence(t, s, p_form="logits", q_form="logits", reduction="batchmean")


def k_skew(s: Any, t: Any) -> Any:
    """Skew KL(P || 0.1 P + 0.9 Q) from logits."""
    return klx.skew_kl_divergence(
        t, s, p_form="logits", q_form="logits", alpha=0.1, reduction="batchmean"
    )


def k_tv(s: Any, t: Any) -> Any:
    """TV(P, Q) from logits."""
    return klx.tv_distance(t, s, p_form="logits", q_form="logits", reduction="batchmean")


def k_mix(s: Any, t: Any) -> Any:
    """0.3 KL(P || Q) + 0.7 KL(Q || P) from logits (the divergence family, issue 26)."""
    return klx.divergence(
        t, s, "mix", lam=0.3, p_form="logits", q_form="logits", reduction="batchmean"
    )


def k_alpha(s: Any, t: Any) -> Any:
    """Amari's alpha-divergence of order 0.5 from logits."""
    return klx.alpha_divergence(t, s, 0.5, p_form="logits", q_form="logits", reduction="batchmean")


def k_renyi(s: Any, t: Any) -> Any:
    """The Rényi divergence of order 0.5 from logits."""
    return klx.renyi_divergence(t, s, 0.5, p_form="logits", q_form="logits", reduction="batchmean")


def k_cross_entropy(s: Any, t: Any) -> Any:
    """The cross-entropy -sum p log q of soft labels P against the student's logits."""
    return klx.cross_entropy(t, s, p_form="logits", q_form="logits", reduction="batchmean")


def k_entropy(s: Any) -> Any:
    """The student's entropy from its logits."""
    return klx.entropy(s, form="logits", reduction="batchmean")


def k_k3(lq: Any, lp: Any) -> Any:
    """Schulman's k3 of KL(P || Q) from per-token log-probabilities, averaged."""
    return klx.kl_estimate(lp, lq, estimator="k3", reduction="batchmean")


def k_sparse(s: Any, idx: Any, lpv: Any) -> Any:
    """KL of a top-k teacher (with its tail bin) against the student's logits."""
    return klx.sparse_kl_divergence(idx, lpv, s, reduction="batchmean")


def k_fused(hs: Any, ws: Any, ht: Any, wt: Any) -> Any:
    """KL between two models' softmaxes from their hidden states, in chunks."""
    return klx.fused_linear_divergence(ht, wt, hs, ws)


# ------------------------------------------------------- the plain formulas, per library


def _formulas(ops: Any) -> dict[str, Callable[..., Any]]:
    """The formula of each row, from a library's ``log_softmax(x)``, ``gather(x, idx)``
    (along the last axis), ``exp``, ``log``, ``abs``, ``sum(x, axis)``, ``where``."""
    lsm, exp, log, total = ops.log_softmax, ops.exp, ops.log, ops.sum

    def kl_div(x: Any, y: Any) -> Any:
        return ops.kl_div(x, y)

    def probs(q: Any, p: Any) -> Any:
        return total(p * (log(p) - log(q)), -1).mean()

    def logits(s: Any, t: Any, temperature: float = 1.0, mask: Any = None) -> Any:
        lp, lq = lsm(t / temperature), lsm(s / temperature)
        rows = total(exp(lp) * (lp - lq), -1)
        if mask is None:
            return rows.mean()
        return total(ops.where(mask, rows, 0.0), -1) / total(mask, -1)

    def js(s: Any, t: Any) -> Any:
        lp, lq = lsm(t), lsm(s)
        p, q = exp(lp), exp(lq)
        lm = log(0.5 * (p + q))
        return (0.5 * total(p * (lp - lm), -1) + 0.5 * total(q * (lq - lm), -1)).mean()

    def skew(s: Any, t: Any) -> Any:
        lp, lq = lsm(t), lsm(s)
        p = exp(lp)
        return total(p * (lp - log(0.1 * p + 0.9 * exp(lq))), -1).mean()

    def tv(s: Any, t: Any) -> Any:
        return (0.5 * total(ops.abs(exp(lsm(t)) - exp(lsm(s))), -1)).mean()

    def mix(s: Any, t: Any) -> Any:
        lp, lq = lsm(t), lsm(s)
        fwd, rev = total(exp(lp) * (lp - lq), -1), total(exp(lq) * (lq - lp), -1)
        return (0.3 * fwd + 0.7 * rev).mean()

    def alpha(s: Any, t: Any) -> Any:
        lp, lq = lsm(t), lsm(s)
        mass = total(exp(0.5 * lp + 0.5 * lq), -1)
        return ((1.0 - mass) / 0.25).mean()

    def renyi(s: Any, t: Any) -> Any:
        lp, lq = lsm(t), lsm(s)
        return (log(total(exp(0.5 * lp + 0.5 * lq), -1)) / -0.5).mean()

    def cross_entropy(s: Any, t: Any) -> Any:
        return (-total(exp(lsm(t)) * lsm(s), -1)).mean()

    def entropy(s: Any) -> Any:
        lq = lsm(s)
        return (-total(exp(lq) * lq, -1)).mean()

    def k3(lq: Any, lp: Any) -> Any:
        r = lq - lp
        return (exp(r) - 1.0 - r).mean()

    def sparse(s: Any, idx: Any, lpv: Any) -> Any:
        lq = ops.gather(lsm(s), idx)
        p = exp(lpv)
        p_tail = 1.0 - total(p, -1)
        q_tail = 1.0 - total(exp(lq), -1)
        rows = total(p * (lpv - lq), -1) + p_tail * (log(p_tail) - log(q_tail))
        return rows.mean()

    def fused(hs: Any, ws: Any, ht: Any, wt: Any) -> Any:
        return logits(hs @ ws.T, ht @ wt.T)

    return {
        "kl_div": kl_div,
        "probs": probs,
        "logits": logits,
        "js": js,
        "skew": skew,
        "tv": tv,
        "mix": mix,
        "alpha": alpha,
        "renyi": renyi,
        "cross_entropy": cross_entropy,
        "entropy": entropy,
        "k3": k3,
        "sparse": sparse,
        "fused": fused,
    }


def _every_row(add: Callable[..., None], f: dict[str, Callable[..., Any]], a: Any) -> None:
    """The rows of the table, each added (klx against the formula) by the backend's `add`.
    The first argument of each call is the one differentiated (the student's)."""
    add(f"kl_div batchmean {tuple(a['x'].shape)}", k_kl_div, f["kl_div"], (a["x"], a["y"]))
    add("kl_div, 1/8 zero targets", k_kl_div, f["kl_div"], (a["x"], a["y0"]))
    add(f"KL of probabilities {tuple(a['q'].shape)}", k_probs, f["probs"], (a["q"], a["y"]))
    add(f"KL from logits {tuple(a['t'].shape)}", k_logits, f["logits"], (a["s"], a["t"]))
    add(
        "KL from logits, T = 2, masked",
        lambda s, t: k_logits(s, t, 2.0, a["keep"]),
        lambda s, t: f["logits"](s, t, 2.0, a["keep"]),
        (a["s"], a["t"]),
    )
    add("JS from logits", k_js, f["js"], (a["s"], a["t"]))
    add("skew KL from logits, alpha 0.1", k_skew, f["skew"], (a["s"], a["t"]))
    add("TV from logits", k_tv, f["tv"], (a["s"], a["t"]))
    add("KL mixture from logits, lam 0.3", k_mix, f["mix"], (a["s"], a["t"]))
    add("alpha-divergence from logits, order 0.5", k_alpha, f["alpha"], (a["s"], a["t"]))
    add("Rényi divergence from logits, order 0.5", k_renyi, f["renyi"], (a["s"], a["t"]))
    add("cross-entropy from logits", k_cross_entropy, f["cross_entropy"], (a["s"], a["t"]))
    add("entropy from logits", k_entropy, f["entropy"], (a["s"],))
    add(f"kl_estimate k3, {a['lq_tok'].shape[0]} tokens", k_k3, f["k3"], (a["lq_tok"], a["lp_tok"]))
    k = a["idx"].shape[-1]
    add(f"sparse KL, top-{k} teacher", k_sparse, f["sparse"], (a["s"], a["idx"], a["lpv"]))
    n, h = a["hs"].shape
    v = a["ws"].shape[0]
    add(
        f"fused-linear KL, {n} x {h} x {v}",
        k_fused,
        f["fused"],
        (a["hs"], a["ws"], a["ht"], a["wt"]),
    )


def jax_cases(
    data: dict[str, Any], device: str = "cpu"
) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (klx, formula), each a jitted call on JAX arrays on `device`."""
    import jax
    import jax.numpy as jnp

    where = jax_device(device)
    arrays = {k: jax.device_put(v, where) for k, v in data.items()}

    class Ops:
        log_softmax = staticmethod(lambda x: jax.nn.log_softmax(x, -1))
        exp, log, abs, sum, where = jnp.exp, jnp.log, jnp.abs, jnp.sum, jnp.where
        gather = staticmethod(lambda x, idx: jnp.take_along_axis(x, idx, -1))

        @staticmethod
        def kl_div(x: Any, y: Any) -> Any:
            return jnp.sum(jax.scipy.special.xlogy(y, y) - y * x) / x.shape[0]

    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}

    def add(name: str, k: Callable[..., Any], f: Callable[..., Any], args: tuple[Any, ...]) -> None:
        kj, fj = jax.jit(k), jax.jit(f)
        cases[f"{name} value"] = (lambda: kj(*args), lambda: fj(*args))
        kg, fg = jax.jit(jax.grad(k)), jax.jit(jax.grad(f))
        cases[f"{name} grad"] = (lambda: kg(*args), lambda: fg(*args))

    _every_row(add, _formulas(Ops), arrays)
    return cases


def torch_cases(
    data: dict[str, Any], device: str = "cpu"
) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (klx, formula), each torch.compile(fullgraph=True) of the same call on
    `device` (the fused-linear call runs eagerly by design, a graph break: compiled
    without fullgraph)."""
    import torch
    import torch.nn.functional as F

    arrays = {k: torch.from_numpy(v).to(device) for k, v in data.items()}

    class Ops:
        log_softmax = staticmethod(lambda x: torch.log_softmax(x, -1))
        exp, log, abs, sum, where = torch.exp, torch.log, torch.abs, torch.sum, torch.where
        gather = staticmethod(lambda x, idx: torch.gather(x, -1, idx))

        @staticmethod
        def kl_div(x: Any, y: Any) -> Any:
            return F.kl_div(x, y, reduction="batchmean")

    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}

    def add(name: str, k: Callable[..., Any], f: Callable[..., Any], args: tuple[Any, ...]) -> None:
        full = not name.startswith("fused")
        kc = torch.compile(k, fullgraph=full)
        fc = torch.compile(f, fullgraph=full)
        cases[f"{name} value"] = (lambda: kc(*args), lambda: fc(*args))
        leaf = args[0].clone().requires_grad_(True)
        rest = args[1:]

        def grad_of(fn: Callable[..., Any]) -> Callable[[], Any]:
            def run() -> Any:
                leaf.grad = None
                out = fn(leaf, *rest)
                out.backward()
                return leaf.grad

            return run

        cases[f"{name} grad"] = (grad_of(kc), grad_of(fc))

    _every_row(add, _formulas(Ops), arrays)
    return cases


CASES = {"jax": jax_cases, "torch": torch_cases}


def jax_device(device: str) -> Any:
    """JAX's first device of the kind `device` names ('cuda': its first GPU)."""
    import jax

    try:
        return jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except RuntimeError as exc:  # no such backend in this jax installation
        msg = f"JAX sees no {device} device ({exc}); install jax[cuda12] for its GPU"
        raise RuntimeError(msg) from exc


def unavailable(backend: str, device: str) -> str | None:
    """Why `backend` cannot time calls on `device` here, or None if it can."""
    if device == "cpu":
        return None
    if importlib.util.find_spec(backend) is None:
        return f"{backend} is not installed"
    if backend == "torch":
        import torch

        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    try:
        jax_device(device)
    except RuntimeError as exc:
        return str(exc)
    return None


def measure(
    backends: list[str], size: str, only: list[str] | None = None, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Every row of the table on each backend, timed on `device` ('cpu' or 'cuda')."""
    import numpy as np

    if device not in DEVICES:
        msg = f"`device` must be one of {', '.join(DEVICES)}, not {device!r}"
        raise ValueError(msg)
    data = _inputs(np, size)
    budget, runs = BUDGET[size]
    rows = []
    for backend in backends:
        for name, (k, f) in CASES[backend](data, device).items():
            if only and not any(part in name for part in only):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                timed = interleaved(
                    {"klx": k, "formula": f},
                    _sync(backend, device),
                    budget_s=budget,
                    min_rounds=min(5, runs),
                    max_rounds=runs,
                    warmup=2,
                )
            tk, tf = timed["klx"].median_s, timed["formula"].median_s
            kind = "grad" if name.endswith("grad") else "value"
            ratio = tk / tf
            rows.append(
                {
                    "backend": "jax.jit" if backend == "jax" else "torch.compile",
                    "device": device,
                    "case": name,
                    "klx_ms": tk * 1e3,
                    "formula_ms": tf * 1e3,
                    "ratio": ratio,
                    "target": TARGETS[kind],
                    "met": ratio <= TARGETS[kind],
                }
            )
            print(f"{backend} {name}: {ratio:.2f}", file=sys.stderr, flush=True)
    return rows


def _sync(backend: str, device: str) -> Callable[[Any], None]:
    """What waits for a call's result: JAX's dispatch is asynchronous, and so is CUDA's."""
    if backend == "jax":
        return lambda out: out.block_until_ready()
    if device == "cuda":
        import torch

        return lambda _: torch.cuda.synchronize()
    return lambda _: None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| traced call | case | klx ms | formula ms | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "" if r["met"] else " (over)"
        where = "" if r.get("device", "cpu") == "cpu" else f" on {r['device']}"
        lines.append(
            f"| {r['backend']}{where} | {r['case']} | {r['klx_ms']:.2f} | {r['formula_ms']:.2f} "
            f"| {r['ratio']:.2f}{mark} | {r['target']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap: argparse.ArgumentParser = parser(__doc__)
    ap.add_argument("--backends", nargs="*", default=None, help="jax torch (default: both)")
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one timing: a check")
    ap.add_argument("--load", type=int, default=0, help="busy background processes while timing")
    ap.add_argument(
        "--rows", nargs="*", default=None, help="only the rows whose name holds one of these"
    )
    ap.add_argument(
        "--device", choices=DEVICES, default="cpu", help="time on the CPU or the first CUDA device"
    )
    ap.add_argument("--out", default=str(benchmarks.OUT), help="folder for traced.json")
    args = ap.parse_args(argv)
    backends = args.backends or [b for b in CASES if importlib.util.find_spec(b) is not None]
    missing = {b: why for b in backends if (why := unavailable(b, args.device))}
    for backend, why in missing.items():
        print(f"traced: {backend} skipped: {why}", file=sys.stderr)
    backends = [b for b in backends if b not in missing]
    if not backends:
        print(f"traced: no backend can run on {args.device} here", file=sys.stderr)
        return 2
    with busy(args.load):
        size = "smoke" if args.smoke else "quick" if args.quick else "default"
        rows = measure(backends, size, args.rows, args.device)
    print(f"load average {load_average():.1f}, {args.load} busy processes", file=sys.stderr)
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "traced.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
