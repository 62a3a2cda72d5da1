"""Data layer: schema and validation, importers and the convert CLI, storage, collators, toy world.

Names are loaded lazily so that `import modeling_imagebert.data` stays cheap and each module can be used alone.
"""

from ..lazy_exports import lazy_getattr

_EXPORTS = {
    "IMAGE_TEXT_FEATURES": "schema",
    "image_text_features": "schema",
    "validate_record": "schema",
    "validate_dataset": "schema",
    "DataValidationError": "schema",
    "save_dataset": "storage",
    "load_dataset_from_disk": "storage",
    "load_streaming_dataset": "storage",
    "DataCollatorForImageBertPretraining": "collators",
    "DataCollatorForImageTextRetrieval": "collators",
    "DataCollatorForTextMLM": "collators",
    "DataCollatorForCandidateGroups": "collators",
    "make_toy_world": "toy_world",
    "ToyWorld": "toy_world",
    "toy_world_for": "toy_world",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
