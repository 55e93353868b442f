"""Every built-in secure-aggregation scheme runs fedcore.testing's conformance suite."""

from __future__ import annotations

import pytest

from fedcore.secagg import JoyeLibert, NodeFloors, PairwiseMasking, PlainAggregation
from fedcore.testing.secagg import SecureAggregationConformance


class TestPlainAggregation(SecureAggregationConformance):
    @pytest.fixture
    def scheme(self):
        return PlainAggregation()


class TestPairwiseMasking(SecureAggregationConformance):
    @pytest.fixture
    def scheme(self):
        return PairwiseMasking()


class TestPairwiseMaskingWithThreshold(SecureAggregationConformance):
    n_nodes = 5

    @pytest.fixture
    def scheme(self):
        return PairwiseMasking(threshold=3, clip=8.0)


class TestJoyeLibert(SecureAggregationConformance):
    # seconds per ciphertext at real key sizes: a 256-bit key (tests only) and tiny updates
    n_nodes, size = 3, 4
    floors = NodeFloors(min_key_bits=256)  # a node's default refuses keys below 2048 bits

    @pytest.fixture
    def scheme(self):
        return JoyeLibert(key_size=256, clip=8.0)
