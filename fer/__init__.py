"""fer: facial-expression recognition on FER2013 with JAX, Flax, Optax and Orbax."""
