"""The protoc plugin that generates service bases and stubs (``protoc-gen-app_kit``)."""
