"""Stage 1's signals one at a time on hand-written pages shaped like the real ones (tests/data/real_pages):
main content, language of mixed pages, teasers, declared pictures, image URLs, sizes; and stage 3's new cleaning."""

from __future__ import annotations

import pytest

from modeling_imagebert.lait.image_urls import parse_srcset
from modeling_imagebert.lait.page_content import page_language
from modeling_imagebert.lait.pages import stage1_pages
from modeling_imagebert.lait.records import DropCounter, PageRecord
from modeling_imagebert.lait.text import clean_text, filter_reason, fit_sentences

PAGE_URL = "https://news.example.com/2020/01/foxes-return.html"
FOX = (
    "Red foxes have returned to the valley after an absence of thirty years, and the rangers who counted them this "
    "winter say the population is growing, with dens near the river, the old quarry and the village school."
)
FOX2 = (
    "The animals hunt voles in the meadows at dusk, and farmers, who once feared for their hens, now mostly welcome "
    "them, because the foxes also keep the rabbits away from the young trees of the orchards."
)
GERMAN = (
    "Der Rotfuchs ist in das Tal zurückgekehrt, nachdem er dreißig Jahre lang verschwunden war, und die Förster, die "
    "ihn in diesem Winter gezählt haben, sagen, dass der Bestand wächst und sich Baue am Fluss befinden."
)


def _html(body: str, head: str = "<title>Foxes return to the valley</title>", lang: str = "") -> str:
    lang_attribute = f" lang='{lang}'" if lang else ""
    return f"<!doctype html><html{lang_attribute}><head>{head}</head><body>{body}</body></html>"


def _article(lead: str = "", extra: str = "", text: str = FOX) -> str:
    return (
        "<div class='page with-sidebar'><main><article><header><h1>Foxes return to the valley</h1>"
        f"{lead}</header><div class='article-body'><p>{text}</p><p>{FOX2}</p><p>{text}</p>{extra}</div>"
        "</article></main></div>"
    )


def _picks(html: str, url: str = PAGE_URL) -> list[str]:
    record = PageRecord(warc_file="t.warc.gz", warc_offset=0, page_url=url, html=html)
    return [candidate.image_url for candidate in stage1_pages(record, None, DropCounter())]


def _candidates(html: str):
    record = PageRecord(warc_file="t.warc.gz", warc_offset=0, page_url=PAGE_URL, html=html)
    return stage1_pages(record, None, DropCounter())


RAIL = (
    "<aside class='related'><ul>"
    + "".join(
        f"<li><a href='/2020/01/story-{i}.html'><img src='/thumbs/story-{i}.jpg' width='640' height='360'"
        f" alt='Another story {i}'>Another story {i}</a></li>"
        for i in range(4)
    )
    + "</ul></aside>"
)


def test_lead_picture_in_the_article_header_beats_a_rail_of_related_teasers():
    lead = "<figure><img src='/media/fox-den.jpg' width='1200' height='800' alt='A fox at its den'></figure>"
    assert _picks(_html(_article(lead) + RAIL)) == ["https://news.example.com/media/fox-den.jpg"]


def test_teaser_cards_inside_the_article_link_to_other_pages_and_lose():
    teaser = (
        "<div class='card'><a href='/2020/01/other-story.html'><img src='/media/other.jpg' width='1600'"
        " height='900' alt='Other story'></a></div>"
    )
    photo = "<figure><img src='/media/fox-river.jpg' width='800' height='533'></figure>"
    assert _picks(_html(_article(extra=teaser + photo))) == ["https://news.example.com/media/fox-river.jpg"]


def test_a_lightbox_link_to_the_picture_itself_is_not_a_teaser():
    photo = "<a href='/media/fox-big.jpg'><img src='/media/fox-800x533.jpg' alt='A fox'></a>"
    (candidate,) = _candidates(_html(_article(extra=photo)))
    assert candidate.dom_features["in_link"] == 1.0 and candidate.dom_features["in_teaser"] == 0.0


def test_og_image_names_the_page_picture_among_equal_ones():
    head = (
        "<title>Foxes return to the valley</title>"
        "<meta property='og:image' content='https://cdn.example.com/fox-den-1200x630.jpg'>"
    )
    photos = "".join(
        f"<p><img src='https://cdn.example.com/{name}-800x533.jpg'></p>" for name in ("meadow", "fox-den")
    )
    candidates = _candidates(_html(_article(extra=photos), head))
    assert candidates[0].image_url == "https://cdn.example.com/fox-den-800x533.jpg"
    assert candidates[0].dom_features["meta_image"] == 1.0


def test_schema_org_image_of_the_article_counts_but_not_the_publisher_logo():
    head = (
        "<title>Foxes return to the valley</title><script type='application/ld+json'>"
        '{"@type": "NewsArticle", "image": {"@type": "ImageObject", "url": "https://cdn.example.com/den.jpg"},'
        ' "publisher": {"@type": "Organization", "logo": {"url": "https://cdn.example.com/site.png"},'
        ' "image": "https://cdn.example.com/site.png"}}</script>'
    )
    photos = "<p><img src='https://cdn.example.com/den.jpg'><img src='https://cdn.example.com/site.png'></p>"
    features = {
        c.image_url: c.dom_features["meta_image"] for c in _candidates(_html(_article(extra=photos), head))
    }
    assert features.get("https://cdn.example.com/den.jpg") == 1.0
    assert features.get("https://cdn.example.com/site.png", 0.0) == 0.0


def test_picture_urls_from_lazy_attributes_picture_sources_and_srcset_with_commas():
    crop = "https://img.example.com/lede.jpeg?crop=1xw:0.99xh;center,center&resize=700:*"
    lazy = "<img src='data:image/jpeg;base64,AAAA' data-dejavu-src='/media/lazy-fox.jpg' width='838' height='687'>"
    picture = f"<picture><source media='(min-width: 0px)' srcset='{crop}'><img alt=''></picture>"
    assert _picks(_html(_article(extra=lazy))) == ["https://news.example.com/media/lazy-fox.jpg"]
    assert _picks(_html(_article(lead=picture))) == [crop]
    assert parse_srcset(f"{crop} 700w, b.jpg 1400w") == [(crop, 700), ("b.jpg", 1400)]
    assert parse_srcset("data:image/gif;base64,R0lGOD, real.jpg 2x") == [
        ("data:image/gif;base64,R0lGOD", 0),
        ("real.jpg", 0),
    ]


def test_a_src_of_the_site_root_is_no_picture():
    html = _html(_article(extra="<p><img src='/' alt='main article image'></p>"))
    assert _picks(html) == []


def test_sizes_from_the_url_and_from_text_units_count_as_declared_sizes():
    from modeling_imagebert.lait.config import load_config

    author = "<p><img src='https://i0.wp.com/post.example.com/author.png?w=105&h=105'></p>"
    formula = "<p><img src='https://math.example.org/render/svg/ab12' style='width:2.3ex; height:2.1ex'></p>"
    html = _html(_article(extra=author + formula))
    assert _candidates(html) == []  # both small: no dominant picture
    config = load_config(overrides={"pages": {"min_score": -100.0, "keep_margin": 100.0}})["pages"]
    record = PageRecord(warc_file="t.warc.gz", warc_offset=0, page_url=PAGE_URL, html=html)
    features = {c.image_url: c.dom_features for c in stage1_pages(record, config, DropCounter())}
    author_features = features["https://i0.wp.com/post.example.com/author.png?w=105&h=105"]
    formula_features = features["https://math.example.org/render/svg/ab12"]
    assert author_features["declared_width"] == 105.0 and author_features["log_side_ratio"] < -1.5
    assert formula_features["declared_height"] == 16.0 and formula_features["small"] == 1.0


def test_language_is_the_main_content_not_the_template_or_html_lang():
    german_article = _article(text=GERMAN).replace(FOX2, GERMAN)
    english_menu = "<nav><ul>" + "".join(
        f"<li><a href='/s{i}'>Home news sport weather</a></li>" for i in range(40)
    )
    english_menu += "</ul></nav>"
    assert not page_language(_html(english_menu + german_article, lang="en-US")).kept
    german_menu = english_menu.replace("Home news sport weather", "Startseite Nachrichten Sport Wetter")
    language = page_language(_html(german_menu + _article(), lang="de"))
    assert language.kept and language.evidence == "content"


def test_html_lang_decides_only_when_the_text_gives_no_answer():
    tiny = "<p>Fox.</p><img src='/media/fox.jpg'>"
    assert page_language(_html(tiny, lang="en-GB")) == page_language(_html(tiny, lang="en"))
    language = page_language(_html(tiny, lang="en-GB"))
    assert language.kept and language.evidence == "html_lang"
    assert not page_language(_html(tiny)).kept


def test_mostly_non_latin_letters_are_not_english_even_in_an_english_template():
    lyrics = "".join(
        f"<p>只能想念你 我还有话想对你说 舍不得说 来不及说 离别的话最难说出口 Zhi neng xiang nian ni line {i}</p>"
        for i in range(12)
    )
    language = page_language(
        _html(lyrics + "<p>Posted by K A at 12:11 PM. Share to Twitter and Facebook.</p>")
    )
    assert not language.kept


def test_nearby_text_must_share_a_word_with_the_headline():
    photo = "<div><img src='/media/fox.jpg' width='800' height='533'></div>"
    unrelated = "<p>Subscribe to our newsletter for weekly updates about gardening tips and recipes.</p>"
    (candidate,) = _candidates(_html(_article(extra=photo + unrelated)))
    assert "nearby" not in {t.source for t in candidate.text_candidates}
    related = "<p>Two young foxes play near the valley school at dusk.</p>"
    (candidate,) = _candidates(_html(_article(extra=photo + related)))
    assert {t.source: t.raw for t in candidate.text_candidates}["nearby"].startswith("Two young foxes")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Image via Getty Images", ""),
        ("Sharon Risher at the church. Photo via Reuters", "Sharon Risher at the church."),
        ("5W Infographics for Quanta; sources: Wikimedia Commons, MIT Museum", "5W Infographics for Quanta"),
        ("This image may contain Text Word and Rug", ""),
        ("May be an image of 2 people and a dog", ""),
    ],
)
def test_credits_sources_and_generated_alt_are_cleaned(raw, expected):
    assert clean_text(raw) == expected


def test_a_long_caption_keeps_its_first_whole_sentences():
    caption = (
        "United Nations peacekeepers at a refugee camp in Sudan on Monday. In exchange for the lifting of trade "
        "sanctions, Sudan has said it will improve access for aid groups, stop supporting rebels in neighboring South "
        "Sudan and cooperate with intelligence agencies on counterterrorism efforts across the region this year."
    )
    assert fit_sentences(caption, 40) == "United Nations peacekeepers at a refugee camp in Sudan on Monday."
    assert filter_reason(fit_sentences(caption, 40)) is None
    assert fit_sentences("one two three", 40) == "one two three"
