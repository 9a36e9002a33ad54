"""Problem types, models, losses, linalg, the iterative loop, solvers, diagnostics."""
