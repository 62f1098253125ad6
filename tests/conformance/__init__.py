"""The Autobahn|Testsuite conformance run (``just conformance``): an echo app served through
wsfanout's own server adapters (echo.py, serve.py), the fuzzingclient against it (run.py)."""
