"""The search app: a folder of images indexed with `ImageBertRetriever`, searched by text or by image in a browser.

    python -m modeling_imagebert.app --model DIR --images FOLDER [--captions FILE] [--detector DIR]
    python -m modeling_imagebert.app --demo      # the toy world's images and the demo model, offline

`search` is the engine without a UI (index a folder, text -> images, image -> captions or similar images, a
result's regions drawn), `toy_demo` renders the toy world's scenes as pictures and detects them with the toy
world's simulated detector, `ui` lays the engine out as a Gradio page, `__main__` is the command. The app comes
after every other subpackage: it only uses the retriever, the processor and the toy world.
"""
