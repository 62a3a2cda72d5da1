"""Data layer: schema and validation, importers and the convert CLI, storage, collators, toy world.

Names are loaded lazily so that `import modeling_imagebert.data` stays cheap and each module can be used alone.
"""

import importlib

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


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modeling_imagebert.data' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    return getattr(module, name)


__all__ = sorted(_EXPORTS)
