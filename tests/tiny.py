"""Settings shared by the tests that run a GPU script's whole run on the CPU at a tiny size."""


def tiny_train(shards, out) -> dict:
    """The train section: Bi-Real-18 at width 0.25 with the small stem on the demo set, 2 steps an
    epoch, no loader workers."""
    return {
        "arch": "bireal18",
        "stem": "small",
        "width": 0.25,
        "shards": str(shards),
        "out": str(out),
        "batch_size": 32,
        "loader_workers": 0,
        "max_steps_per_epoch": 2,
    }
