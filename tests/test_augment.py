"""The batched uint8 augmentation (bireal_core/augment.py) against the PIL path, bit for bit, and
the resident loader built on it (pipeline/resident.py)."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

import bireal_core as bc
from bireal_core import augment
from bireal_core.augment import crop_flip, finish, lighting_with, normalize, pad_crop_flip, reflect_index
from bireal_core.preprocess import IMAGENET_MEAN, IMAGENET_STD, SMALL_MEAN, SMALL_STD, Lighting


def random_images(n=6, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")


def test_reflect_index_is_torchs_reflect_padding():
    assert reflect_index(4, 2).tolist() == [2, 1, 0, 1, 2, 3, 2, 1]
    x = torch.arange(7.0)[None, None]
    assert torch.equal(torch.nn.functional.pad(x, (3, 3), mode="reflect")[0, 0], x[0, 0, reflect_index(7, 3)])
    with pytest.raises(ValueError, match="reflect padding 4"):
        reflect_index(4, 4)


def test_crop_and_flip_equal_torchvisions_on_each_image():
    """The CIFAR recipe's crop of the reflect-padded image and its mirror, as torchvision's
    RandomCrop(32, padding=4, padding_mode="reflect") + RandomHorizontalFlip cut them, for every
    offset the batch drew."""
    images = random_images(16)
    top, left = torch.randint(0, 9, (16,)), torch.randint(0, 9, (16,))
    flip = torch.arange(16) % 2 == 0
    out = crop_flip(images, top, left, flip, padding=4)
    for b in range(16):
        padded = TF.pad(to_pil(images[b]), 4, padding_mode="reflect")
        expected = TF.crop(padded, int(top[b]), int(left[b]), 32, 32)
        if flip[b]:
            expected = TF.hflip(expected)
        assert torch.equal(out[b], torch.from_numpy(np.array(expected)).permute(2, 0, 1)), b


def test_a_seed_gives_the_same_draws_and_both_outcomes():
    images = random_images(64)
    a = pad_crop_flip(images, torch.Generator().manual_seed(5))
    b = pad_crop_flip(images, torch.Generator().manual_seed(5))
    c = pad_crop_flip(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == images.shape
    unchanged = [torch.equal(a[i], images[i]) for i in range(64)]  # offset (4, 4) without flip: 1/162
    assert sum(unchanged) < 8


@pytest.mark.parametrize("mean,std", [(SMALL_MEAN, SMALL_STD), (IMAGENET_MEAN, IMAGENET_STD)])
def test_normalize_is_totensor_then_normalize_bit_for_bit(mean, std):
    images = random_images(4, size=24)
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    out = normalize(images, mean, std)
    for b in range(4):
        assert torch.equal(out[b], reference(to_pil(images[b])))


def test_lighting_is_the_pil_paths_clamp_and_truncation_bit_for_bit():
    images = random_images(5)
    images[0] = 0  # the clamp at both ends
    images[1] = 255
    alpha = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)) * 3.0  # large: many pixels clamp
    out = lighting_with(images, alpha)
    for b in range(5):
        expected = np.asarray(Lighting.apply(to_pil(images[b]), alpha[b]))
        assert torch.equal(out[b], torch.from_numpy(expected).permute(2, 0, 1)), b
    assert not torch.equal(out, images)


def test_finish_is_lighting_then_normalize_bit_for_bit():
    """The loaders' one-buffer finish against its two steps, clamps at both ends included."""
    images = random_images(4, size=16)
    images[0], images[1] = 0, 255
    alpha = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)) * 3.0
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    assert torch.equal(finish(images, mean, std, alpha), normalize(lighting_with(images, alpha), mean, std))
    assert torch.equal(finish(images, mean, std), normalize(images, mean, std))


# ---------------------------------------------------------------------------- the resident loader


def indexed_split(n: int):
    """Image i is constant i: crops, flips and reflections leave it constant, so a batch names its
    samples after augmentation."""
    from pipeline.resident import ResidentSplit

    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 8, 8).contiguous()
    return ResidentSplit(images, torch.arange(n))


def sample_ids(images: torch.Tensor, mean, std) -> list[int]:
    return (images[:, 0, 0, 0] * std[0] + mean[0]).mul(255).round().long().tolist()


def test_resident_batches_split_an_epoch_exactly_across_ranks():
    from pipeline.resident import eval_batches, train_batches

    config = {"size": 8, "resize": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "augment": "small"}
    data = indexed_split(203)
    seen = []
    for rank in range(2):
        batches, steps, left_out = train_batches(data, config, 16, rank=rank, world_size=2, seed=1, epoch=3)
        got = [(sample_ids(x, config["mean"], config["std"]), y.tolist()) for x, y in batches]
        assert steps == 101 // 16 == len(got) and left_out == 203 - 2 * 6 * 16
        for ids, labels in got:
            assert ids == labels and len(ids) == 16  # images and labels stay paired through the crop
            seen += ids
    assert len(seen) == len(set(seen)) == 192  # each sample at most once per epoch
    again, _, _ = train_batches(data, config, 16, rank=0, world_size=2, seed=1, epoch=3)
    other, _, _ = train_batches(data, config, 16, rank=0, world_size=2, seed=1, epoch=4)
    first = next(again)[1].tolist()
    assert first == seen[:16] and next(other)[1].tolist() != first  # per (seed, epoch)
    evaluated = [y for rank in range(3) for _, labels in eval_batches(data, config, 50, rank=rank, world_size=3)
                 for y in labels.tolist()]  # fmt: skip
    assert sorted(evaluated) == list(range(203))


def test_resident_split_equals_the_streaming_loaders_images(demo_shards):
    """Decoded once and normalized on the device: the same tensors the PIL evaluation path makes."""
    from pipeline.data import make_loader, read_manifest
    from pipeline.resident import decode_split, eval_batches

    manifest = read_manifest(str(demo_shards))
    config = bc.default_input_config("small")
    data = decode_split(str(demo_shards), manifest, "test", 32, torch.device("cpu"))
    assert data.images.shape == (360, 3, 32, 32) and data.images.dtype == torch.uint8
    streamed, _ = make_loader(str(demo_shards), "test", config, 360, train=False, workers=0, manifest=manifest)
    (images, labels), (r_images, r_labels) = next(streamed), next(eval_batches(data, config, 360))
    assert torch.equal(labels, r_labels) and torch.equal(images, r_images)


def test_resident_refuses_what_it_cannot_hold(demo_shards):
    from pipeline.data import read_manifest
    from pipeline.resident import MAX_BYTES, check_resident, decode_split

    with pytest.raises(ValueError, match="use loader: stream"):
        check_resident(bc.default_input_config("imagenet"), "/data/imagenet-shards")
    manifest = read_manifest(str(demo_shards))
    with pytest.raises(ValueError, match="is 16x16|not the input size"):
        decode_split(str(demo_shards), manifest, "test", 16, torch.device("cpu"))
    huge = int((MAX_BYTES / (3 * 32 * 32)) ** 0.5) * 40  # a side whose split would not fit
    with pytest.raises(ValueError, match="GiB as uint8"):
        decode_split(str(demo_shards), manifest, "train", huge, torch.device("cpu"))


def test_the_device_recipes_draw_torchvisions_crop_boxes():
    """RandomResizedCrop's and RandomCrop's boxes, drawn from a generator, are the ones torchvision
    draws from the global generator at the same seed: the device path's recipe is torchvision's."""
    from torchvision import transforms as T

    sizes = [(375, 500), (500, 333), (64, 900), (900, 64), (224, 224), (300, 1000)] * 20
    ours = augment.random_resized_boxes(sizes, torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    theirs = [T.RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3]) for h, w in sizes]
    assert ours == [tuple(b) for b in theirs]
    assert any(b[2:] == (h, w) or b[2] < h for b, (h, w) in zip(ours, sizes))
    big = [s for s in sizes if min(s) >= 224]
    ours = augment.random_crop_boxes(big, 224, torch.Generator().manual_seed(6))
    torch.manual_seed(6)
    assert ours == [tuple(T.RandomCrop.get_params(torch.empty(3, h, w), (224, 224))) for h, w in big]
    with pytest.raises(ValueError, match="needs an image at least that large, got 64x900"):
        augment.random_crop_boxes([(64, 900)], 224, torch.Generator())


def test_resize_and_centre_crop_match_torchvisions_sizes_and_pixels():
    """resize_shorter + center_box give torchvision's Resize(int) + CenterCrop on uint8 tensors
    within one level of 255 (both resample bilinearly with antialiasing, float vs uint8 kernels)."""
    from torchvision.transforms import v2

    image = torch.randint(0, 256, (3, 90, 121), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for side, crop in ((256, 224), (64, 56), (32, 32)):
        shown = augment.resize_shorter(image, side)
        ours = augment.resized_crop(shown, augment.center_box(*shown.shape[-2:], crop), crop)
        theirs = v2.CenterCrop(crop)(v2.Resize(side, antialias=True)(image))
        assert ours.shape == theirs.shape == (3, crop, crop) and ours.dtype == torch.uint8
        assert (ours.int() - theirs.int()).abs().max() <= 1
    flipped = augment.flip_where(image[None].repeat(2, 1, 1, 1), torch.tensor([True, False]))
    assert torch.equal(flipped[0], image.flip(-1)) and torch.equal(flipped[1], image)
