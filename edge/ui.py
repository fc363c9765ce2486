"""The association page: where a person pastes the Edge key when the agent found none.

Go (edge/http/edge.go, static/index.html) serves a form whose field ``key`` posts to ``POST /init`` on
EDGE_SERVER_HOST:EDGE_SERVER_PORT, answers "Agent setup OK. You can close this page." and shuts the page
down; it also shuts down when no key came within 15 minutes of start. Ours keeps that contract, validates
the key before accepting it and shows what is wrong on the page itself (Go answers a bare 500 text).
The page has no scripts and no external resources; its CSP forbids both.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from agent.tasks import spawn
from edge.key import EdgeKeyError, KeyAlreadySetError

log = logging.getLogger(__name__)

KeyConsumer = Callable[[str], Awaitable[None]]
"""Takes the pasted key; raises EdgeKeyError (shown to the person) or KeyAlreadySetError."""

SUCCESS_TEXT = "Agent setup OK. You can close this page."
_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Portainer Edge Agent</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f3f4f6; margin: 0; }}
.panel {{ max-width: 40rem; margin: 10vh auto; background: #fff; padding: 2rem; border-radius: .5rem;
         box-shadow: 0 1px 4px rgba(0,0,0,.15); }}
h1 {{ font-size: 1.3rem; margin-top: 0; }}
input[type=text] {{ width: 100%; box-sizing: border-box; padding: .6rem; font-family: monospace; }}
input[type=submit] {{ margin-top: 1rem; padding: .5rem 1.5rem; }}
.error {{ color: #991b1b; background: #fee2e2; border: 1px solid #fca5a5; padding: .6rem; margin: 1rem 0; }}
.ok {{ color: #065f46; background: #d1fae5; border: 1px solid #6ee7b7; padding: .6rem; }}
</style>
</head>
<body>
<div class="panel">
<h1>Portainer Edge Agent</h1>
{content}
</div>
</body>
</html>
"""

_FORM = """<p>Paste the Edge key that Portainer shows for this environment.</p>
{error}<form action="/init" method="post">
<input type="text" id="key" name="key" placeholder="Enter Edge agent key..." autofocus autocomplete="off"
 spellcheck="false">
<input type="submit" id="submit" value="Submit">
</form>"""




def render(content: str) -> str:
    return _PAGE.format(content=content)


def form_page(error: str = "") -> str:
    box = f'<div class="error" id="error" role="alert">{html.escape(error)}</div>\n' if error else ""
    return render(_FORM.format(error=box))


class AssociationUI:
    """Serves the page until a key is accepted, ``close()`` is called, or ``timeout`` passes without a key."""

    def __init__(self, host: str, port: int, on_key: KeyConsumer, timeout: float = 15 * 60.0) -> None:
        self.host = host
        self.port = port
        self.on_key = on_key
        self.timeout = timeout
        self._runner: web.AppRunner | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._lock = asyncio.Lock()
        self.accepted = False

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._closed.is_set()

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/index.html", self._index)
        app.router.add_post("/init", self._init)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        if runner.addresses:
            self.port = runner.addresses[0][1]
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)
        log.info("no Edge key yet: association page on http://%s:%d/ (closes in %gs without a key)",
                 self.host, self.port, self.timeout)

    def _expire(self) -> None:
        log.info("closing the Edge key association page: no key was given within %gs", self.timeout)
        self.close_soon()

    def close_soon(self) -> None:
        """Close after the current response went out (safe to call from a handler)."""
        if self._closing is None:
            self._closing = spawn(self.close(), "edge-ui-close")

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await asyncio.sleep(0.05)  # let a just-written answer leave the socket
            await runner.cleanup()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @staticmethod
    def _page(text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store",
                                     "X-Content-Type-Options": "nosniff"})

    async def _index(self, _request: web.Request) -> web.Response:
        if self.accepted:
            return self._page(render(f'<p class="ok" id="ok">{SUCCESS_TEXT}</p>'))
        return self._page(form_page())

    async def _init(self, request: web.Request) -> web.Response:
        form = await request.post()
        key = form.get("key")
        if not isinstance(key, str) or not key.strip():
            return self._page(form_page("Missing key parameter: paste the Edge key first."), 400)
        async with self._lock:
            if self.accepted:
                return self._page(render(f'<p class="ok" id="ok">{SUCCESS_TEXT}</p>'))
            try:
                await self.on_key(key)
            except EdgeKeyError as exc:
                log.info("association page: key rejected: %s", exc)
                return self._page(form_page(f"This key cannot be used: {exc}"), 400)
            except KeyAlreadySetError:
                self.accepted = True
                self.close_soon()
                return self._page(render('<p class="ok" id="ok">An Edge key is already associated to this '
                                         'agent. You can close this page.</p>'), 409)
            except OSError as exc:  # the key file cannot be written
                log.warning("association page: the key could not be saved: %s", exc)
                return self._page(form_page(f"The key could not be saved: {exc}"), 500)
            self.accepted = True
        self.close_soon()
        return self._page(render(f'<p class="ok" id="ok">{SUCCESS_TEXT}</p>'))

