"""Django's own storage tests (``tests/file_storage`` of its sdist), run against our backends.

:mod:`.run` runs them in a process of their own, :mod:`.settings` is that process's Django
settings and :mod:`.skips` lists every test that does not run, and why.
"""
