"""Pure solvers: the optimal-brain-surgeon column sweep and the grids it rounds onto."""
