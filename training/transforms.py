"""Training and evaluation presets (paper, sections 3.1 and 3.2), as small callable classes.

Pixel values stay in 0..255 until :class:`Normalize`. Random draws use torch's RNG, so the
DataLoader's per-worker seeding (and ``--seed``) makes them reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vgg.preprocessing import center_crop, resize_shortest_side, to_graph_input


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, ()).item())


class RandomIsotropicRescale:
    """Shortest side to S, with S fixed or drawn per image from [Smin, Smax] (section 3.1,
    "multi-scale training, where each training image is individually rescaled by randomly
    sampling S from a certain range [Smin, Smax]")."""

    def __init__(self, scale_min: int, scale_max: int) -> None:
        if scale_min > scale_max:
            raise ValueError(f"scale range [{scale_min}, {scale_max}] is empty")
        self.scale_min, self.scale_max = scale_min, scale_max

    def __call__(self, image: Image.Image) -> Image.Image:
        return resize_shortest_side(image, _randint(self.scale_min, self.scale_max))


class RandomCrop:
    """One ``size x size`` crop at a random position ("one crop per image per SGD iteration")."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width < self.size or height < self.size:
            raise ValueError(f"image {width}x{height} is smaller than the {self.size} crop")
        left, top = _randint(0, width - self.size), _randint(0, height - self.size)
        return image.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __init__(self, probability: float = 0.5) -> None:
        self.probability = probability

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()).item() < self.probability:
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


class RescaleCenterCrop:
    """Shortest side to ``scale``, then the central ``crop x crop`` square (no randomness)."""

    def __init__(self, scale: int, crop: int) -> None:
        self.scale, self.crop = scale, crop

    def __call__(self, image: Image.Image) -> Image.Image:
        return center_crop(resize_shortest_side(image, self.scale), self.crop)


class ToTensor:
    """PIL RGB image to a float ``[3, H, W]`` tensor in pixel units (0..255)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float()


class PCALighting:
    """AlexNet's RGB colour shift (Krizhevsky et al. 2012, section 4.1), used by the paper.

    Adds ``eigvec @ (alpha * eigval)`` to every pixel, alpha ~ N(0, std) drawn per image.
    AlexNet's constants are for pixels in 0..1; ``eigval`` here is the covariance of 0..255
    pixels (255^2 times larger), so the shift in 0..255 units is ``eigvec @ (alpha * eigval) / 255``.
    """

    def __init__(self, eigval: list[float], eigvec: list[list[float]], std: float) -> None:
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)  # columns are eigenvectors
        self.std = std

    def shift(self) -> torch.Tensor:
        """One draw of the per-image RGB shift, in pixel units."""
        alpha = torch.randn(3) * self.std
        return self.eigvec @ (alpha * self.eigval) / 255.0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return tensor
        return tensor + self.shift().view(3, 1, 1)


class Normalize:
    """Subtract the training set's mean RGB (section 2.1) and divide by its std (pixel units)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


@dataclass(frozen=True)
class Stats:
    """Training-set pixel statistics (0..255): mean, std and the RGB covariance's PCA."""

    mean: list[float]
    std: list[float]
    pca_eigval: list[float]
    pca_eigvec: list[list[float]]


def pixel_stats(images: list[Image.Image], *, pixels_per_image: int = 4096, seed: int = 0) -> Stats:
    """Mean, std and PCA (eigenvalues descending, eigenvectors as columns) of RGB pixels
    sampled from ``images`` (AlexNet: "PCA on the set of RGB pixel values")."""
    if not images:
        raise ValueError("no images to compute pixel statistics from")
    rng = np.random.default_rng(seed)
    samples = []
    for image in images:
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
        take = min(pixels_per_image, len(pixels))
        samples.append(pixels[rng.choice(len(pixels), size=take, replace=False)])
    pixels = np.concatenate(samples)
    covariance = np.cov(pixels, rowvar=False)
    eigval, eigvec = np.linalg.eigh(covariance)
    order = np.argsort(eigval)[::-1]
    return Stats(
        mean=pixels.mean(axis=0).tolist(),
        std=np.maximum(pixels.std(axis=0), 1e-3).tolist(),
        pca_eigval=np.maximum(eigval[order], 0.0).tolist(),
        pca_eigvec=eigvec[:, order].tolist(),
    )


class TrainPreset:
    """Section 3.1: rescale to S, one random crop, random flip, RGB colour shift, normalise.

    With ``augment=False`` (for tests of determinism): rescale to Smin and centre-crop.
    """

    def __init__(self, *, scale_range: tuple[int, int], crop: int, stats: Stats, pca_std: float, augment: bool) -> None:
        if augment:
            self.steps = [
                RandomIsotropicRescale(*scale_range),
                RandomCrop(crop),
                RandomHorizontalFlip(),
                ToTensor(),
                PCALighting(stats.pca_eigval, stats.pca_eigvec, pca_std),
            ]
        else:
            self.steps = [RescaleCenterCrop(scale_range[0], crop), ToTensor()]
        self.steps.append(Normalize(stats.mean, stats.std))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return image


class EvalPreset:
    """Validation input of one image at test scale Q (section 3.2): the normalised ``Q x Q``
    square ``[3, Q, Q]`` of :func:`vgg.preprocessing.to_graph_input` (the service's input);
    :mod:`vgg.protocols` cuts the protocols' crops from it."""

    def __init__(self, *, test_scale: int, stats: Stats) -> None:
        self.test_scale = test_scale
        self.to_tensor, self.normalize = ToTensor(), Normalize(stats.mean, stats.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        square = torch.from_numpy(to_graph_input(image, self.test_scale).copy()).permute(2, 0, 1).float()
        return self.normalize(square)


class DensePreset:
    """The whole image rescaled to each test scale Q (section 3.2), normalised."""

    def __init__(self, *, scales: list[int], stats: Stats) -> None:
        self.scales = scales
        self.to_tensor, self.normalize = ToTensor(), Normalize(stats.mean, stats.std)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.normalize(self.to_tensor(resize_shortest_side(image, q))) for q in self.scales]
