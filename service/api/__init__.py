"""The HTTP API (Litestar): ``create_app`` in ``service.api.app``."""
