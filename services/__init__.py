"""SmartPath services: config, storage, the Ray Serve deployments (one folder each), CLI."""
