"""``bireal bench data``: sharding and loader throughput (one run, one table, medians of 3).

- sharding images/s with 1 and 2 processes;
- loader images/s of one loader process, the float path (normalised in the worker) against the uint8
  one (finished after collation), and with 2 DataLoader workers: our WebDataset stream vs
  torchvision ImageFolder + DataLoader, both with the same training augmentation and batch size,
  each read to the end;
- where one loader process's time goes, per image and step, on the ImageNet-size tree.
Run it on an image-folder tree (../shared/data/cifar10 here) and on an ImageNet-size tree
(``make_imagenet_like`` builds one from the two real photographs scikit-learn ships), sharded at full
size and loaded with the official recipe (RandomResizedCrop, flip, PCA lighting).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from bireal_core.preprocess import default_input_config, train_transform

from .data import make_loader
from .decode import decode_image, decode_rgb
from .shard import ShardParams, shard_dataset


def make_imagenet_like(out: Path, n: int = 2000, classes: int = 10, seed: int = 0) -> Path:
    """n JPEGs at ImageNet sizes (about 500x375) cut at random scales, positions and flips from
    scikit-learn's two sample photographs (china.jpg, flower.jpg: real 427x640 photos)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % 2]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = photo.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        split = "val" if (i // classes) % 10 == 0 else "train"  # 10% of every class to val
        d = out / split / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:05d}.jpg", quality=90)
    return out


PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400))  # (width, height): ImageNet's common shapes


def synthetic_photo(rng, width: int = 500, height: int = 375):
    """A photo-like RGB image from numpy alone: luminance with the 1/f amplitude spectrum of natural
    images (random phases), smoother colour, a few flat objects with sharp edges, and sensor-like
    grain. Saved at q90 with 4:2:0 chroma it is about 100 KB at 500x375, ImageNet's average; noise
    would be several times larger and slower to decode than the photos it stands for."""
    import numpy as np
    from PIL import Image, ImageDraw

    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0

    def field(exponent: float):  # (height, width), zero mean, amplitude ~ 1/f^exponent
        amp = f**-exponent
        amp[0, 0] = 0.0
        return np.fft.irfft2(amp * np.exp(2j * np.pi * rng.random(amp.shape)), s=(height, width))

    lum, c1, c2 = field(1.0), field(1.5), field(1.5)
    lum, c1, c2 = (x / (x.std() + 1e-9) for x in (lum, c1, c2))
    rgb = np.stack([lum + 0.4 * c1, lum - 0.2 * c1 + 0.3 * c2, lum - 0.4 * c2], -1)
    rgb = 120 + 45 * rgb + rng.normal(0, 2.0, rgb.shape)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def make_synthetic_photos(out: Path, n: int = 2000, classes: int = 10, seed: int = 0, processes: int = 1) -> Path:
    """``n`` synthetic photos (``synthetic_photo``) at ImageNet's shapes, JPEG q90 4:2:0, every
    fifth progressive, in ``out``/{train,val}/c<k>/ (10% of each class to val); numpy and PIL only,
    so the GPU machine makes its own, ``processes`` at a time."""
    import multiprocessing

    jobs = [(out, i, classes, seed) for i in range(n)]
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.starmap(_write_synthetic_photo, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_synthetic_photo(*job)
    return out


def _write_synthetic_photo(out: Path, i: int, classes: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng([seed, i])
    width, height = PHOTO_SIZES[i % len(PHOTO_SIZES)]
    split = "val" if (i // classes) % 10 == 0 else "train"
    folder = out / split / f"c{i % classes:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    synthetic_photo(rng, width, height).save(folder / f"{i:05d}.jpg", quality=90, subsampling=2, progressive=i % 5 == 0)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` while the block runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_loader(batches, device: torch.device | None = None) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for images, _ in batches:
        n += images.shape[0]
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)  # the batches' device work is part of the loader's time
    return time.perf_counter() - start, n


def bench_dataset(
    source: str,
    stem: str,
    label: str,
    resize: int,
    batch: int = 128,
    samples_per_shard: int = 2000,
    pca_lighting: bool = False,
    device: str = "cpu",
) -> list[dict]:
    """Rows of sharding ``source`` (``resize``: the shorter side, 0 keeps the size) and of loading
    its train split with the stem's training augmentation (+ PCA lighting); the uint8 batches are
    finished on ``device`` and the device-decode path decodes there (nvJPEG on a GPU)."""
    rows = []
    dev = torch.device(device)
    config = default_input_config(stem)
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            out = Path(tmp) / f"shards{procs}"
            start = time.perf_counter()
            m = shard_dataset(
                source,
                str(out),
                ShardParams(resize=resize, processes=procs, samples_per_shard=samples_per_shard),
                progress_bar=False,
            )
            seconds = time.perf_counter() - start
            total = sum(s["count"] for s in m["splits"].values())
            rows.append(
                {
                    "dataset": label,
                    "what": f"shard, {procs} process(es)",
                    "images": total,
                    "img_s": total / seconds,
                    "seconds": seconds,
                }
            )
        train_images = m["splits"]["train"]["count"]
        if train_images < 2 * batch:  # the 2-worker loaders hand each worker whole batches only
            raise ValueError(
                f"{label}: {train_images} training images, fewer than 2 batches of {batch} (one per loader "
                "worker): the loader rows would time nothing"
            )
        from torchvision.datasets import ImageFolder

        transform = train_transform(config, pca_lighting)

        def stream(run: int, workers: int, uint8: bool = True, decode: str = "worker"):
            recipe = {"train": True, "epoch": run, "pca_lighting": pca_lighting, "device": dev, "decode": decode}
            return make_loader(str(out), "train", config, batch, workers=workers, uint8=uint8, **recipe)[0]

        def folder(run: int):
            images = ImageFolder(str(Path(source) / "train"), transform=transform)
            return DataLoader(images, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)

        # "1 process": read in this process (workers=0) with one torch thread, as a DataLoader
        # worker runs: the img/s of one loader process, the float path (normalised per image in the
        # worker) against the uint8 one (finished after collation, here on ``device``)
        loaders = {
            "load webdataset float, 1 process": lambda run: stream(run, 0, uint8=False),
            "load webdataset uint8, 1 process": lambda run: stream(run, 0),
            "load webdataset uint8, 2 workers": lambda run: stream(run, 2),
            f"load webdataset decode on {dev.type}, 1 process": lambda run: stream(run, 0, decode="device"),
            "load imagefolder, 2 workers": folder,
        }
        runs: dict[str, list] = {}
        for run in range(3):  # the candidates interleaved: a noisy moment hits each alike
            for what, make in loaders.items():
                with torch_threads(1 if what.endswith("1 process") else torch.get_num_threads()):
                    runs.setdefault(what, []).append(_time_loader(make(run), dev))
        for what, timed in runs.items():
            seconds, images = statistics.median(s for s, _ in timed), timed[0][1]
            rows.append(
                {"dataset": label, "what": what, "images": images, "img_s": images / seconds, "seconds": seconds},
            )
        rows += loader_ratios(rows, label, dev.type)
    return rows


def loader_ratios(rows: list[dict], label: str, device: str) -> list[dict]:
    """The uint8 path's and the device-decode path's img/s over the float path's, one loader
    process each, same run."""
    rate = {r["what"]: r["img_s"] for r in rows if r["dataset"] == label}
    float_rate = rate["load webdataset float, 1 process"]
    return [
        {
            "dataset": label,
            "what": "uint8 / float, 1 process",
            "ratio": rate["load webdataset uint8, 1 process"] / float_rate,
        },
        {
            "dataset": label,
            "what": f"decode on {device} / float, 1 process",
            "ratio": rate[f"load webdataset decode on {device}, 1 process"] / float_rate,
        },
    ]


def step_rows(source: Path, label: str, input_config: dict, images: int = 256, batch: int = 32) -> list[dict]:
    """Where one loader process's time goes, per image, in ms (median of 3 passes over ``images``
    JPEGs of ``source``/train, already read into memory, one torch thread as in a DataLoader
    worker): the float path's steps (PIL decode, RandomResizedCrop + flip, Lighting + ToTensor +
    Normalize per image) and the uint8 path's (torchvision decode, ``ImageRecipe``'s crop, resize,
    flip and draws, and the batched ``augment.finish`` on ``batch`` images)."""
    from torchvision import transforms as T

    from bireal_core.augment import ImageRecipe, finish
    from bireal_core.preprocess import Lighting, train_crop_flip

    jpegs = [f.read_bytes() for f in sorted((source / "train").rglob("*.jpg"))[:images]]
    crop, flip = train_crop_flip(input_config)
    to_float = T.Compose([Lighting(0.1), T.ToTensor(), T.Normalize(input_config["mean"], input_config["std"])])
    recipe = ImageRecipe(input_config, train=True, pca_lighting=True)
    mean, std = input_config["mean"], input_config["std"]

    decoded = [decode_rgb(d) for d in jpegs]
    cropped = [flip(crop(im)) for im in decoded]
    tensors = [decode_image(d) for d in jpegs]
    uint8, alpha = (torch.stack(t) for t in zip(*(recipe(t) for t in tensors)))
    steps = {
        "float path: decode (PIL)": lambda: [decode_rgb(d) for d in jpegs],
        "float path: RandomResizedCrop + flip (PIL)": lambda: [flip(crop(im)) for im in decoded],
        "float path: lighting + normalise, per image": lambda: [to_float(im) for im in cropped],
        "uint8 path: decode (torchvision)": lambda: [decode_image(d) for d in jpegs],
        "uint8 path: crop + resize + flip (torch)": lambda: [recipe(t) for t in tensors],
        "uint8 path: finish, batched": lambda: [
            finish(uint8[i : i + batch], mean, std, alpha[i : i + batch]) for i in range(0, len(uint8), batch)
        ],
    }
    rows = []
    with torch_threads(1):
        for what, step in steps.items():
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                step()
                seconds.append(time.perf_counter() - start)
            ms = statistics.median(seconds) / len(jpegs) * 1e3
            rows.append({"dataset": label, "what": f"step: {what}", "ms": ms})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'dataset':<28}{'what':<50}{'images':>9}{'img/s':>10}{'s':>8}"]
    for r in rows:
        if "ratio" in r:
            lines.append(f"{r['dataset']:<28}{r['what']:<50}{'':>9}{r['ratio']:>9.2f}x")
        elif "ms" in r:
            lines.append(f"{r['dataset']:<28}{r['what']:<50}{'':>9}{r['ms']:>7.3f} ms/img")
        else:
            lines.append(f"{r['dataset']:<28}{r['what']:<50}{r['images']:>9,}{r['img_s']:>10,.0f}{r['seconds']:>8.1f}")
    return "\n".join(lines)


def run(cifar: str | None, imagenet_like: int = 2000, device: str = "cpu") -> list[dict]:
    torch.set_num_threads(2)
    rows = []
    if cifar:
        rows += bench_dataset(cifar, "small", "cifar10 (32x32)", resize=0, device=device)
    if imagenet_like:
        with tempfile.TemporaryDirectory() as tmp:
            src = make_imagenet_like(Path(tmp) / "src", imagenet_like)
            rows += bench_dataset(
                str(src),
                "imagenet",
                f"photo crops 500x375 ({imagenet_like})",
                resize=0,  # full size, as the RandomResizedCrop profiles shard
                batch=32,
                samples_per_shard=100,
                pca_lighting=True,  # the official recipe's
                device=device,
            )
            rows += step_rows(src, f"photo crops 500x375 ({imagenet_like})", default_input_config("imagenet"))
    print(format_rows(rows))
    return rows
