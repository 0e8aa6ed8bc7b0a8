"""The original Bonzo server API: one request callback for every message.

Run it and send it a message (``swaks --server 127.0.0.1:2525 --to you@example.org``).
"""

from tornado.ioloop import IOLoop

from bonzo.server import SMTPServer


def handle_request(request):
    subject = request.message["Subject"]
    print(f"{request.remote_ip}: from <{request.mail}> to {request.rcpt}: {subject}")
    request.finish()  # answer 250; without it the client waits


if __name__ == "__main__":
    server = SMTPServer(handle_request)
    server.listen(2525, "127.0.0.1")
    IOLoop.current().start()
