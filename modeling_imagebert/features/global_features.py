"""Whole-image ("global") CNN features for the paper's ablation: ResNet-152, DenseNet-161 or GoogLeNet from
torchvision, average-pooled into one vector per image (2048 / 2208 / 1024 values), written as the schema's
`global_feature`.

Weights are never downloaded. The model is built with `weights=None` and its ImageNet state dict is read from a
local file, by default the file torchvision itself would have downloaded, in torchvision's cache:
`torch.hub.get_dir()/checkpoints/<file name>` (e.g. `~/.cache/torch/hub/checkpoints/resnet152-394f9c45.pth`).
Copy that file there from a machine with network access, or pass its path.

Preprocessing is torchvision's own for those weights (`weights.transforms()`: resize the shorter side to 256,
centre-crop 224, ImageNet mean / std).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..safe_loading import load_torch_file


@dataclass(frozen=True)
class GlobalModelSpec:
    """A torchvision classifier used as a global feature extractor."""

    name: str
    builder: str  # torchvision.models function
    weights: str  # torchvision weights enum member, "ResNet152_Weights.IMAGENET1K_V1"
    feature_dim: int


GLOBAL_MODELS = {
    "resnet152": GlobalModelSpec("resnet152", "resnet152", "ResNet152_Weights.IMAGENET1K_V1", 2048),
    "densenet161": GlobalModelSpec("densenet161", "densenet161", "DenseNet161_Weights.IMAGENET1K_V1", 2208),
    "googlenet": GlobalModelSpec("googlenet", "googlenet", "GoogLeNet_Weights.IMAGENET1K_V1", 1024),
}

# DenseNet checkpoints on download.pytorch.org predate a module rename ("norm.1" -> "norm1"); torchvision renames
# the keys the same way when it loads them.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _weights_enum(spec: GlobalModelSpec):
    import torchvision.models as models

    enum_name, member = spec.weights.split(".")
    return getattr(getattr(models, enum_name), member)


def cached_weights_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of `name` once downloaded:
    `torch.hub.get_dir()/checkpoints/<file name of the weights URL>`."""
    spec = _spec(name)
    file_name = _weights_enum(spec).url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _spec(name: str) -> GlobalModelSpec:
    if name not in GLOBAL_MODELS:
        raise ValueError(f"unknown global model {name!r}; expected one of {sorted(GLOBAL_MODELS)}")
    return GLOBAL_MODELS[name]


def _build(spec: GlobalModelSpec) -> nn.Module:
    import torchvision.models as models

    builder = getattr(models, spec.builder)
    if spec.name == "googlenet":
        # The ImageNet GoogLeNet weights come with the auxiliary heads and expect torchvision's input transform
        # (they were ported from a model trained on differently normalised inputs); torchvision builds it so.
        return builder(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    return builder(weights=None)


def _load_state_dict(path: Path, spec: GlobalModelSpec) -> dict[str, torch.Tensor]:
    state = load_torch_file(path, f"a torch state dict of {spec.name}")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: found {type(state).__name__}; expected a state dict of {spec.name}")
    if spec.name == "densenet161":
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()}
    return state


class GlobalFeatureExtractor(nn.Module):
    """A torchvision classifier without its last layer: image -> average-pooled feature vector.

    Use `from_local_weights` to build one with ImageNet weights from a local file.
    """

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        spec = _spec(name)
        self.name = name
        self.feature_dim = spec.feature_dim
        if name == "googlenet":
            model.aux_logits = False
            model.aux1 = None
            model.aux2 = None
            model.fc = nn.Identity()
        elif name == "densenet161":
            model.classifier = (
                nn.Identity()
            )  # forward ends relu -> adaptive avg pool -> flatten -> classifier
        else:
            model.fc = nn.Identity()  # forward ends avgpool -> flatten -> fc
        self.model = model.eval()
        self.transform = _weights_enum(spec).transforms()

    @classmethod
    def from_local_weights(
        cls, name: str, weights_path: str | os.PathLike | None = None
    ) -> GlobalFeatureExtractor:
        """Build `name` ("resnet152", "densenet161" or "googlenet") with its ImageNet state dict read from
        `weights_path`, or from torchvision's cache folder when None. Nothing is downloaded.

        Raises:
            FileNotFoundError: the weights file is missing; the message says where to put it and where to get it.
            ValueError: the file is not a state dict of that model (the message names missing / unexpected keys).
        """
        spec = _spec(name)
        path = Path(weights_path) if weights_path is not None else cached_weights_path(name)
        if not path.is_file():
            url = _weights_enum(spec).url
            raise FileNotFoundError(
                f"no weights for global model {name!r} at {path}; nothing is downloaded here: fetch {url} on a "
                f"machine with network access and copy it to {cached_weights_path(name)} (torchvision's cache, "
                "torch.hub.get_dir()/checkpoints) or pass its path with --global-weights"
            )
        model = _build(spec)
        state = _load_state_dict(path, spec)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensors of the wrong shape
            first = str(error).strip().splitlines()[1:2] or [str(error)]
            raise ValueError(f"{path}: not a {name} state dict: {first[0].strip()}") from None
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path}: not a {name} state dict: {len(result.missing_keys)} missing keys "
                f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected keys "
                f"(e.g. {result.unexpected_keys[:3]})"
            )
        return cls(name, model)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 arrays (H, W, 3) of any sizes -> a normalised batch (B, 3, 224, 224) float32."""
        tensors = [
            self.transform(torch.from_numpy(np.array(image, dtype=np.uint8, order="C")).permute(2, 0, 1))
            for image in images
        ]
        return torch.stack(tensors)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalised pixels -> (B, feature_dim) average-pooled features."""
        return self.model(pixel_values)

    @torch.inference_mode()
    def extract(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 arrays (H, W, 3) -> float32 (B, feature_dim), one image at a time so that a feature does not
        depend on which images share its batch (a batched convolution may pick another algorithm and round
        differently)."""
        parameter = next(self.model.parameters())
        outputs = []
        for image in images:
            pixels = self.preprocess([image]).to(device=parameter.device, dtype=parameter.dtype)
            outputs.append(self.model(pixels).float().cpu().numpy()[0])
        return np.stack(outputs) if outputs else np.zeros((0, self.feature_dim), dtype=np.float32)


__all__ = ["GLOBAL_MODELS", "GlobalFeatureExtractor", "GlobalModelSpec", "cached_weights_path"]
