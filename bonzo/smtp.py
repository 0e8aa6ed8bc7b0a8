"""``RequestHandler`` and ``Application``: the tornado.web-like way to handle messages.

Subclass :class:`RequestHandler`, define :meth:`~RequestHandler.data`, and
serve it with :class:`Application`::

    import tornado.ioloop
    import bonzo.smtp

    class Handler(bonzo.smtp.RequestHandler):

        def data(self):
            print(self.request.message)

    application = bonzo.smtp.Application(Handler)

    if __name__ == '__main__':
        application.listen(2525)
        tornado.ioloop.IOLoop.current().start()

Every override point may be a plain method or a coroutine (``async def`` or
``@gen.coroutine``): if it returns an awaitable, execution waits for it.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from .hooks import passes_through
from .server import SMTPRequest, SMTPServer

__all__ = ["RequestHandler", "Application"]


class RequestHandler:
    """Subclass this class and define :meth:`data` to make a handler.

    One instance handles one message. The client gets ``250 Ok`` when the
    handler finishes (automatically after :meth:`data` returns), the reply of
    a :class:`bonzo.errors.SMTPError` it raises, or ``451`` for any other
    exception (which is logged).
    """

    def __init__(self, application: Application, request: SMTPRequest) -> None:
        self.application = application
        self.request = request
        self._finished = False
        self._auto_finish = True
        connection = request.connection
        if connection is not None:
            connection.set_close_callback(self.on_connection_close)

    @property
    def settings(self) -> dict[str, Any]:
        """An alias for :attr:`self.application.settings <Application.settings>`."""
        return self.application.settings

    def prepare(self) -> Any:
        """Called at the beginning of a request before :meth:`data`.

        Override this method to perform common initialization regardless of
        the request. May return an awaitable.
        """

    def data(self) -> Any:
        """Called with the complete message in ``self.request``. Override it.

        May return an awaitable; its result must be ``None``.
        """

    def on_finish(self) -> None:
        """Called after the end of a request, once the reply is decided.

        Override this method to perform cleanup, logging, etc. This method is
        a counterpart to :meth:`prepare`; it may not produce any output.
        """

    def on_connection_close(self) -> None:
        """Called if the client closed the connection while this handler was
        still working on the message."""

    def _execute(self) -> Any:
        """Executes this request: prepare, data, finish. Plain methods run
        at once, as in Bonzo 0.1 (an error is raised here); from the first
        awaitable on, the rest runs in a task (:meth:`Application.__call__`).
        Returns ``None`` when done, else that task."""
        result = self.prepare()
        if result is not None:
            return self._go_on(result, "prepare")
        if not self._finished:
            result = self.data()
            if result is not None:
                return self._go_on(result, "data")
        if self._auto_finish and not self._finished:
            self.finish()
        return None

    def _go_on(self, result: Any, what: str) -> Any:
        """The rest of :meth:`_execute` once ``what()`` returned ``result``."""
        if not inspect.isawaitable(result):
            raise ValueError(f"Expected None from {what}(), got {result!r}")
        rest = self._rest(result, what)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return rest  # no loop to run it in: the caller awaits it
        task = loop.create_task(_report(self.request, rest))
        track = getattr(self.request, "_track", None)
        if track is not None:
            track(task)
        return task

    async def _rest(self, result: Any, what: str) -> None:
        await _none(result, what)
        if what == "prepare" and not self._finished:
            await _none(self.data(), "data")
        if self._auto_finish and not self._finished:
            self.finish()

    def finish(self) -> None:
        """Finishes this response, ending the SMTP request with ``250 Ok``."""
        if self._finished:
            raise RuntimeError("finish() called twice.")
        connection = self.request.connection
        if connection is not None:
            connection.set_close_callback(None)
        self.request.finish()
        self._finished = True
        self.on_finish()


async def _report(request: SMTPRequest, work: Any) -> None:
    """Await a handler's ``work``, handing an error to its request: the
    server waits on the request, not on this task, which nobody may await
    (a callback that called the application without returning it)."""
    try:
        await work
    except BaseException as error:
        # Whatever its class (SystemExit, a library's Timeout(BaseException)):
        # left in this task nobody awaits, it would never become the reply
        # (or, for SystemExit, end the event loop).
        fail = getattr(request, "_fail", None)
        if fail is None or passes_through(error):
            # Not a server's request (the task's awaiter sees it), or not the
            # handler's fault: this task cancelled (the reply was decided
            # without it), a Ctrl-C.
            raise
        fail(error)


async def _none(result: Any, what: str) -> None:
    if result is not None and inspect.isawaitable(result):
        result = await result
    if result is not None:
        raise ValueError(f"Expected None from {what}(), got {result!r}")


class Application:
    """Instances of this class are callable and can be passed directly to
    :class:`~bonzo.server.SMTPServer` to handle messages:

    .. code-block:: python

       application = smtp.Application(Handler)
       smtp_server = server.SMTPServer(application)
       smtp_server.listen(2525)
       ioloop.IOLoop.current().start()

    .. attribute:: settings

       Additional keyword arguments passed to the constructor are saved in
       the ``settings`` dictionary and are available to handlers as
       ``self.settings``. ``debug=True`` turns on ``autoreload``, which
       restarts the process when a module changes.
    """

    def __init__(self, handler_class: type[RequestHandler], **settings: Any) -> None:
        self.handler_class = handler_class
        self.settings = settings
        if self.settings.get("debug"):
            self.settings.setdefault("autoreload", True)
        if self.settings.get("autoreload"):
            from tornado import autoreload

            autoreload.start()

    def __call__(self, request: SMTPRequest) -> Any:
        """Called by :class:`~bonzo.server.SMTPServer` to execute the request.

        As in Bonzo 0.1, the handler's plain methods run at once, so a
        request callback may call the application itself
        (``app(request)``); an error they raise is raised here. If
        ``prepare()`` or ``data()`` returns an awaitable, the rest of the
        handler runs in an :class:`asyncio.Task`, which is returned (awaiting
        it is optional: the server waits for the request to finish, and an
        error in the task is the message's reply). Returns ``None`` when the
        handler is done. Outside a running event loop the rest is returned
        as a coroutine, for the caller to await.
        """
        handler = self.handler_class(self, request)
        return handler._execute()

    def listen(self, port: int, address: str = "", **kwargs: Any) -> SMTPServer:
        """Starts an SMTP server for this application on the given port.

        Keyword arguments are passed to the :class:`~bonzo.server.SMTPServer`
        constructor (settings such as ``max_message_size``, or
        ``ssl_options``). Returns the server. You still need to start the
        IOLoop (``IOLoop.current().start()``).
        """
        server = SMTPServer(self, **kwargs)
        server.listen(port, address)
        return server
