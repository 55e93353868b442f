"""Conformance suites that every plug-in of an extension point runs (a pytest toolkit).

Import the suite of your extension point in a test module and subclass it::

    from fedcore.testing.transport import Endpoints, TransportConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        def endpoints(self):
            return Endpoints.same("mine://localhost:9999")

``fedcore.testing`` needs pytest; ``import fedcore`` never imports it.
"""
