"""`itmatch serve`: a retrieval web page and JSON API over one or two gallery indexes (FastAPI + uvicorn).

`service` holds the searches (`RetrievalService`: text -> images, image -> captions, word -> region attention),
`media` the pictures (thumbnails, id mapping, synthetic scenes, region boxes, path safety), `limits` what a request
may ask for (`ServeLimits`, `ServeError`, upload checks, the concurrency `Gate`) and `app` the FastAPI routes, the
page (`page.html`) and uvicorn.
"""

from itmatch.serve.app import create_app, page_html, serve
from itmatch.serve.limits import Gate, ServeError, ServeLimits
from itmatch.serve.service import RetrievalService, normalise_caption

__all__ = ["Gate", "RetrievalService", "ServeError", "ServeLimits", "create_app", "normalise_caption", "page_html",
           "serve"]
