"""Secure aggregation: the researcher learns the weighted sum of the updates, nothing else.

Schemes (registry group ``fedcore.secagg``): ``plain`` (:class:`PlainAggregation`, the
identity), ``masking`` (:class:`~fedcore.secagg.masking.PairwiseMasking`, tolerates
drop-outs) and ``joye-libert`` (:class:`~fedcore.secagg.joye_libert.JoyeLibert`, additively
homomorphic encryption). See docs/secure-aggregation.md.
"""

from .base import (
    PHASES,
    NodeSession,
    PlainAggregation,
    ResearcherSession,
    SecureAggregation,
    SecureSum,
    open_node_session,
    scheme_of,
)
from .fixedpoint import Encoding, FixedPoint
from .joye_libert import JoyeLibert
from .masking import PairwiseMasking

__all__ = [
    "PHASES",
    "Encoding",
    "FixedPoint",
    "JoyeLibert",
    "NodeSession",
    "PairwiseMasking",
    "PlainAggregation",
    "ResearcherSession",
    "SecureAggregation",
    "SecureSum",
    "open_node_session",
    "scheme_of",
]
