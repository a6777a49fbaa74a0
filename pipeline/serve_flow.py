"""The deployment: serve ``bireal-pipeline`` to a Prefect server as deployment ``demo``.

prefect server start --host 127.0.0.1 --port 4200          # local SQLite under $PREFECT_HOME
PREFECT_API_URL=http://127.0.0.1:4200/api python -m pipeline.serve_flow
PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'bireal-pipeline/demo' --watch
"""

from __future__ import annotations

from .env import apply_offline_defaults


def main() -> None:
    apply_offline_defaults()
    from .flow import bireal_pipeline

    bireal_pipeline.serve(
        name="demo",
        parameters={"params_path": "params.yaml", "use_ray": True},
        description="the Bi-Real pipeline on params.yaml (demo data by default)",
    )


if __name__ == "__main__":
    main()
