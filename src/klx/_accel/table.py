"""The accelerator table: one :class:`Accelerator` row per fast path, nothing else.

Each row states which calls it serves (operation, array library, device, dtypes, layout,
divergences and forms, minimum size, the traces it serves besides eager arrays, whether it
carries gradients) and names its implementation, a function of the call object imported
only when first used. The gates that read a row are in :mod:`klx._accel.gates`; choosing
a row for a call, the first-use checks and :func:`~klx._accel.registry.only` in
:mod:`klx._accel.registry`; :func:`klx.explain` and the docs table in
:mod:`klx._accel.explain`.

Adding a fast path: a module with its implementation, plus one row here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ACCELERATORS", "BY_KEY", "Accelerator"]


@dataclass(frozen=True)
class Accelerator:
    """One fast path, and the calls it serves."""

    #: A short unique name, e.g. 'numpy-blocked'.
    name: str
    #: 'kl_div' (:func:`klx.kl_div`; returns the result) or 'divergence' (the divergence
    #: functions; returns one value per distribution, reduced afterwards).
    operation: str
    #: The array library, as :func:`klx._namespace.library_name` names it.
    library: str
    #: 'module:function' of the implementation, which takes the call object.
    implementation: str
    #: Device types served ('cpu', 'cuda'); empty: any (JAX places arrays itself).
    devices: tuple[str, ...] = ()
    #: dtype names served, e.g. ('float32', 'float64').
    dtypes: tuple[str, ...] = ("float32", "float64")
    #: 'contiguous' (C order), 'rows' (last axis of stride 1, any row stride), or 'any'
    #: (any strides; for 'divergence', distributions along any axis too).
    layout: str = "contiguous"
    #: Fewest elements worth the fast path (below it the definition is as fast).
    min_size: int = 0
    #: Divergences served by name (operation 'divergence'; empty: every divergence, one
    #: registered by a user too, as the definition computes it), and (p_form, q_form)
    #: pairs served (empty: every pair).
    kinds: tuple[str, ...] = ()
    forms: tuple[tuple[str, str], ...] = ()
    #: The traces it serves besides concrete arrays: 'jax' (a JAX tracer: jax.jit, grad,
    #: vmap) or 'torch.compile'. Empty: concrete arrays only (not under jax.jit,
    #: torch.compile, torch.func, CUDA-graph capture or forward-mode AD). Its module is then
    #: klx._accel.traced, imported by an import statement, which torch.compile traces.
    traces: tuple[str, ...] = ()
    #: Whether it serves only divergences whose record has a closed-form derivative from
    #: logits (:mod:`klx._closed_forms`), which it registers with the tracer.
    closed_form: bool = False
    #: Whether inputs that require gradients may use it (it has a backward).
    autograd: bool = False
    #: Whether its first use on a (device, dtype) is checked against the definition.
    probe: bool = True
    #: Modules it needs beyond the arrays' own library (e.g. NumPy for torch's CPU rows).
    requires: tuple[str, ...] = ()
    #: The range of the mixture weight (JS's `beta`) served, or None for any.
    weights: tuple[float, float] | None = None
    #: What it does, for the docs table.
    summary: str = field(default="", compare=False)

    @property
    def module(self) -> str:
        """The implementation's module."""
        return self.implementation.partition(":")[0]

    @property
    def function(self) -> str:
        """The implementation's function name in its module."""
        return self.implementation.partition(":")[2]


_BLOCKED = "klx._accel.blocked"

#: Every accelerator, in order of preference within an (operation, library).
ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator(
        "numpy-blocked",
        "kl_div",
        "numpy",
        f"{_BLOCKED}:kl_div_numpy",
        devices=("cpu",),
        dtypes=("float16", "float32", "float64"),
        layout="any",
        summary="1 MiB blocks of the bare formula on klx's threads (zero targets by a "
        "safe log in the same pass); blocks with NaN by the definition",
    ),
    Accelerator(
        "torch-cpu-blocked",
        "kl_div",
        "torch",
        f"{_BLOCKED}:kl_div_torch",
        devices=("cpu",),
        dtypes=("float16", "float32", "float64"),
        layout="any",
        requires=("numpy",),
        summary="the NumPy blocks on zero-copy views (no torch intra-op barriers; a small "
        "input is one block of a few NumPy calls, cheaper than one torch op)",
    ),
    Accelerator(
        "triton-kl-div",
        "kl_div",
        "torch",
        "klx._accel.gpu:triton_kl_div",
        devices=("cuda",),
        dtypes=("float16", "bfloat16", "float32", "float64"),
        layout="rows",
        autograd=True,
        requires=("triton",),
        summary="fused Triton kernels, forward and backward (never run on a GPU yet)",
    ),
    Accelerator(
        "cupy-kernels",
        "kl_div",
        "cupy",
        "klx._accel.gpu:cupy_kl_div",
        devices=("cuda",),
        summary="a CuPy ReductionKernel / ElementwiseKernel (never run on a GPU yet)",
    ),
    Accelerator(
        "jax-jit",
        "kl_div",
        "jax",
        "klx._accel.jax_jit:kl_div",
        dtypes=("float16", "bfloat16", "float32", "float64"),
        layout="any",
        probe=False,
        summary="eager calls run the definition as one jitted XLA program "
        "(it is the definition, so it needs no first-use check)",
    ),
    Accelerator(
        "dask-chunks",
        "kl_div",
        "dask",
        f"{_BLOCKED}:kl_div_dask",
        devices=("cpu",),
        dtypes=("float16", "float32", "float64"),
        layout="any",
        summary="each chunk by the NumPy blocks (map_blocks), the sums by Dask's reduction tree",
    ),
    Accelerator(
        "numpy-rows",
        "divergence",
        "numpy",
        "klx._accel.rows:blocked_rows",
        devices=("cpu",),
        dtypes=("float16", "float32", "float64"),
        layout="any",
        min_size=1 << 20,
        summary="blocks of rows on klx's threads, each by the definition (KL and the KL "
        "mixture from logits by kernels of their own): bounded memory, any axis or layout",
    ),
    Accelerator(
        "torch-cpu-rows",
        "divergence",
        "torch",
        "klx._accel.rows:blocked_rows",
        devices=("cpu",),
        dtypes=("float16", "float32", "float64"),
        layout="any",
        min_size=1 << 20,
        requires=("numpy",),
        summary="the NumPy row blocks (as numpy-rows) on zero-copy views: no torch "
        "intra-op barriers, bounded memory, any axis or layout",
    ),
    Accelerator(
        "dask-rows",
        "divergence",
        "dask",
        "klx._accel.rows:dask_rows",
        devices=("cpu",),
        dtypes=("float16", "float32", "float64"),
        layout="any",
        summary="each chunk (its distributions whole) by the NumPy row blocks (map_blocks)",
    ),
    Accelerator(
        "jax-closed-form",
        "divergence",
        "jax",
        "klx._accel.traced:jax_rows",
        dtypes=("float16", "bfloat16", "float32", "float64"),
        closed_form=True,
        forms=(("logits", "logits"), ("probs", "probs")),
        layout="any",
        traces=("jax",),
        autograd=True,
        probe=False,
        summary="the definition's value with its derivative in closed form (a "
        "jax.custom_jvp; KL from logits: (q - p) / T and p (d - KL) / T, from "
        "probabilities: -p / q and log(p / q) + 1), inside jax.jit and outside "
        "(it is the definition, so it needs no first-use check)",
    ),
    Accelerator(
        "triton-rows-from-logits",
        "divergence",
        "torch",
        "klx._accel.gpu:triton_rows",
        devices=("cuda",),
        dtypes=("float16", "bfloat16", "float32", "float64"),
        kinds=("kl", "js"),
        forms=(("logits", "logits"),),
        layout="rows",
        autograd=True,
        requires=("triton",),
        weights=(1.0 / 16.0, 15.0 / 16.0),
        summary="Triton kernels over the vocabulary: log-sum-exps online, then the "
        "definition's terms (two reads of each row), with backward (never run on a GPU yet)",
    ),
    Accelerator(
        "torch-closed-form",
        "divergence",
        "torch",
        "klx._accel.traced:torch_rows",
        dtypes=("float16", "bfloat16", "float32", "float64"),
        closed_form=True,
        forms=(("logits", "logits"), ("probs", "probs")),
        layout="any",
        traces=("torch.compile",),
        autograd=True,
        probe=False,
        summary="the definition's value with its derivative in closed form (a "
        "torch.autograd.Function recomputing the log-softmaxes; KL from logits: (q - p) / T "
        "and p (d - KL) / T, from probabilities: -p / q and log(p / q) + 1), eager and "
        "inside torch.compile; without gradients the definition",
    ),
)

#: The rows of each (operation, library), in order of preference; :func:`klx._accel.registry.only`
#: swaps them for one row.
BY_KEY: dict[tuple[str, str], tuple[Accelerator, ...]] = {}
for _row in ACCELERATORS:
    BY_KEY[(_row.operation, _row.library)] = (
        *BY_KEY.get((_row.operation, _row.library), ()),
        _row,
    )
