"""The community dashboard: FastAPI app, JSON API, Prometheus metrics, static page."""
