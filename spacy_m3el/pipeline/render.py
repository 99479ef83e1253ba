"""A self-contained HTML view of linked docs: the text with its mentions
highlighted (displaCy's look), the mention's picture, and per mention the top
candidates with their KB picture, name, description, score and per-branch
score bars. Thumbnails are inlined as small JPEGs: no network, bounded size."""
import base64
import html
import io
from typing import Any, Dict, Iterable, Optional

from spacy.tokens import Doc, Span

from ..data.images import load_image
from ..errors import ImageLoadError
from ..extensions import image_source
from ..kb.base import NIL, MultimodalKB

BRANCH_COLOURS = {"text": "#7aecec", "image": "#feca74", "t2v": "#aa9cfc", "v2t": "#bfe1d9"}
STYLE = """
.m3el{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:980px;margin:0 auto;color:#222}
.m3el-doc{border-bottom:1px solid #ddd;padding:1em 0}
.m3el-text{line-height:2.4;font-size:17px}
.m3el-ent{background:#ddd;padding:.3em .5em;border-radius:.35em;margin:0 .15em}
.m3el-ent.linked{background:#7aecec}.m3el-ent.nil{background:#ffd1d1}
.m3el-label{font-size:.65em;font-weight:bold;text-transform:uppercase;margin-left:.4em}
.m3el-mention{display:flex;gap:1em;margin:.8em 0 .4em;align-items:flex-start}
.m3el-mention img,.m3el-cand img{border-radius:4px;object-fit:cover}
.m3el-cands{display:flex;flex-wrap:wrap;gap:.6em}
.m3el-cand{width:180px;border:1px solid #ddd;border-radius:6px;padding:.4em;font-size:12px}
.m3el-cand.best{border:2px solid #2a9d8f}
.m3el-cand .name{font-weight:bold;font-size:13px}.m3el-cand .desc{color:#555;height:3em;overflow:hidden}
.m3el-bar{height:6px;border-radius:3px;margin:1px 0}
.m3el-none{width:96px;height:96px;background:#eee;display:flex;align-items:center;justify-content:center;color:#999}
"""


def thumbnail(source: Any, size: int = 96) -> Optional[str]:
    """A data: URI of a small JPEG of ``source`` (None if it cannot be read)."""
    if source is None:
        return None
    try:
        image = load_image(source)
    except ImageLoadError:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _picture(uri: Optional[str], size: int, alt: str) -> str:
    if uri is None:
        return f'<div class="m3el-none" style="width:{size}px;height:{size}px">no image</div>'
    return f'<img src="{uri}" width="{size}" height="{size}" alt="{html.escape(alt)}">'


def _text(doc: Doc) -> str:
    parts, last = [], 0
    for ent in doc.ents:
        parts.append(html.escape(doc.text[last : ent.start_char]))
        status = "nil" if ent.kb_id_ in ("", NIL) else "linked"
        kb_id = ent.kb_id_ or NIL
        # The answer's probability: the entity's, or NIL's for a NIL answer.
        prob = f" p {ent._.m3el_score:.2f}" if ent._.m3el_score is not None else ""
        parts.append(f'<mark class="m3el-ent {status}">{html.escape(ent.text)}'
                     f'<span class="m3el-label">{html.escape(ent.label_)} · {html.escape(kb_id)}{prob}</span></mark>')
        last = ent.end_char
    parts.append(html.escape(doc.text[last:]))
    return "".join(parts)


def _bars(branches: Dict[str, float], top: float) -> str:
    out = []
    for name, value in branches.items():
        width = 0 if top <= 0 else max(0.0, min(1.0, value / top)) * 150
        out.append(f'<div title="{name}: {value:.3f}"><div class="m3el-bar" '
                   f'style="width:{width:.0f}px;background:{BRANCH_COLOURS.get(name, "#ccc")}"></div></div>')
    return "".join(out)


def _candidate(candidate: Dict[str, Any], kb: MultimodalKB, best: bool, size: int, top: float) -> str:
    entity = kb.get_entity(candidate["id"]) if candidate["id"] in kb else {"name": candidate["id"],
                                                                          "description": "", "images": []}
    uri = thumbnail(entity["images"][0], size) if entity["images"] else None
    description = html.escape(entity["description"][:140])
    branches = candidate.get("branches", {})
    legend = " ".join(f"{name} {value:.2f}" for name, value in branches.items())
    return (f'<div class="m3el-cand{" best" if best else ""}">{_picture(uri, size, entity["name"])}'
            f'<div class="name">{html.escape(entity["name"])}</div><div>{html.escape(candidate["id"])} · '
            f'p {candidate.get("prob", 0.0):.3f} · score {candidate["score"]:.3f}</div><div class="desc">{description}</div>'
            f'{_bars(branches, top)}<div style="color:#777">{html.escape(legend)}</div></div>')


def _mention(ent: Span, kb: MultimodalKB, max_candidates: int, size: int) -> str:
    candidates = (ent._.m3el_candidates or [])[:max_candidates]
    uri = thumbnail(image_source(ent), size)
    modalities = ", ".join(ent._.m3el_modalities or []) or "not linked"
    status = "NIL (no entity)" if ent.kb_id_ in ("", NIL) else html.escape(ent.kb_id_)
    top = max((v for c in candidates for v in c.get("branches", {}).values()), default=0.0)
    cards = "".join(_candidate(c, kb, c["id"] == ent.kb_id_, size, top) for c in candidates)
    return (f'<div class="m3el-mention">{_picture(uri, size, ent.text)}<div>'
            f'<div><b>{html.escape(ent.text)}</b> → {status} · linked with {html.escape(modalities)}</div>'
            f'<div class="m3el-cands">{cards or "<i>no candidates</i>"}</div></div></div>')


def render(
    docs: Iterable[Doc],
    kb: MultimodalKB,
    *,
    max_candidates: int = 5,
    thumbnail_size: int = 96,
    page: bool = True,
    jupyter: Optional[bool] = None,
) -> str:
    """HTML for linked docs (``kb``: the linker's KB, for candidates' names,
    descriptions and pictures). ``page`` wraps it in a full HTML document;
    in Jupyter (or with ``jupyter=True``) it is also displayed inline."""
    body = []
    for doc in docs:
        mentions = "".join(_mention(ent, kb, max_candidates, thumbnail_size) for ent in doc.ents)
        body.append(f'<div class="m3el-doc"><div class="m3el-text">{_text(doc)}</div>{mentions}</div>')
    markup = f'<style>{STYLE}</style><div class="m3el">{"".join(body)}</div>'
    if jupyter is None:
        jupyter = _in_jupyter()
    if jupyter:
        from IPython.display import HTML, display

        display(HTML(markup))
    if page:
        markup = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>spacy-m3el</title></head>'
                  f"<body>{markup}</body></html>")
    return markup


def _in_jupyter() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
