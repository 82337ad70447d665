"""Pure-torch references: the truth every compiled backend is tested against.

They are written for clarity, follow the math literally, and run in float64 when given float64.
"""
