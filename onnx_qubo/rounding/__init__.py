"""Rounding: a layer's scales and QUBO, the solvers, and where the solving runs."""
