"""The model's dense layers: found in the graph, split into problems, written back."""
