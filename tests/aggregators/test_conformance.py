"""Every built-in aggregator runs fedcore.testing's aggregator conformance suite."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.aggregators import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Median,
    Scaffold,
    TrimmedMean,
)
from fedcore.params import ParameterSet
from fedcore.privacy.central import CentralDP
from fedcore.testing.aggregator import AggregatorConformance, weighted_mean


def _coordinatewise(global_params, updates, reduce):
    out = {}
    for k, ref in global_params.items():
        stacked = np.stack([np.asarray(u.params[k], np.float64) for u in updates])
        value = reduce(np.sort(stacked, axis=0))
        out[k] = (np.rint(value) if ref.dtype.kind in "iub" else value).astype(ref.dtype)
    return ParameterSet(out)


class TestFedAvg(AggregatorConformance):
    @pytest.fixture
    def aggregator(self):
        return FedAvg()


class TestFedProx(AggregatorConformance):
    @pytest.fixture
    def aggregator(self):
        return FedProx(mu=0.1)


class TestScaffold(AggregatorConformance):
    @pytest.fixture
    def aggregator(self):
        return Scaffold(n_nodes=5)

    def extras(self, aggregator, node, params, rng):
        return {"delta_c": ParameterSet((k, rng.normal(0, 0.1, np.shape(v)))
                                        for k, v in params.items())}


class TestFedAvgM(AggregatorConformance):
    # round 1 from a fresh momentum: x + eta * (mean - x), i.e. the mean for eta = 1
    @pytest.fixture
    def aggregator(self):
        return FedAvgM(eta=1.0, beta=0.9)


class _Adaptive(AggregatorConformance):
    def reference(self, aggregator, global_params, updates):
        mean = weighted_mean(global_params, updates)
        out = {}
        for k, x in global_params.items():
            if x.dtype.kind != "f":
                out[k] = mean[k]
                continue
            avg = sum(u.weight * np.asarray(u.params[k], np.float64) for u in updates) / sum(
                u.weight for u in updates)
            delta = avg - x
            m = (1 - aggregator.b1) * delta
            v = self.second_moment(aggregator, np.full(x.shape, aggregator.tau ** 2),
                                   delta ** 2)
            out[k] = (x + aggregator.eta * m / (np.sqrt(v) + aggregator.tau)).astype(x.dtype)
        return ParameterSet(out)


class TestFedAdam(_Adaptive):
    @pytest.fixture
    def aggregator(self):
        return FedAdam(eta=0.1)

    @staticmethod
    def second_moment(aggregator, v, d2):
        return aggregator.b2 * v + (1 - aggregator.b2) * d2


class TestFedYogi(_Adaptive):
    @pytest.fixture
    def aggregator(self):
        return FedYogi(eta=0.1)

    @staticmethod
    def second_moment(aggregator, v, d2):
        return v - (1 - aggregator.b2) * d2 * np.sign(v - d2)


class TestFedAdagrad(_Adaptive):
    @pytest.fixture
    def aggregator(self):
        return FedAdagrad(eta=0.1)

    @staticmethod
    def second_moment(aggregator, v, d2):
        return v + d2


class TestMedian(AggregatorConformance):
    @pytest.fixture
    def aggregator(self):
        return Median()

    def reference(self, aggregator, global_params, updates):
        return _coordinatewise(global_params, updates, lambda s: s[len(updates) // 2])


class TestTrimmedMean(AggregatorConformance):
    @pytest.fixture
    def aggregator(self):
        return TrimmedMean(beta=0.2)  # 5 nodes: the largest and the smallest value go

    def reference(self, aggregator, global_params, updates):
        return _coordinatewise(global_params, updates, lambda s: s[1:-1].mean(axis=0))


class TestKrum(AggregatorConformance):
    @pytest.fixture
    def aggregator(self):
        return Krum(f=1)

    def reference(self, aggregator, global_params, updates):
        floats = [np.concatenate([np.asarray(u.params[k], np.float64).ravel()
                                  for k, v in global_params.items() if v.dtype.kind == "f"])
                  for u in updates]
        n, f = len(updates), aggregator.f
        scores = [sorted(float(np.sum((a - b) ** 2)) for j, b in enumerate(floats) if j != i)
                  [:n - f - 2] for i, a in enumerate(floats)]
        best = updates[int(np.argmin([sum(s) for s in scores]))]
        return ParameterSet((k, np.asarray(best.params[k])) for k in global_params)


class TestCentralDP(AggregatorConformance):
    @pytest.fixture
    def aggregator(self):
        return CentralDP(clip=1.0, noise_multiplier=0.5, seed=0)

    @pytest.mark.xfail(reason="Gaussian noise: the result is the clipped mean only in "
                       "expectation", strict=True)
    def test_result_equals_the_reference(self, aggregator):
        super().test_result_equals_the_reference(aggregator)

    @pytest.mark.xfail(reason="nodes have equal weights under central DP (sample counts "
                       "would make the sensitivity depend on the data): weights are ignored",
                       strict=True)
    def test_a_non_positive_weight_is_refused(self, aggregator):
        super().test_a_non_positive_weight_is_refused(aggregator)
