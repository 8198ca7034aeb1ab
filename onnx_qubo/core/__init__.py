"""The vocabulary every layer shares: errors, options, grids and codes, layer records, reports."""
