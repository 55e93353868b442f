"""Secure aggregation: the researcher learns the weighted sum of the updates, nothing else.

Schemes (registry group ``fedcore.secagg``): ``plain`` (:class:`PlainAggregation`, the
identity), ``masking`` (:class:`~fedcore.secagg.masking.PairwiseMasking`, tolerates
drop-outs) and ``joye-libert`` (:class:`~fedcore.secagg.joye_libert.JoyeLibert`, additively
homomorphic encryption). See docs/secure-aggregation.md.
"""

from fedcore.secagg.base import (
    PHASES,
    NodeSession,
    PlainAggregation,
    ResearcherSession,
    SecureAggregation,
    SecureSum,
    open_node_session,
    scheme_of,
)
from fedcore.secagg.context import NodeContext, NodeFloors
from fedcore.secagg.fixedpoint import Encoding, FixedPoint
from fedcore.secagg.joye_libert import JoyeLibert
from fedcore.secagg.masking import PairwiseMasking

__all__ = [
    "PHASES",
    "Encoding",
    "FixedPoint",
    "JoyeLibert",
    "NodeContext",
    "NodeFloors",
    "NodeSession",
    "PairwiseMasking",
    "PlainAggregation",
    "ResearcherSession",
    "SecureAggregation",
    "SecureSum",
    "open_node_session",
    "scheme_of",
]
