"""nox sessions: tests, lint, bench (CPU benchmarks)."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite (the same command CI runs)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff over sources, tests and benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """CPU benchmarks: each prints a table of ratios measured side by side in one run."""
    session.install("-e", ".")
    for script in sorted(__import__("pathlib").Path("benchmarks").glob("*.py")):
        if not script.name.startswith("gpu"):  # gpu*.py need CUDA
            session.run("python", str(script))
