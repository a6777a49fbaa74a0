"""pipeline: the stages of the bireal pipeline as plain typed functions, and their adapters.

Heavy packages (ray, mlflow, prefect, dvc) are imported inside the functions that need them:
the GPU machines have torch but none of those.
"""
