"""The search app's page (Gradio): a `SearchApp` laid out for a person to look at.

Text search shows the top images with both scores and what each means, and the query's time split; clicking a
result (or uploading an image) searches from that image: the captions that describe it best (with a caption file)
and the most similar images; "Draw the detector's boxes" draws the regions the model saw on the selected image.
Elements carry `elem_id`s (`query`, `results`, `ranking`, `timing`, `selected`, `captions`, `similar`,
`image-timing`, `draw-boxes`, `boxes`, `regions`) that the browser test reads.
"""

# No `from __future__ import annotations` here: Gradio finds the `gr.SelectData` argument of an event handler by its
# annotation, which must be the class itself, not a string.
import os

from .search import CAPTION_EXPLANATION, SCORE_EXPLANATION, SIMILAR_EXPLANATION, SearchApp

TOP_K = 8


def require_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network: no usage statistics
    try:
        import gradio
    except ImportError:
        raise ImportError("the search app needs gradio: pip install 'modeling_imagebert[app]'") from None
    return gradio


def ranking_table(result) -> str:
    """Markdown table of a text query's ranked images: rank, id, ITM probability (and logit), ITC cosine."""
    lines = ["| rank | image | ITM (match probability) | ITC (cosine) |", "|---|---|---|---|"]
    for rank, hit in enumerate(result.hits, 1):
        lines.append(
            f"| {rank} | `{hit.image_id}` | {hit.itm_probability:.3f} (logit {hit.itm_logit:+.2f}) | "
            f"{hit.similarity:.3f} |"
        )
    return "\n".join(lines)


def build_page(app: SearchApp, *, title: str = "ImageBERT search", top_k: int = TOP_K):
    """The Gradio `Blocks` page of `app` (not launched)."""
    gr = require_gradio()
    k = app.retriever.candidates
    with gr.Blocks(title=title) as page:
        gr.Markdown(
            f"# {title}\n{len(app.paths)} images indexed"
            + (f", {len(app.captions)} captions" if app.captions else "")
            + f". Text search: ITC shortlist of K = {k}, re-ranked by ITM."
        )
        results_state = gr.State([])  # image ids of the shown results, in order
        selected_state = gr.State(None)  # the image the image search and the boxes are about
        with gr.Row():
            query = gr.Textbox(label="Search images by text", placeholder="a red dog next to a blue cat",
                               elem_id="query", scale=4)  # fmt: skip
            search = gr.Button("Search", variant="primary", elem_id="search", scale=1)
        gr.Markdown(SCORE_EXPLANATION.format(k=k), elem_id="explanation")
        timing = gr.Markdown(elem_id="timing")
        results = gr.Gallery(label="Results (click one to search from it)", columns=4, height="auto",
                             allow_preview=False, elem_id="results")  # fmt: skip
        ranking = gr.Markdown(elem_id="ranking")

        gr.Markdown("## Search by image")
        with gr.Row():
            with gr.Column():
                # image_mode=None: the uploaded file itself reaches the detector, not a converted copy.
                upload = gr.Image(label="Query image (upload, or click a result above)", type="filepath",
                                  sources=["upload"], image_mode=None, elem_id="query-image")  # fmt: skip
                selected = gr.Markdown(elem_id="selected")
                draw = gr.Button("Draw the detector's boxes", elem_id="draw-boxes")
            with gr.Column():
                boxes = gr.Image(label="Detected regions (what the model sees)", type="pil", elem_id="boxes",
                                 interactive=False)  # fmt: skip
                regions = gr.Markdown(elem_id="regions")
        image_timing = gr.Markdown(elem_id="image-timing")
        captions = gr.Markdown(elem_id="captions")
        gr.Markdown(SIMILAR_EXPLANATION)
        similar = gr.Gallery(label="Similar images", columns=4, height="auto", allow_preview=False,
                             elem_id="similar")  # fmt: skip

        def run_text(text):
            try:
                result = app.search_text(text, top_k=top_k)
            except ValueError as error:
                raise gr.Error(str(error)) from None
            gallery = [
                (
                    hit.path,
                    f"{rank}. {hit.image_id} · ITM {hit.itm_probability:.2f} · ITC {hit.similarity:.2f}",
                )
                for rank, hit in enumerate(result.hits, 1)
            ]
            ids = [hit.image_id for hit in result.hits]
            return gallery, ranking_table(result), f"**Query time** {result.timing_line()}", ids

        def run_image(image):
            if image is None:
                return "", "", [], ""
            try:
                lines = []
                spent = {}
                if app.captions:
                    found = app.search_captions(image, top_k=5)
                    spent = found.timings
                    lines = [CAPTION_EXPLANATION.format(k=min(k, len(app.captions))), "",
                             "| rank | caption | ITM | ITC |", "|---|---|---|---|"]  # fmt: skip
                    lines += [
                        f"| {rank} | {hit.caption} | {hit.itm_probability:.3f} | {hit.similarity:.3f} |"
                        for rank, hit in enumerate(found.hits, 1)
                    ]
                near = app.similar_images(image, top_k=top_k)
            except (ValueError, OSError) as error:
                raise gr.Error(str(error)) from None
            gallery = [(hit.path, f"{hit.image_id} · ITC {hit.similarity:.2f}") for hit in near.hits]
            split = near.timing_line() if not spent else _line(spent)
            return "\n".join(lines), f"**Image query time** {split}", gallery, _name(image)

        def select_result(ids, event: gr.SelectData):
            image_id = ids[event.index]
            return (image_id, *run_image(image_id)[:3], f"Selected: `{image_id}`", None, "")

        def select_upload(path):
            if path is None:
                return None, "", "", [], "", None, ""
            return (path, *run_image(path)[:3], "Selected: the uploaded image", None, "")

        def draw_boxes(image):
            if image is None:
                raise gr.Error("select a result or upload an image first")
            try:
                picture, labels = app.draw_regions(image)
            except (ValueError, OSError) as error:
                raise gr.Error(str(error)) from None
            names = ", ".join(f"{label} {score:.2f}" for label, score in labels)
            return picture, f"**{len(labels)} regions**: {names}"

        outputs = [selected_state, captions, image_timing, similar, selected, boxes, regions]
        for trigger in (search.click, query.submit):
            trigger(run_text, query, [results, ranking, timing, results_state])
        results.select(select_result, results_state, outputs)
        upload.upload(select_upload, upload, outputs)
        draw.click(draw_boxes, selected_state, [boxes, regions])
    return page


def _line(timings: dict[str, float]) -> str:
    from .search import QueryResult

    return QueryResult([], timings).timing_line()


def _name(image) -> str:
    return str(image)


def launch(page, *, host: str = "127.0.0.1", port: int = 7860, allowed_paths=(), block: bool = True):
    """Serve `page` on host:port (127.0.0.1 by default: this machine only), reading images from
    `allowed_paths`; with `block=False` return at once (tests)."""
    require_gradio()
    page.queue()
    return page.launch(
        server_name=host,
        server_port=port,
        share=False,
        allowed_paths=[str(path) for path in allowed_paths],
        prevent_thread_lock=not block,
        quiet=not block,
        show_error=True,
    )


__all__ = ["build_page", "launch", "ranking_table", "require_gradio"]
