"""Training: state, step functions, the one loop, and the stage entry points."""
