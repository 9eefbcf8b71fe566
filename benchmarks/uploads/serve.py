"""Serve the upload app over HTTP on 127.0.0.1, as a site's web server process would.

    python -m benchmarks.uploads.serve PORT

cheroot (a threaded HTTP/1.1 WSGI server with keep-alive, from the ``test`` extra) when
installed, else the standard library's ``wsgiref``. The settings come from the environment
the benchmark sets (``RESTO_BENCH_*``). Each answer carries ``X-Bench-App-Ns``: the
nanoseconds from the request reaching Django's WSGI handler to its response's start
(reading the body, the view, the model save).
"""
import os
import sys
import time

SERVER_HEADER = "X-Bench-App-Ns"


def timed(application):
    """``application`` that reports its own time in the ``X-Bench-App-Ns`` header."""

    def wrapper(environ, start_response):
        started = time.perf_counter_ns()

        def timed_start_response(status, headers, exc_info=None):
            headers = [*headers, (SERVER_HEADER, str(time.perf_counter_ns() - started))]
            return start_response(status, headers, exc_info)

        return application(environ, timed_start_response)

    return wrapper


def main(argv=None):
    port = int((argv or sys.argv[1:])[0])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    from django.core.wsgi import get_wsgi_application

    from benchmarks import common

    application = timed(get_wsgi_application())
    app = common.celery_app()  # noqa: F841 - the current Celery app, as a project's proj/celery.py makes it
    try:
        from cheroot import wsgi
    except ImportError:
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, *args):
                pass

        print("serving with wsgiref", flush=True)
        make_server("127.0.0.1", port, application, handler_class=QuietHandler).serve_forever()
        return
    server = wsgi.Server(("127.0.0.1", port), application, numthreads=2)
    print("serving with cheroot", flush=True)
    try:
        server.start()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
