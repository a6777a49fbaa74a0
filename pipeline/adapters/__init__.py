"""Adapters: thin layers between the stages and Ray Train, Ray Tune and MLflow (tracking, the
registry, the pyfunc). Each imports its framework inside its functions where it can."""
