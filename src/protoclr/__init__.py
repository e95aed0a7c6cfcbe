"""protoclr: contrastive learning as an approximation of a supervised prototype objective.

Submodules are imported lazily by their users; ``import protoclr`` stays cheap.
"""

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it; CHANGELOG.md)
