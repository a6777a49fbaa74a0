"""pipeline: the stages of the bireal pipeline as plain typed functions, and their adapters.

Layers, top to bottom; a module imports only its own layer or the ones below it, lazy imports
included (tests/test_import_layers.py checks every import and that there is no circle):

1. entry points -- ``cli`` (``bireal``), ``flow`` (Prefect), ``serve_flow`` (its deployment);
2. ``stages`` -- one typed function per stage and ``STAGE_TABLE``, the one description of the graph;
3. ``adapters/`` -- Ray Train, Ray Tune, MLflow tracking, the MLflow registry and pyfunc;
4. plain modules -- ``train`` (the loop), ``data``, ``decode``, ``shard``, ``sources``, ``tune`` (its table),
   ``evaluate``, ``demo``, ``data_bench``;
5. ``params`` -- the typed sections, read and validated once (no torch, no ray/mlflow);
   and ``env`` (offline defaults) under everything.

Heavy packages (ray, mlflow, prefect, dvc) are imported inside the functions that need them: the
core (``bireal_core``, ``cuda_ext``, ``bireal predict``) installs and runs without them.
"""
