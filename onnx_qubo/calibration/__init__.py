"""Calibration: the data a run reads and the input statistics each layer's QUBO needs."""
