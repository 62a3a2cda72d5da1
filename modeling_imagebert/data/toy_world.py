"""The toy world: a deterministic synthetic image-text corpus in the dataset schema.

A "world" (`ToyWorld`) fixes a vocabulary of K object classes and A attributes, each a single uncased WordPiece
token, and one seeded prototype feature vector per class, per attribute and per background kind. A corpus
(`make_toy_world`) samples scenes in that world: each image holds 2-4 objects (distinct classes, one attribute
each) in pixel boxes inside a random image size. A simulated detector returns 3-6 jittered boxes per object and a
few background boxes; a region's feature is its object's class prototype plus attribute prototype, blended with
background in proportion to how loose the box is, plus Gaussian noise. Its detector class is the object's class
(with a small chance of confusion) or the background class `K`, and its score falls as the box loosens. Captions
are short English sentences built only from single-token BERT words, naming the objects with their attributes and
left/right relations that follow the boxes.

Variants:

- ``"curated"`` (like Conceptual Captions / SBU): every caption describes its image.
- ``"web"`` (like LAIT): a fraction `unrelated_fraction` of captions does not describe the image (it describes
  another scene, or is only web spam); a further fraction `spam_fraction` of the faithful captions is padded with
  spam words.
- ``"retrieval"`` (like Karpathy's Flickr30k/COCO splits): a `DatasetDict` with train/validation/test splits on
  disjoint images, `captions_per_image` (default 5) different faithful captions per image, one row per caption.

The world depends only on `world_seed` and the sizes, never on the variant or `seed`, so the stage-1 web corpus,
the stage-2 curated corpus and the retrieval splits made with the same `world_seed` describe the same world; `seed`
samples the scenes (different seeds, variants and splits give different images). Image ids are
``"{variant}[-{split}]-s{seed}-{index:06d}"``, so corpora never collide.

Region class ids lie in ``[0, num_classes]``: the object classes are ``0 .. num_classes - 1`` and
``num_classes`` is the background class, so a model pre-trained with MOC on the toy world needs
``num_object_classes = ToyWorld.num_region_classes = num_classes + 1``.
"""

import json
import re
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from datasets import Dataset, DatasetDict, DatasetInfo

from .schema import image_text_features

# Each word below is one token of the uncased BERT WordPiece vocabulary (tests check it with the real tokenizer).
CLASS_NAMES = (
    "dog", "cat", "car", "tree", "horse", "bird", "boat", "bus", "man", "woman", "child", "ball",
    "chair", "table", "cup", "bottle", "book", "phone", "bag", "hat", "house", "train", "sheep", "cow",
    "flower", "shoe", "clock", "lamp", "door", "window", "truck", "plane", "kite", "umbrella", "bench",
    "pizza", "apple", "banana", "bear", "elephant",
)  # fmt: skip
ATTRIBUTE_NAMES = (
    "red", "blue", "small", "big", "green", "black", "white", "yellow", "old", "young", "brown", "pink",
    "orange", "wooden", "shiny", "dark",
)  # fmt: skip
# Attributes that also change the size of the object's box.
_SIZE_FACTORS = {"small": 0.6, "big": 1.5, "tiny": 0.45, "large": 1.4}
BACKGROUND_NAME = "background"
TEMPLATE_WORDS = (
    "a", "an", "photo", "of", "there", "is", "next", "to", "on", "the", "left", "right", "picture", "with",
    "and", "in", "image", ",", ".",
)  # fmt: skip
SPAM_PHRASES = (
    "click here", "free download", "best price", "buy now", "cheap sale", "free shipping", "online deals",
    "home page", "view more", "share this", "posted by", "shop online", "discount offer", "win a prize",
)  # fmt: skip
# The words only spam uses (not "a").
SPAM_WORDS = tuple(sorted({word for phrase in SPAM_PHRASES for word in phrase.split()} - set(TEMPLATE_WORDS)))

VARIANTS = ("curated", "web", "retrieval")

# The toy world of the built-in demo (configuration/pretraining/demo.yaml), as `make_toy_world` arguments. The
# scripts' `--toy` defaults come from here, so `run_retrieval.py --toy` and `evaluate_retrieval.py --toy` score the
# world the demo pre-trained on; the recipe repeats the values and tests/test_script_agreement.py fails if they drift.
DEMO_TOY_WORLD = MappingProxyType(
    {"world_seed": 0, "feature_dim": 64, "num_classes": 12, "num_attributes": 8, "noise": 1.0}
)
# The demo's zero-shot test split: `make_toy_world("retrieval", seed=3, num_test_images=25, **DEMO_TOY_WORLD)["test"]`.
DEMO_TOY_TEST_SPLIT = MappingProxyType({"seed": 3, "num_test_images": 25})
RETRIEVAL_SPLITS = ("train", "validation", "test")

_NUM_BACKGROUND_KINDS = 4
_MAX_OBJECTS = 4
# Relative scale of the attribute prototype in an object's feature (the class dominates).
_ATTRIBUTE_SCALE = 0.6
# Caption template ids: the first five are list templates, the last three relate two objects.
_LIST_TEMPLATES = ("a photo of {} .", "there is {} .", "{} .", "{} in the image .", "an image of {} .")
_WITH_TEMPLATE, _NEXT_TO_TEMPLATE, _SIDE_TEMPLATE = 5, 6, 7
_NUM_TEMPLATES = 8


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _stream(*key: int) -> np.random.Generator:
    """An independent generator per key, so adding a split or variant never shifts another's samples."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


@dataclass(frozen=True)
class ToyWorld:
    """The vocabulary and prototypes of a toy world.

    Attributes:
        class_names: the K object class words; class id k is `class_names[k]`.
        attribute_names: the A attribute words.
        class_prototypes: float32 [K, F], one feature prototype per object class.
        attribute_prototypes: float32 [A, F], added (scaled by 0.6) to an object's class prototype.
        background_prototypes: float32 [B, F], the kinds of background (all labelled with class id K).
        noise: standard deviation of the Gaussian noise added to every feature component.
        seed: the `world_seed` it was built from.
    """

    class_names: tuple[str, ...]
    attribute_names: tuple[str, ...]
    class_prototypes: np.ndarray = field(repr=False)
    attribute_prototypes: np.ndarray = field(repr=False)
    background_prototypes: np.ndarray = field(repr=False)
    noise: float
    seed: int

    @classmethod
    def create(
        cls,
        *,
        seed: int = 0,
        feature_dim: int = 64,
        num_classes: int = 24,
        num_attributes: int = 8,
        noise: float = 1.5,
    ) -> "ToyWorld":
        """Builds the world for `seed`: the first `num_classes` words of `CLASS_NAMES`, the first `num_attributes` of
        `ATTRIBUTE_NAMES`, and standard normal prototypes of dimension `feature_dim`."""
        seed = _check_int("world_seed", seed, 0)
        feature_dim = _check_int("feature_dim", feature_dim, 2)
        num_classes = _check_int("num_classes", num_classes, _MAX_OBJECTS + 2, len(CLASS_NAMES))
        num_attributes = _check_int("num_attributes", num_attributes, 1, len(ATTRIBUTE_NAMES))
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise ValueError(f"noise must be a non-negative number, got {noise!r}")
        rng = _stream(seed, 7001, feature_dim)
        prototypes = rng.standard_normal((num_classes + num_attributes + _NUM_BACKGROUND_KINDS, feature_dim))
        prototypes = prototypes.astype(np.float32)
        return cls(
            class_names=CLASS_NAMES[:num_classes],
            attribute_names=ATTRIBUTE_NAMES[:num_attributes],
            class_prototypes=prototypes[:num_classes],
            attribute_prototypes=prototypes[num_classes : num_classes + num_attributes],
            background_prototypes=prototypes[num_classes + num_attributes :],
            noise=float(noise),
            seed=seed,
        )

    @property
    def num_classes(self) -> int:
        """K, the number of object classes."""
        return len(self.class_names)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    @property
    def feature_dim(self) -> int:
        return int(self.class_prototypes.shape[1])

    @property
    def background_class_id(self) -> int:
        """The detector class id of background regions (= K)."""
        return self.num_classes

    @property
    def num_region_classes(self) -> int:
        """Number of detector classes, K objects + 1 background: the `num_object_classes` a MOC head needs."""
        return self.num_classes + 1

    @property
    def region_class_names(self) -> tuple[str, ...]:
        """Names of the detector classes, indexed by region class id."""
        return self.class_names + (BACKGROUND_NAME,)

    def vocabulary(self) -> tuple[str, ...]:
        """Every word a caption of this world may contain (classes, attributes, template and spam words)."""
        return tuple(
            sorted(set(self.class_names) | set(self.attribute_names) | set(TEMPLATE_WORDS) | set(SPAM_WORDS))
        )

    def mentioned_objects(self, caption: str) -> list[tuple[int, int | None]]:
        """The objects `caption` names, in order, as (class id, attribute id or None) pairs: each class word with
        the attribute word right before it, if any."""
        classes = {name: k for k, name in enumerate(self.class_names)}
        attributes = {name: a for a, name in enumerate(self.attribute_names)}
        words = re.findall(r"[a-z]+", caption.lower())
        return [
            (classes[word], attributes.get(words[i - 1]) if i else None)
            for i, word in enumerate(words)
            if word in classes
        ]

    def mentioned_classes(self, caption: str) -> set[int]:
        """Ids of the object classes whose word appears in `caption`."""
        return {class_id for class_id, _ in self.mentioned_objects(caption)}

    def nearest_prototype_classes(self, region_features: np.ndarray) -> np.ndarray:
        """Classifies regions by the nearest prototype (object classes, then background kinds mapped to class K).

        Args:
            region_features: [N, F] array (any float dtype).

        Returns:
            int64 [N] region class ids in [0, K].
        """
        features = np.asarray(region_features, dtype=np.float32)
        prototypes = np.concatenate([self.class_prototypes, self.background_prototypes])
        distances = (
            (features**2).sum(1, keepdims=True) - 2 * features @ prototypes.T + (prototypes**2).sum(1)[None]
        )
        nearest = distances.argmin(1)
        return np.minimum(nearest, self.num_classes).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Scenes and simulated detections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Scenes:
    """Scenes of one corpus or split: per image, its objects; per region (flat, image-major, score-descending)."""

    widths: np.ndarray  # [N] int32
    heights: np.ndarray  # [N] int32
    num_objects: np.ndarray  # [N] int64, in [2, 4]
    object_classes: np.ndarray  # [N, 4] int64 (padding beyond num_objects)
    object_attributes: np.ndarray  # [N, 4] int64
    object_boxes: np.ndarray  # [N, 4, 4] float32 pixel x1, y1, x2, y2
    region_offsets: np.ndarray  # [N + 1] int64, regions of image i are [offsets[i], offsets[i+1])
    region_features: np.ndarray  # [M, F] float16
    region_boxes: np.ndarray  # [M, 4] float32
    region_classes: np.ndarray  # [M] int32
    region_scores: np.ndarray  # [M] float32
    global_features: np.ndarray  # [N, F] float32


def _sample_scenes(
    world: ToyWorld, num_images: int, rng: np.random.Generator, confusion_rate: float
) -> _Scenes:
    K, A, F = world.num_classes, world.num_attributes, world.feature_dim
    n = num_images
    widths = rng.integers(320, 641, n)
    heights = rng.integers(320, 641, n)
    num_objects = rng.integers(2, _MAX_OBJECTS + 1, n)
    object_classes = np.argsort(rng.random((n, K)), axis=1)[:, :_MAX_OBJECTS]  # distinct classes per image
    object_attributes = rng.integers(0, A, (n, _MAX_OBJECTS))
    present = np.arange(_MAX_OBJECTS)[None] < num_objects[:, None]  # [n, 4]

    # Object boxes: a size relative to the image (scaled by size attributes), a centre that keeps it inside.
    size_factor = np.array([_SIZE_FACTORS.get(name, 1.0) for name in world.attribute_names])[
        object_attributes
    ]
    w = np.minimum(rng.uniform(0.18, 0.4, (n, _MAX_OBJECTS)) * size_factor, 0.9) * widths[:, None]
    h = np.minimum(rng.uniform(0.18, 0.4, (n, _MAX_OBJECTS)) * size_factor, 0.9) * heights[:, None]
    cx = w / 2 + rng.random((n, _MAX_OBJECTS)) * (widths[:, None] - w)
    cy = h / 2 + rng.random((n, _MAX_OBJECTS)) * (heights[:, None] - h)
    object_boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)  # [n, 4, 4]

    # Detections of objects: 3-6 per object, the first one tight, the others looser.
    per_object = np.where(present, rng.integers(3, 7, (n, _MAX_OBJECTS)), 0)
    obj_image, obj_slot = np.nonzero(present)  # image-major order
    counts = per_object[obj_image, obj_slot]
    det_image = np.repeat(obj_image, counts)
    det_slot = np.repeat(obj_slot, counts)
    first = np.zeros(len(det_image), dtype=bool)
    first[np.concatenate([[0], np.cumsum(counts)[:-1]])] = True
    jitter = np.where(first, 0.02, rng.uniform(0.04, 0.3, len(det_image)))
    base = object_boxes[det_image, det_slot]  # [D, 4]
    size = np.stack([base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]] * 2, axis=1)
    det_boxes = base + rng.standard_normal((len(det_image), 4)) * jitter[:, None] * size
    iou = _iou(det_boxes, base)

    # Background detections: fill each image to 10-30 regions with random boxes.
    num_object_regions = per_object.sum(1)
    low = np.maximum(1, 10 - num_object_regions)
    high = np.maximum(low, np.minimum(8, 30 - num_object_regions))
    num_background = rng.integers(low, high + 1)
    bg_image = np.repeat(np.arange(n), num_background)
    bg_w = rng.uniform(0.1, 0.6, len(bg_image)) * widths[bg_image]
    bg_h = rng.uniform(0.1, 0.6, len(bg_image)) * heights[bg_image]
    bg_x = rng.random(len(bg_image)) * (widths[bg_image] - bg_w)
    bg_y = rng.random(len(bg_image)) * (heights[bg_image] - bg_h)
    bg_boxes = np.stack([bg_x, bg_y, bg_x + bg_w, bg_y + bg_h], axis=1)

    image_background = rng.integers(0, _NUM_BACKGROUND_KINDS, n)  # one background kind per image

    # Features: the object (class + attribute) blended with the image's background as the box loosens, plus noise.
    obj_feature = (
        world.class_prototypes[object_classes[det_image, det_slot]]
        + _ATTRIBUTE_SCALE * world.attribute_prototypes[object_attributes[det_image, det_slot]]
    )
    weight = (0.5 + 0.5 * iou)[:, None]
    det_features = (
        weight * obj_feature + (1 - weight) * world.background_prototypes[image_background[det_image]]
    )
    bg_kind = np.where(
        rng.random(len(bg_image)) < 0.7, image_background[bg_image], rng.integers(0, 4, len(bg_image))
    )
    bg_features = world.background_prototypes[bg_kind]

    det_classes = object_classes[det_image, det_slot]
    confused = rng.random(len(det_image)) < confusion_rate
    det_classes = np.where(confused, (det_classes + rng.integers(1, K, len(det_image))) % K, det_classes)
    det_scores = np.clip(iou**1.5 * rng.uniform(0.85, 1.0, len(det_image)), 0.05, 1.0)
    bg_scores = rng.uniform(0.02, 0.4, len(bg_image))

    # Join, order image-major and score-descending (detector order), add noise, clip boxes to the image.
    image = np.concatenate([det_image, bg_image])
    scores = np.concatenate([det_scores, bg_scores]).astype(np.float32)
    order = np.lexsort((-scores, image))
    image = image[order]
    features = np.concatenate([det_features, bg_features])[order]
    features = features + world.noise * rng.standard_normal(features.shape)
    boxes = _clip_boxes(np.concatenate([det_boxes, bg_boxes])[order], widths[image], heights[image])
    classes = np.concatenate([det_classes, np.full(len(bg_image), K)])[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(image, minlength=n))])

    global_features = (
        world.noise * rng.standard_normal((n, F)) + world.background_prototypes[image_background]
    )
    np.add.at(
        global_features,
        obj_image,
        (
            world.class_prototypes[object_classes[obj_image, obj_slot]]
            + _ATTRIBUTE_SCALE * world.attribute_prototypes[object_attributes[obj_image, obj_slot]]
        ),
    )
    global_features /= (num_objects + 1)[:, None]

    return _Scenes(
        widths=widths.astype(np.int32),
        heights=heights.astype(np.int32),
        num_objects=num_objects,
        object_classes=object_classes,
        object_attributes=object_attributes,
        object_boxes=object_boxes.astype(np.float32),
        region_offsets=offsets,
        region_features=features.astype(np.float16),
        region_boxes=boxes.astype(np.float32),
        region_classes=classes.astype(np.int32),
        region_scores=scores[order],
        global_features=global_features.astype(np.float32),
    )


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of [D, 4] boxes (inverted boxes count as empty)."""
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-6)


def _clip_boxes(
    boxes: np.ndarray, widths: np.ndarray, heights: np.ndarray, min_size: float = 4.0
) -> np.ndarray:
    """Clips [M, 4] boxes into their images and makes them at least `min_size` pixels wide and high."""
    out = np.empty_like(boxes)
    for lo, hi, limit in ((0, 2, widths), (1, 3, heights)):
        a = np.minimum(boxes[:, lo], boxes[:, hi])
        b = np.maximum(boxes[:, lo], boxes[:, hi])
        a = np.clip(a, 0, limit - min_size)
        b = np.clip(np.maximum(b, a + min_size), min_size, limit)
        out[:, lo], out[:, hi] = a, b
    return out


# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------


def _phrase(world: ToyWorld, class_id: int, attribute_id: int | None) -> str:
    words = ([world.attribute_names[attribute_id]] if attribute_id is not None else []) + [
        world.class_names[class_id]
    ]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return " , ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(
    world: ToyWorld,
    classes: np.ndarray,
    attributes: np.ndarray,
    centers_x: np.ndarray | None,
    template: int,
    rng: np.random.Generator,
    *,
    keep_all: bool,
    attribute_rate: float,
) -> str:
    """One caption of a scene whose objects are `classes[i]` with `attributes[i]` at horizontal centre
    `centers_x[i]` (None for a scene without boxes, which then gets no left/right relation)."""
    n = len(classes)
    order = rng.permutation(n)
    if template >= _WITH_TEMPLATE:
        count = 2 if template != _WITH_TEMPLATE else (n if keep_all else int(rng.integers(2, n + 1)))
    else:
        count = n if keep_all else int(rng.integers(min(2, n), n + 1))
    chosen = order[:count]
    phrases = [
        _phrase(world, int(classes[i]), int(attributes[i]) if rng.random() < attribute_rate else None)
        for i in chosen
    ]
    if template < len(_LIST_TEMPLATES):
        return _LIST_TEMPLATES[template].format(_join(phrases))
    if template == _WITH_TEMPLATE:
        return f"a picture of {phrases[0]} with {_join(phrases[1:])} ."
    if template == _SIDE_TEMPLATE and centers_x is not None:
        side = "left" if centers_x[chosen[0]] < centers_x[chosen[1]] else "right"
        return f"{phrases[0]} on the {side} of {phrases[1]} ."
    return f"{phrases[0]} next to {phrases[1]} ."


def _spam(rng: np.random.Generator, low: int, high: int) -> str:
    picks = rng.choice(len(SPAM_PHRASES), int(rng.integers(low, high + 1)), replace=False)
    return " ".join(SPAM_PHRASES[i] for i in picks)


# --------------------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------------------


def _rows(
    world: ToyWorld,
    scenes: _Scenes,
    prefix: str,
    captions_per_image: int,
    rng: np.random.Generator,
    *,
    variant: str,
    unrelated_fraction: float,
    spam_fraction: float,
    with_global_feature: bool,
) -> dict[str, list]:
    n = len(scenes.widths)
    centers_x = (scenes.object_boxes[..., 0] + scenes.object_boxes[..., 2]) / 2
    columns: dict[str, list] = {
        name: [] for name in image_text_features(world.feature_dim, with_global_feature)
    }
    for i in range(n):
        k = int(scenes.num_objects[i])
        classes, attributes = scenes.object_classes[i, :k], scenes.object_attributes[i, :k]
        if variant == "retrieval":  # distinct templates give distinct captions
            templates = (
                rng.permutation(_NUM_TEMPLATES)[:captions_per_image]
                if captions_per_image <= _NUM_TEMPLATES
                else (rng.integers(0, _NUM_TEMPLATES, captions_per_image))
            )
        else:
            templates = rng.integers(0, _NUM_TEMPLATES, captions_per_image)
        start, stop = scenes.region_offsets[i], scenes.region_offsets[i + 1]
        for template in templates:
            if variant == "retrieval":
                caption = _caption(
                    world,
                    classes,
                    attributes,
                    centers_x[i],
                    template,
                    rng,
                    keep_all=False,
                    attribute_rate=0.8,
                )
            elif variant == "web" and rng.random() < unrelated_fraction:
                if rng.random() < 0.7:  # the caption of another scene, with none of this image's classes
                    absent = np.setdiff1d(np.arange(world.num_classes), classes)
                    other = rng.choice(absent, int(rng.integers(2, _MAX_OBJECTS + 1)), replace=False)
                    other_attributes = rng.integers(0, world.num_attributes, len(other))
                    caption = _caption(
                        world,
                        other,
                        other_attributes,
                        None,
                        template,
                        rng,
                        keep_all=True,
                        attribute_rate=0.85,
                    )
                else:  # spam only
                    caption = _spam(rng, 2, 4)
            else:
                caption = _caption(
                    world, classes, attributes, centers_x[i], template, rng, keep_all=rng.random() < 0.7,
                    attribute_rate=0.9,
                )  # fmt: skip
                if variant == "web" and rng.random() < spam_fraction:
                    spam = _spam(rng, 1, 2)
                    caption = f"{spam} {caption}" if rng.random() < 0.5 else f"{caption} {spam}"
            columns["image_id"].append(f"{prefix}-{i:06d}")
            columns["caption"].append(caption)
            columns["region_features"].append(scenes.region_features[start:stop])
            columns["region_boxes"].append(scenes.region_boxes[start:stop])
            columns["image_width"].append(int(scenes.widths[i]))
            columns["image_height"].append(int(scenes.heights[i]))
            columns["region_classes"].append(scenes.region_classes[start:stop])
            columns["region_scores"].append(scenes.region_scores[start:stop])
            if with_global_feature:
                columns["global_feature"].append(scenes.global_features[i])
    return columns


_VARIANT_KEYS = {"curated": 1, "web": 2, "retrieval": 3}
_SPLIT_KEYS = {None: 0, "train": 1, "validation": 2, "test": 3}


def _corpus(
    world: ToyWorld, variant: str, split: str | None, num_images: int, seed: int, **kwargs
) -> Dataset:
    rng = _stream(world.seed, seed, _VARIANT_KEYS[variant], _SPLIT_KEYS[split])
    scenes = _sample_scenes(world, num_images, rng, kwargs.pop("confusion_rate"))
    prefix = f"{variant}-{split}-s{seed}" if split else f"{variant}-s{seed}"
    columns = _rows(world, scenes, prefix, rng=rng, variant=variant, **kwargs)
    features = image_text_features(world.feature_dim, kwargs["with_global_feature"])
    description = json.dumps(
        {
            "toy_world": {
                "variant": variant,
                "split": split,
                "seed": seed,
                "world_seed": world.seed,
                "noise": world.noise,
                "region_class_names": list(world.region_class_names),
                "attribute_names": list(world.attribute_names),
            }
        }
    )
    return Dataset.from_dict(
        columns, features=features, info=DatasetInfo(description=description, features=features)
    )


def make_toy_world(
    variant: str = "curated",
    *,
    num_images: int = 200,
    seed: int = 0,
    world_seed: int = 0,
    feature_dim: int = 64,
    num_classes: int = 24,
    num_attributes: int = 8,
    captions_per_image: int | None = None,
    noise: float = 1.5,
    confusion_rate: float = 0.03,
    unrelated_fraction: float | None = None,
    spam_fraction: float | None = None,
    num_validation_images: int = 50,
    num_test_images: int = 100,
    with_global_feature: bool = False,
) -> Dataset | DatasetDict:
    """Makes a deterministic synthetic image-text corpus in the dataset schema (see the module docstring).

    Args:
        variant: "curated" (faithful captions), "web" (noisy captions) or "retrieval" (train/validation/test).
        num_images: images of the corpus; for "retrieval", of the train split.
        seed: samples the scenes and captions; the same arguments always give the same dataset, bit for bit.
        world_seed: samples the prototypes (`ToyWorld.create`); keep it equal across corpora meant to be combined.
        feature_dim: F, the region feature dimension.
        num_classes: K object classes (at most `len(CLASS_NAMES)`); region class ids are in [0, K], K = background.
        num_attributes: A attributes (at most `len(ATTRIBUTE_NAMES)`).
        captions_per_image: rows per image; default 1, and 5 for "retrieval" (all different captions).
        noise: standard deviation of the noise added to each feature component (prototypes are standard normal).
        confusion_rate: probability that an object region's detector class is another, random object class.
        unrelated_fraction: "web" only (default 0.3): probability that a caption does not describe its image
            (70% the caption of another scene with none of the image's classes, 30% only spam words).
        spam_fraction: "web" only (default 0.2): probability that a faithful caption is padded with spam words.
        num_validation_images, num_test_images: "retrieval" only, images of those splits.
        with_global_feature: add a `global_feature` column (float32 [F], a noisy mean of the scene's prototypes).

    Returns:
        A `datasets.Dataset` with one row per (image, caption) pair and the columns of
        `image_text_features(feature_dim, with_global_feature)`, images in order, an image's captions in
        consecutive rows; for "retrieval", a `DatasetDict` with "train", "validation" and "test" on disjoint images.
        Region features are float16 [N, F] with N in [10, 30], in detector order (score-descending).

    Raises:
        ValueError or TypeError naming the argument when one is out of range or does not apply to the variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    num_images = _check_int("num_images", num_images, 1)
    seed = _check_int("seed", seed, 0)
    if captions_per_image is None:
        captions_per_image = 5 if variant == "retrieval" else 1
    captions_per_image = _check_int("captions_per_image", captions_per_image, 1)
    confusion_rate = _check_fraction("confusion_rate", confusion_rate)
    for name, value in (("unrelated_fraction", unrelated_fraction), ("spam_fraction", spam_fraction)):
        if value is not None and variant != "web":
            raise ValueError(
                f"{name} applies only to the 'web' variant, got {name}={value!r} for {variant!r}"
            )
    unrelated_fraction = _check_fraction(
        "unrelated_fraction", 0.3 if unrelated_fraction is None else unrelated_fraction
    )
    spam_fraction = _check_fraction("spam_fraction", 0.2 if spam_fraction is None else spam_fraction)
    world = ToyWorld.create(
        seed=world_seed,
        feature_dim=feature_dim,
        num_classes=num_classes,
        num_attributes=num_attributes,
        noise=noise,
    )
    kwargs = dict(
        captions_per_image=captions_per_image,
        confusion_rate=confusion_rate,
        unrelated_fraction=unrelated_fraction,
        spam_fraction=spam_fraction,
        with_global_feature=bool(with_global_feature),
    )
    if variant != "retrieval":
        return _corpus(world, variant, None, num_images, seed, **kwargs)
    sizes = {
        "train": num_images,
        "validation": _check_int("num_validation_images", num_validation_images, 1),
        "test": _check_int("num_test_images", num_test_images, 1),
    }
    return DatasetDict(
        {split: _corpus(world, variant, split, size, seed, **dict(kwargs)) for split, size in sizes.items()}
    )


def toy_world_for(dataset: Dataset) -> ToyWorld:
    """Rebuilds the `ToyWorld` a toy corpus was made in, from its `info.description`, for the given sizes.

    The corpus records its world seed, noise level and vocabulary; the feature dimension comes from its features.
    """
    try:
        meta = json.loads(dataset.info.description)["toy_world"]
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(
            "dataset.info.description does not describe a toy-world corpus made by make_toy_world"
        ) from error
    return ToyWorld.create(
        seed=meta["world_seed"],
        feature_dim=dataset.features["region_features"].shape[1],
        num_classes=len(meta["region_class_names"]) - 1,
        num_attributes=len(meta["attribute_names"]),
        noise=meta["noise"],
    )


__all__ = [
    "ATTRIBUTE_NAMES",
    "CLASS_NAMES",
    "DEMO_TOY_TEST_SPLIT",
    "DEMO_TOY_WORLD",
    "VARIANTS",
    "ToyWorld",
    "make_toy_world",
    "toy_world_for",
]
