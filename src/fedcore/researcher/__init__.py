"""The researcher's side: experiments, the federation session, rounds, statistics.

:class:`Federation` is the session (connect, search, node status, close) that
:class:`Experiment` and :class:`FederatedStatistics` compose; one round of training is a
:class:`Round` that returns a :class:`RoundResult`.
"""

from fedcore.researcher.experiment import Experiment
from fedcore.researcher.federation import Federation
from fedcore.researcher.round import Round, RoundResult, RoundSettings
from fedcore.researcher.statistics import FederatedStatistics, Histogram

__all__ = ["Experiment", "FederatedStatistics", "Federation", "Histogram", "Round",
           "RoundResult", "RoundSettings"]
