"""Constrained transductive inference: correct a black-box adapter on unlabelled query volumes with a
size prior learnt from the support set (Silva-Rodríguez, Dolz & Ben Ayed, MedIA 2025).

One module per job: :mod:`.config` (options and results), :mod:`.priors` (size priors from the
support masks), :mod:`.constraints` (the penalty registry: hinge, log-barrier), :mod:`.features`
(query features and predicted proportions), :mod:`.per_query` (refine before each query is
predicted) and :mod:`.batch` (the constraint on all queries during adaptation). Both modes are
entered through :func:`fseft.adapt.api.adapt` (``transductive=``); per-query refinement then runs
as prediction's refinement hook.
"""

from .batch import BatchConstraint
from .config import MODES, QueryReport, TransductiveConfig, TransductiveResult
from .constraints import CONSTRAINTS, get_constraint
from .features import QueryFeatures, check_black_box, load_query_images, query_features
from .per_query import PerQueryRefiner, refine
from .priors import SizePrior, priors_from_header, size_priors

__all__ = [
    "CONSTRAINTS",
    "MODES",
    "BatchConstraint",
    "PerQueryRefiner",
    "QueryFeatures",
    "QueryReport",
    "SizePrior",
    "TransductiveConfig",
    "TransductiveResult",
    "check_black_box",
    "get_constraint",
    "load_query_images",
    "priors_from_header",
    "query_features",
    "refine",
    "size_priors",
]
