"""The page (gradio Blocks: Plan, and the tabs still to come) and its server (uvicorn, on the
socket `snug ui` bound), offline: system fonts, no analytics (snug/ui/__init__.py), no tunnel,
and a Content-Security-Policy under which the page loads nothing from another origin (gradio's
front end carries code that adds Google Fonts links, for its embedded web component: should
that or anything else try, the browser refuses)."""

from __future__ import annotations

import socket
from pathlib import Path

import gradio as gr

from snug.ui.plan_tab import plan_tab
from snug.ui.safety import token_check

# 'unsafe-inline' scripts: gradio's index.html carries its config inline; nothing else is
# allowed from outside this server, and no page may frame this one.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "media-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
# system fonts only: gradio's default theme would serve its bundled IBM Plex and Source Sans
THEME = gr.themes.Default(
    font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
COMING = {
    "Train": "a form from the config declarations, a preview of the tokenized records, and "
    "Start and Stop of `snug train`",
    "Runs": "every run under the root with its state, loss curve, memory, tokens/s and log",
    "Chat": "chat with the base and a run's adapters, and `snug eval --compare`",
    "Export": "`snug merge` with its verification",
}


def build(root: Path) -> gr.Blocks:
    with gr.Blocks(title="snug", analytics_enabled=False) as page:
        gr.Markdown(f"# snug\nFiles are read and written under `{root}`.")
        with gr.Tabs():
            with gr.Tab("Plan", id="plan"):
                plan_tab(root)
            for name, what in COMING.items():
                with gr.Tab(name, id=name.lower()):
                    gr.Markdown(f"Coming: {what}.")
    return page


def serve(root: Path, host: str, sock: socket.socket, token: str | None) -> int:
    """Serve the page on `sock` until Ctrl-C; with a `token`, behind gradio's login."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def same_origin_only(request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        return response

    app = gr.mount_gradio_app(
        app,
        build(root),
        path="",
        auth=token_check(token) if token else None,
        auth_message="The password is the token of snug ui --token-file.",
        footer_links=[],
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        pwa=False,
        theme=THEME,
    )
    port = sock.getsockname()[1]
    login = "; the page asks for the token" if token else ""
    print(f"snug ui: http://{host}:{port} (files under {root}){login}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
