"""`python -m modeling_imagebert.app`: index a folder of images and search it in a browser.

    python -m modeling_imagebert.app --model DIR --images FOLDER [--captions FILE] [--detector DIR]
    python -m modeling_imagebert.app --demo     # offline: the toy world's scenes and the demo model

Indexes the folder once (resumably: each finished batch is kept in --cache, outside the image folder, so a stopped
run continues where it was), then serves the page on http://127.0.0.1:7860 (this machine only; --host 0.0.0.0
shares it with the network). The image folder is only read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import USER_ERRORS, run_cli
from ..cli_arguments import DefaultsHelpFormatter
from ..retrieval.indexing import list_image_files
from .search import CANDIDATES, SearchApp, check_image_folder, default_cache_dir


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_imagebert.app",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--model",
        help="checkpoint folder (ImageBertForRetrieval or ImageBertForPreTraining, with its processor)",
    )
    add("--images", help="folder of images to index (searched recursively; only read)")
    add("--captions", help="text file, one caption a line: an image query ranks them")
    add("--detector", help="BUTD detector folder (default: the one saved with the model's processor)")
    add(
        "--cache", help="where the index is kept (default: ~/.cache/modeling_imagebert/app/<folder>-<digest>)"
    )
    add(
        "--demo",
        action="store_true",
        help="the toy world's scenes, drawn, and the demo model (trained once if absent)",
    )
    add("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network interface)")
    add("--port", type=int, default=7860, help="port to listen on")
    add(
        "--candidates",
        type=int,
        default=CANDIDATES,
        help="K, images re-ranked by the cross-encoder per text query",
    )
    return parser


def prepare(args: argparse.Namespace) -> tuple[SearchApp, Path]:
    """The indexed app and its image folder, from the parsed arguments."""
    if args.demo:
        from ..data.toy_world import DEMO_TOY_WORLD, ToyWorld
        from .toy_demo import ToyWorldProcessor, find_demo_model, render_demo_images, train_demo_model

        if args.images or args.detector:
            raise ValueError(
                "--demo draws its own images and detects them itself; leave out --images and --detector"
            )
        cache = Path(args.cache) if args.cache else default_cache_dir("toy-world-demo")
        model = Path(args.model) if args.model else (find_demo_model(cache) or train_demo_model(cache))
        images, captions, records = render_demo_images(cache / "toy-scenes")
        print(f"Demo: {len(records)} toy scenes drawn in {images}; model {model}")
        world = ToyWorld.create(
            **{("seed" if k == "world_seed" else k): v for k, v in DEMO_TOY_WORLD.items()}
        )
        app = SearchApp.build(
            model,
            images,
            processor=ToyWorldProcessor.for_model(model, records),
            captions=args.captions or captions,
            cache_dir=cache / "index",
            candidates=args.candidates,
            class_names=world.region_class_names,
        )
        return app, images
    if not args.model or not args.images:
        raise ValueError("pass --model DIR and --images FOLDER (or --demo for the toy world's demo)")
    folder = check_image_folder(args.images)
    app = SearchApp.build(
        args.model,
        folder,
        captions=args.captions,
        detector=args.detector,
        cache_dir=args.cache,
        candidates=args.candidates,
    )
    return app, folder


def main(argv: list[str]) -> None:
    args = build_argument_parser().parse_args(argv)
    if args.candidates < 1:
        raise ValueError(f"--candidates must be >= 1, got {args.candidates}")
    if not args.demo and args.images:
        list_image_files(check_image_folder(args.images))  # the folder first: the most likely mistake
    from .ui import build_page, launch, require_gradio

    require_gradio()  # before indexing: a missing gradio is one line, not a wait then a traceback
    app, folder = prepare(args)

    page = build_page(app)
    print(f"Serving on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    launch(page, host=args.host, port=args.port, allowed_paths=[folder])


if __name__ == "__main__":
    sys.exit(run_cli(main, errors=(*USER_ERRORS, ImportError)))
