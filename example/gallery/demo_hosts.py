"""The demo's media hosts, when the site runs inside `example/demo.py --serve`.

They are MediaServers in the demo's own process, so the site's /demo/hosts/ page can take
one down and bring it back. Elsewhere (docker-compose, a plain runserver) the list is
empty and the page says how to do it there.
"""
HOSTS = []


def register(hosts):
    HOSTS[:] = hosts
