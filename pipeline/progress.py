"""A progress bar in images for the commands that read many of them (``bireal shard``, ``bireal
evaluate``), or one that shows nothing where no one is watching (the stage table under ``dvc repro``
and the flow, the GPU scripts: tqdm is in the pipeline extra only)."""

from __future__ import annotations


class NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def image_bar(desc: str, total: int, done: int = 0, enabled: bool = True):
    """A tqdm bar of ``total`` images (``done`` of them already) on stderr, or ``NoBar``."""
    if not enabled:
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="img", desc=desc, dynamic_ncols=True, smoothing=0.1)
