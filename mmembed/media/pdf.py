"""PDFs, page by page: each page of a document is a record, id `<document id>#page=<n>` (1-based).

Pages are rendered with pypdfium2 in the CPU pool, at the size the model's image processor will
use anyway: a CLIP-style processor resizes the shorter side to its `shortest_edge` (then crops),
so the page is rendered with that shorter side; a Qwen-VL-style processor caps an image at
`max_pixels` (its `size["longest_edge"]`), so the page is rendered to that area. Rendering larger
would only be thrown away by the processor; `--pdf-dpi` overrides the size. A document that
cannot be opened (corrupt, password-protected, empty, over --max-bytes) is one error row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator

_NO_PAGES = re.compile(rb"/Type\s*/Pages\b[^>]*/Count\s+0\b|/Count\s+0\b[^>]*/Type\s*/Pages\b")
_A_PAGE = re.compile(rb"/Type\s*/Page\b(?!s)")
# Without a size to fit (a processor that keeps every pixel), pages render at 144 dpi.
DEFAULT_DPI = 144.0


class DocumentError(Exception):
    """The document as a whole cannot be read."""


@dataclass(frozen=True)
class RenderTarget:
    shortest_edge: int | None = None  # CLIP-style: the shorter side after resizing
    max_pixels: int | None = None  # Qwen-VL-style: the most pixels an image keeps
    dpi: float | None = None  # --pdf-dpi: wins over both

    def scale(self, width_pt: float, height_pt: float) -> float:
        """Pixels per PDF point (1/72 inch) for a page of this size."""
        if self.dpi:
            return self.dpi / 72.0
        if self.max_pixels:
            return math.sqrt(self.max_pixels / max(width_pt * height_pt, 1e-6))
        if self.shortest_edge:
            return self.shortest_edge / max(min(width_pt, height_pt), 1e-6)
        return DEFAULT_DPI / 72.0


def render_target(model, processor_kwargs: dict | None = None, dpi: float | None = None) -> RenderTarget:
    """What the model's image processor keeps of an image, read from the processor itself."""
    if dpi:
        return RenderTarget(dpi=dpi)
    module = model[0] if len(model) else None
    processor = getattr(module, "processor", None)
    ip = getattr(processor, "image_processor", None) or processor
    size = getattr(ip, "size", None)
    get = (lambda k: getattr(size, k, None) if not isinstance(size, dict) else size.get(k)) if size is not None else (
        lambda k: None)
    kwargs = dict(processor_kwargs or {})
    max_pixels = kwargs.get("max_pixels") or getattr(ip, "max_pixels", None)
    if max_pixels is None and get("longest_edge") and get("shortest_edge") and not getattr(ip, "crop_size", None):
        max_pixels = get("longest_edge")  # Qwen2-VL's processors keep max_pixels there
    if max_pixels:
        return RenderTarget(max_pixels=int(max_pixels))
    if get("shortest_edge"):
        return RenderTarget(shortest_edge=int(get("shortest_edge")))
    return RenderTarget()


def render_pages(data: bytes, target: RenderTarget, *, max_pages: int | None = None,
                 max_image_pixels: int | None = None, done=lambda n: False) -> Iterator[tuple[int, object, str | None]]:
    """(page number, PIL image or None, why not) for each page, rendered lazily, one at a time;
    pages for which `done(n)` holds (committed by an earlier attempt) are not rendered at all."""
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        # PDFium opens no document without a page, and may then report a previous document's error.
        if data.startswith(b"%PDF") and _NO_PAGES.search(data) and not _A_PAGE.search(data):
            why = "it has no pages"
        elif getattr(exc, "err_code", None) == pdfium.raw.FPDF_ERR_PASSWORD:
            why = "it is encrypted with a password"
        else:
            why = "it is corrupt or not a PDF"
        raise DocumentError(f"cannot open the PDF: {why} ({exc})") from None
    try:
        pages = len(doc)
        if not pages:
            raise DocumentError("the PDF has no pages")
        for i in range(min(pages, max_pages) if max_pages else pages):
            if done(i + 1):
                continue
            page = doc[i]
            try:
                w, h = page.get_size()
                scale = target.scale(w, h)
                pixels = round(w * scale) * round(h * scale)
                if max_image_pixels and pixels > max_image_pixels:
                    yield i + 1, None, (f"page {i + 1} would render at {round(w * scale)}x{round(h * scale)} = "
                                        f"{pixels:,} pixels, over --max-image-pixels {max_image_pixels:,}")
                    continue
                image = page.render(scale=scale).to_pil().convert("RGB")
            except pdfium.PdfiumError as exc:
                yield i + 1, None, f"page {i + 1} cannot be rendered: {exc}"
                continue
            finally:
                page.close()
            yield i + 1, image, None
    finally:
        doc.close()
