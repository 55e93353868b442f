"""Shared test support: helpers that more than one test module uses, defined once here.

Test modules import them as ``from tests._support.net import free_port``; no test module
imports another test module.
"""
