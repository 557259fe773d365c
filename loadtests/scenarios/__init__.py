"""Locust users, shapes and the per-request event log shared by the loadtests/locustfile_*.py files.

Not named `locust`: locust puts the locustfile's folder (loadtests/) on sys.path, where a package
of that name would shadow locust itself."""
