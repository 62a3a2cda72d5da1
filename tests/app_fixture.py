"""The search app on the toy demo's drawn scenes with a tiny random checkpoint, for the app's tests."""

from pathlib import Path

from tiny_checkpoint import save_tiny_checkpoint

from modeling_imagebert.app.search import SearchApp
from modeling_imagebert.app.toy_demo import ToyWorldProcessor, render_demo_images
from modeling_imagebert.data.toy_world import DEMO_TOY_WORLD, ToyWorld


def demo_class_names() -> tuple[str, ...]:
    world = ToyWorld.create(**{("seed" if k == "world_seed" else k): v for k, v in DEMO_TOY_WORLD.items()})
    return world.region_class_names


def build_toy_app(
    root: Path, minilm_path: str, model: Path | None = None
) -> tuple[SearchApp, Path, Path, Path]:
    """(app, image folder, captions file, model folder): the demo's 25 drawn scenes under `root`/scenes indexed
    into `root`/index with `model` (default: a tiny random checkpoint saved under `root`/model)."""
    if model is None:
        model = root / "model"
        if not (model / "config.json").is_file():
            save_tiny_checkpoint(model, minilm_path)
    images, captions, records = render_demo_images(root / "scenes")
    app = SearchApp.build(
        model,
        images,
        processor=ToyWorldProcessor.for_model(model, records),
        captions=captions,
        cache_dir=root / "index",
        class_names=demo_class_names(),
        progress=False,
    )
    return app, images, captions, model


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file under `folder`, by relative path: to show nothing was written there."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }
