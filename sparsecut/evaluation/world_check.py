"""Does a picture look like the model's training world? An out-of-distribution score on the vision encoder.

A model trained on one synthetic world (the default model: ShapesWorld scenes of simple coloured shapes)
answers every picture as if it were such a scene: asked "Is there a person?" about a photo of a cat, it says
yes. This module tells when that is happening. Each image is summarised by the mean and the standard
deviation, over its patch tokens, of one encoder layer's features on the low-res view: (2 * d,). A Gaussian
fitted to the summaries of training-world images gives each new image a Mahalanobis distance; an image
further than `threshold` is outside the world. The threshold is a quantile of the distances of held-out
images of the same world, so the share of in-world pictures flagged is chosen, not hoped for; pictures of
the real world are never used to fit or calibrate it.

    check = WorldCheck.fit(model, processor, train_images, calibration_images, quantile=0.995)
    check.save("weights/world_check.safetensors")
    WorldCheck.load("weights/world_check.safetensors").is_outside(model, processor, image)
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..vision import encode_layers

FILE_NAME = "world_check.safetensors"


@torch.no_grad()
def image_summaries(model, processor, images: Sequence, layer: int = -1, batch_size: int = 32) -> torch.Tensor:
    """Images -> (n, 2 * d) float64: the mean and standard deviation over patch tokens of hidden-state
    `layer` of the encoder, on each image's low-res view."""
    config = model.config
    out = []
    for start in range(0, len(images), batch_size):
        pixel_values = processor.preprocess_images(list(images[start : start + batch_size]))[:, 0]  # (b, 3, H, W)
        pixel_values = pixel_values.to(model.vision_tower.device, model.vision_tower.dtype)
        states = encode_layers(model.vision_tower, pixel_values, [layer], config.patches_per_side**2)[0]  # (b, P, d)
        states = states.double()
        out.append(torch.cat([states.mean(1), states.std(1)], dim=-1).cpu())
    return torch.cat(out)


@dataclass
class WorldCheck:
    """A Gaussian over in-world image summaries and the distance beyond which an image is outside."""

    mean: torch.Tensor
    """(2d,) mean of the in-world summaries."""
    precision: torch.Tensor
    """(2d, 2d) inverse of their (shrunk) covariance."""
    threshold: float
    """Mahalanobis distance above which an image is outside the world."""
    layer: int = -1
    """Encoder hidden-state index the summaries are taken from."""
    world: str = "the images it was trained on"
    """What the in-world images are, in words for a user ("ShapesWorld scenes of simple coloured shapes")."""

    def notice(self) -> str:
        """What to tell a user about a picture outside the world."""
        return (
            f"This model was trained only on {self.world}, and this picture does not look like one, "
            "so its answers about it would be guesses."
        )

    @classmethod
    def fit(
        cls,
        model,
        processor,
        images: Sequence,
        calibration_images: Sequence,
        quantile: float = 0.995,
        layer: int = -1,
        shrinkage: float = 0.05,
        world: str = "the images it was trained on",
    ) -> WorldCheck:
        """Fit the Gaussian on `images` and set the threshold at `quantile` of the distances of
        `calibration_images` (other in-world images: a held-out split, never the ones the model is scored on).
        `shrinkage` pulls the covariance towards its diagonal, so a few hundred images fit a 2d-dimensional
        Gaussian without a singular covariance."""
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile is a share in (0, 1], got {quantile}.")
        summaries = image_summaries(model, processor, images, layer)
        if len(summaries) <= summaries.shape[1] // 4:
            raise ValueError(f"{len(summaries)} images are too few to fit {summaries.shape[1]} dimensions.")
        mean = summaries.mean(0)
        covariance = torch.cov(summaries.T)
        covariance = (1 - shrinkage) * covariance + shrinkage * torch.diag(torch.diagonal(covariance))
        precision = torch.linalg.pinv(covariance, hermitian=True)
        check = cls(mean, precision, threshold=float("inf"), layer=layer, world=world)
        distances = check.distances(model, processor, calibration_images)
        check.threshold = float(np.quantile(distances, quantile))
        return check

    def distances(self, model, processor, images: Sequence) -> np.ndarray:
        """(n,) Mahalanobis distance of each image's summary from the in-world mean."""
        centred = image_summaries(model, processor, images, self.layer) - self.mean
        return torch.einsum("nd,de,ne->n", centred, self.precision, centred).clamp_min(0).sqrt().numpy()

    def is_outside(self, model, processor, image) -> bool:
        """Whether one image lies beyond the threshold."""
        return bool(self.distances(model, processor, [image])[0] > self.threshold)

    def save(self, path: str | Path) -> None:
        metadata = {"threshold": json.dumps(self.threshold), "layer": str(self.layer), "world": self.world}
        save_file({"mean": self.mean, "precision": self.precision.contiguous()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> WorldCheck:
        from safetensors import safe_open

        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        return cls(
            tensors["mean"],
            tensors["precision"],
            float(json.loads(metadata["threshold"])),
            int(metadata["layer"]),
            metadata.get("world", cls.world),
        )

    @classmethod
    def for_model(cls, checkpoint: str | Path) -> WorldCheck | None:
        """The check saved beside a checkpoint (`checkpoint/world_check.safetensors`), or None."""
        path = Path(checkpoint) / FILE_NAME
        return cls.load(path) if path.is_file() else None


# Real photos bundled with scikit-image and scikit-learn (dev dependencies): never used to fit or calibrate.
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "moon",
    "cat",
    "immunohistochemistry",
    "retina",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def real_photos() -> dict[str, np.ndarray]:
    """The bundled real photos by name, as RGB uint8 arrays (needs scikit-image and scikit-learn)."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise ImportError("Real photos come from scikit-image and scikit-learn: pip install -e '.[dev]'") from error
    photos = {}
    for name in SKIMAGE_PHOTOS:
        image = getattr(skimage.data, name)()
        photos[name] = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
    samples = load_sample_images()
    photos |= {
        name: image for name, image in zip(samples.filenames, samples.images) if Path(name).name in SKLEARN_PHOTOS
    }
    return {Path(name).stem: image for name, image in photos.items()}


def fit_for_checkpoint(
    model: str | None,
    images: str,
    calibration_images: str,
    world: str,
    quantile: float = 0.995,
    out: str | None = None,
) -> Path:
    """Command-line entry point: fit a check for a checkpoint (None: the default model) on the images matching
    the glob `images`, calibrate it on `calibration_images`, save it beside the checkpoint (or to `out`)."""
    from ..build import DEFAULT_WEIGHTS, load_model

    loaded, processor = load_model(model, device="cpu")
    fitted, calibration = sorted(glob.glob(images)), sorted(glob.glob(calibration_images))
    if not fitted or not calibration:
        raise FileNotFoundError(f"No images match {images if not fitted else calibration_images!r}.")
    check = WorldCheck.fit(loaded, processor, fitted, calibration, quantile=quantile, world=world)
    path = Path(out) if out else Path(model or DEFAULT_WEIGHTS) / FILE_NAME
    check.save(path)
    return path


def report(model: str | None, in_world_images: str) -> dict:
    """Command-line entry point: the share of in-world images (a glob; a split never used to fit or calibrate)
    that the checkpoint's check flags, and the distance and verdict for each bundled real photo."""
    from ..build import DEFAULT_WEIGHTS, load_model

    loaded, processor = load_model(model, device="cpu")
    check = WorldCheck.for_model(model or DEFAULT_WEIGHTS)
    if check is None:
        raise FileNotFoundError(f"{model or DEFAULT_WEIGHTS} has no {FILE_NAME}; fit one first.")
    in_world = check.distances(loaded, processor, sorted(glob.glob(in_world_images)))
    photos = real_photos()
    distances = check.distances(loaded, processor, list(photos.values()))
    return {
        "threshold": check.threshold,
        "in_world": {"n": len(in_world), "flagged": int((in_world > check.threshold).sum())},
        "photos": {
            name: {"distance": float(d), "flagged": bool(d > check.threshold)} for name, d in zip(photos, distances)
        },
    }
