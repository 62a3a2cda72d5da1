"""LAIT: the paper's weak-supervised web collection pipeline, from Common Crawl WARCs to image-text pairs.

One module per stage (ImageBERT §3, Figure 2), each a pure function of one record or one group, with its
parameters in one YAML config (`configuration/lait/default.yaml`), so the local engine and PySpark run the same
code:

- `records`: the records passed between stages and the drop counter (`DropCounter`);
- `warc`: streaming WARC / WARC.gz response records, decoded to `PageRecord`s;
- `pages` (stage 1): English pages, DOM features of each `<img>`, the page's dominant image(s); with
  `page_settings` (its config section), `page_content` (main content, language, declared pictures) and
  `image_urls` (an `<img>`'s URL and what it says);
- `images` (stage 2: size rule and content classifiers), with `fetch` (where an image's bytes come from);
- `text` (stage 3: text candidates and cleaning), `scoring` (stage 4, and training its scorer; `itm_score`: the
  ImageBERT ITM score feature), `aggregate` (stage 5);
- `config`; `classifier_io` (labelled rows in, skops models out) and `filter_training` (the stage-2 filter);
- `engine_steps` (the steps both engines run), `engine_local` (process pool, resumable), `engine_spark` (PySpark);
- `outputs` (the output folder) and the CLI (`python -m modeling_imagebert.lait`).

Names are loaded lazily so that `import modeling_imagebert.lait` stays cheap and each module can be used alone.
"""

from ..lazy_exports import lazy_getattr

_EXPORTS = {
    "DropCounter": "records",
    "ImageCandidate": "records",
    "PageRecord": "records",
    "PairRecord": "records",
    "TextCandidate": "records",
    "merge_counters": "records",
    "iter_pages": "warc",
    "stage1_pages": "pages",
    "apply_site_repetition": "pages",
    "stage3_text": "text",
    "load_config": "config",
    "run_local": "engine_local",
    "run_spark": "engine_spark",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
