"""``python -m app_kit.plugin``: the protoc plugin."""

from .main import main

main()
