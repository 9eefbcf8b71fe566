"""The test suites of the thumbnail apps sites use with our backends, run against them.

easy-thumbnails and sorl-thumbnail ship their tests in their source distributions.
:mod:`.suites` says which releases and how each suite is run, :mod:`.run` runs one in a
process of its own on one of our backends, the ``settings_*`` modules are that process's
Django settings (the suite's own plus what our backends need), :mod:`.swap` puts our
backend in place of ``FileSystemStorage`` before the apps' models load, and :mod:`.skips`
lists every test that does not run, and why.
"""
