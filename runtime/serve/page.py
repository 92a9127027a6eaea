"""The browser page at ``/``: type a script, pick voices, hear it while it is generated.

Two static files shipped as package data (``static/index.html``, ``static/app.js``);
the page speaks the ``/v1/stream`` WebSocket protocol and plays PCM with Web Audio.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter()


@cache
def _static(name: str) -> str:
    assert __package__  # always imported as a module of the serve package
    return (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    return HTMLResponse(_static("index.html"))


@router.get("/app.js")
async def script() -> Response:
    return Response(_static("app.js"), media_type="text/javascript")
