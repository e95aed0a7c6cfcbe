"""protoclr: contrastive learning as an approximation of a supervised prototype objective.

Submodules are imported lazily by their users; ``import protoclr`` stays cheap.
"""

__version__ = "0.1.0"
