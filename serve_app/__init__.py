"""Ray Serve application around the multi-LoRA engine: TGI- and OpenAI-compatible HTTP routes.

- `app` — `build_app(args)`, the builder config.yaml's `import_path` names; `settings` parses its args.
- `deployments` — the Ray Serve `Ingress` (Starlette) and `ModelReplica` (one Engine) deployments.
- `http_app` — the Starlette routes over a `Backend` (`backends`: in-process; `deployments`: Ray handle).
- `http_guards` — the ASGI middleware in front of them: bounded request bodies, no exception text in responses.
- `tgi`, `openai_api`, `validation`, `errors` — request parsing and TGI / OpenAI response and error shapes.
- `core` — one Engine behind a dict-in / dict-out interface (Ray-free), with per-request metrics.
- `metrics` — replica metric snapshots rendered as Prometheus text by the ingress.
- `demo` — model-id resolution and the built-in demo model; `__main__` — a TGI-like launcher.
"""
