"""Baseline implicit models for pcdeq-plugin: NODE, ANODE, an unconstrained TorchDEQ model,
monDEQ and SubDEQ.

They reach the registries through the ``pcdeq`` entry-point group (see ``plugin.py``),
exactly like a third-party plugin.
"""
