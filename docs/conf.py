"""Sphinx configuration of klx's documentation site (built by ``nox -s docs``)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # the checkout's klx, installed or not

import klx  # noqa: E402

project = "klx"
author = "The klx developers"
copyright = "the klx developers"
release = version = klx.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated"]
templates_path = ["_templates"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# The API reference: every name in klx.__all__, from its numpydoc docstring.
autosummary_generate = True
autosummary_ignore_module_all = False
autosummary_imported_members = True  # klx re-exports from private modules
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

intersphinx_mapping = {}  # no network while building: cross-references stay plain text
suppress_warnings = ["config.cache"]

html_theme = "pydata_sphinx_theme"
html_title = "klx"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "header_links_before_dropdown": 5,
}
html_static_path: list[str] = []


def _conformance_report() -> None:
    """Copy the report of the last `nox` run (conformance/report.md) into the site."""
    folder = HERE / "_generated"
    folder.mkdir(exist_ok=True)
    report = ROOT / "conformance" / "report.md"
    target = folder / "conformance-report.md"
    if report.is_file():
        shutil.copyfile(report, target)
    else:
        target.write_text(
            "No report in this build: `nox` writes it (`conformance/report.md`) after the "
            "tests sessions, before it builds this site.\n"
        )


_conformance_report()


def _alpha_family_plot() -> None:
    """The alpha-divergence between two fixed distributions for alpha in [-1, 2], drawn
    from klx itself (docs/divergence-family.md shows it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import klx

    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.5, 0.3])
    alphas = np.linspace(-1.0, 2.0, 301)
    values = [float(klx.alpha_divergence(p, q, float(a))) for a in alphas]
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=120)
    ax.plot(alphas, values, label="alpha_divergence(P, Q, alpha)")
    for a, name in ((0.0, "KL(Q || P)"), (0.5, "4 H^2"), (1.0, "KL(P || Q)")):
        ax.plot([a], [float(klx.alpha_divergence(p, q, a))], "o", label=f"alpha = {a:g}: {name}")
    ax.set_xlabel("alpha")
    ax.set_ylabel("divergence (nats)")
    ax.set_title("P = (0.7, 0.2, 0.1), Q = (0.2, 0.5, 0.3)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    folder = HERE / "_generated"
    folder.mkdir(exist_ok=True)
    fig.savefig(folder / "alpha-family.png")
    plt.close(fig)


_alpha_family_plot()


#: The pages index.md names itself; every other docs/*.md is a feature page.
GUIDE_AND_REFERENCE = {
    "index",
    "getting-started",
    "kl-div-traps",
    "coming-from",
    "api",
    "benchmarks",
    "conformance",
    "contributing",
}


def feature_pages() -> list[str]:
    """docs/*.md that index.md does not name: a new feature's page needs no edit there."""
    return sorted(p.stem for p in HERE.glob("*.md") if p.stem not in GUIDE_AND_REFERENCE)


def _fill_features(app: object, docname: str, source: list[str]) -> None:
    if docname == "index":
        source[0] = source[0].replace("klx-feature-pages", "\n".join(feature_pages()))


def setup(app: object) -> dict[str, bool]:
    app.connect("source-read", _fill_features)  # type: ignore[attr-defined]
    return {"parallel_read_safe": True}
