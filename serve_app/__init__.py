"""Ray Serve application around the multi-LoRA engine: TGI- and OpenAI-compatible HTTP routes.

Modules: `http_app` (Starlette routes over a Backend), `tgi` / `openai_api` (request and response
mapping), `core` (one Engine behind a dict interface, Ray-free), `deployments` (the Ray Serve
ingress and model-replica deployments), `app` (`build_app`, used by config.yaml), `demo` (model-id
resolution and the built-in demo model), `__main__` (a TGI-like command-line launcher).
"""
